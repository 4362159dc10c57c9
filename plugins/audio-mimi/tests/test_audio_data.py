"""zdyn data set: store format, speaker-disjoint split, windows, train-only normalisation, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import zarr
from audio_mimi_testutil import tiny_dataset, tiny_synthetic
from engram_audio_mimi.data import ZdynConfig, ZdynDataset
from engram_audio_mimi.heads import GaussianMLPConfig, GaussianMLPHead
from engram_audio_mimi.objectives import RolloutNLL, RolloutNLLConfig
from engram_audio_mimi.store import read_store, write_store
from engram_audio_mimi.synthetic import generate

from engram_core.components import BuildContext
from engram_core.config import ConfigError


def test_synthetic_is_deterministic_and_cached(tmp_path):
    a = generate(tiny_synthetic())
    b = generate(tiny_synthetic())
    assert [u for u, _, _ in a] == [u for u, _, _ in b]
    assert all(np.array_equal(x, y) for (_, _, x), (_, _, y) in zip(a, b))
    ds = tiny_dataset(tmp_path)
    stores = list((tmp_path / "audio-mimi").glob("zdyn-synthetic-*.zarr"))
    assert len(stores) == 1 and ds.store_path == stores[0]
    ids, speakers, arrays, attrs_ = read_store(stores[0])
    assert len(ids) == 6 * 3 and arrays[0].shape == (40, 16) and attrs_["format"] == "engram-zdyn"
    ZdynDataset(ZdynConfig(eval_fraction=0.34, synthetic=tiny_synthetic()), BuildContext(cache_dir=tmp_path))
    names = sorted(p.name for p in (tmp_path / "audio-mimi").iterdir())
    assert names == [stores[0].name, stores[0].name + ".meta.json"]  # reused, not regenerated


def test_dimension_512_works(tmp_path):
    ds = tiny_dataset(tmp_path, dim=512, speakers=3, utterances=1, frames=12)
    assert ds.spec.dim == 512
    b = ds.sample("train", 4, torch.Generator().manual_seed(0))
    assert b["z"].shape == (4, 512) and torch.isfinite(b["dz"]).all()


def test_split_is_speaker_disjoint_and_covers_all(tmp_path):
    ds = tiny_dataset(tmp_path)
    train = set(ds.split("train").speakers.tolist())
    evals = set(ds.split("eval").speakers.tolist())
    assert train and evals and not (train & evals)
    assert len(train | evals) == 6


def test_pairs_and_segments_are_true_differences(tmp_path):
    ds = tiny_dataset(tmp_path)
    s = ds.split("train")
    z, dz, _ = ds.pairs("train")
    assert z.shape[0] == int((s.lengths - 1).sum())
    assert torch.allclose(z + dz, s.frames[s.pair_index + 1])
    seg = ds.sample_segments("train", 16, 8, torch.Generator().manual_seed(0))
    assert seg["dz"].shape == (16, 8, 16)
    # z0 + cumulative Δz reproduces the true states: the segment never crosses an utterance
    states = seg["z0"][:, None] + seg["dz"].cumsum(1)
    frames = s.frames
    for i in range(16):
        start = int(((frames - seg["z0"][i]).abs().sum(-1) == 0).nonzero()[0])
        assert torch.allclose(states[i], frames[start + 1 : start + 9], atol=1e-5)
        utt = int(torch.searchsorted(s.offsets, torch.tensor(start), right=True)) - 1
        assert start + 8 < int(s.offsets[utt + 1])


def test_sampling_uses_only_the_generator(tmp_path):
    ds = tiny_dataset(tmp_path)
    a = ds.sample_segments("train", 8, 4, torch.Generator().manual_seed(5))
    torch.manual_seed(123)
    b = ds.sample_segments("train", 8, 4, torch.Generator().manual_seed(5))
    assert torch.equal(a["dz"], b["dz"])


def test_normalisation_is_fitted_on_train_only(tmp_path):
    ds = tiny_dataset(tmp_path)
    tr = ds.split("train").frames
    assert torch.allclose(tr.mean(0), torch.zeros(16), atol=1e-4)
    assert torch.allclose(tr.std(0, unbiased=False), torch.ones(16), atol=1e-3)
    ev = ds.split("eval").frames
    assert not torch.allclose(ev.mean(0), torch.zeros(16), atol=1e-3)


def test_eval_segments_are_fixed(tmp_path):
    ds = tiny_dataset(tmp_path)
    a = torch.cat([b["z0"] for b in ds.eval_segments("eval", 4, 10, 3, seed=0)])
    b = torch.cat([b["z0"] for b in ds.eval_segments("eval", 4, 10, 3, seed=0)])
    assert a.shape == (10, 16) and torch.equal(a, b)


# ---- bad input ------------------------------------------------------------------------------


def test_store_without_arrays_is_a_config_error(tmp_path):
    g = zarr.open_group(str(tmp_path / "bad.zarr"), mode="w")
    g.create_array("something", data=np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(ConfigError, match="no 'utterances' group") as e:
        ZdynDataset(ZdynConfig(path=str(tmp_path / "bad.zarr")))
    assert e.value.key == "path"
    with pytest.raises(ConfigError, match="does not exist"):
        ZdynDataset(ZdynConfig(path=str(tmp_path / "missing.zarr")))


def test_store_without_speaker_attribute(tmp_path):
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="w").create_group("utterances")
    g.create_array("u1", data=np.zeros((5, 4), dtype=np.float32))
    with pytest.raises(ConfigError, match="speaker"):
        ZdynDataset(ZdynConfig(path=str(tmp_path / "s.zarr")))


@pytest.mark.parametrize("value", [np.nan, np.inf, 1e300])
def test_store_with_a_non_finite_value_names_utterance_and_frame(tmp_path, value):
    rng = np.random.default_rng(0)
    utts = [(f"u{i}", f"s{i % 3}", rng.standard_normal((10, 4))) for i in range(6)]
    utts[4][2][7, 1] = value  # float64: 1e300 is inf once read as float32
    path = write_store(tmp_path / "z.zarr", utts)
    with pytest.raises(ConfigError) as e:
        ZdynDataset(ZdynConfig(path=str(path)))
    assert e.value.key == "path" and "utterances/u4" in e.value.message and "[frame 7, dim 1]" in e.value.message
    assert "\n" not in e.value.message


def _store(tmp_path):
    rng = np.random.default_rng(0)
    utts = [(f"u{i}", f"s{i % 3}", rng.standard_normal((10, 4))) for i in range(6)]
    return write_store(tmp_path / "z.zarr", utts)


def test_split_file_with_speaker_on_both_sides(tmp_path):
    path = _store(tmp_path)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["s0", "s1"], "eval": ["s1", "s2"]}))
    with pytest.raises(ConfigError, match="both sides.*s1") as e:
        ZdynDataset(ZdynConfig(path=str(path), split_file=str(split)))
    assert e.value.key == "split_file"
    split.write_text(json.dumps({"train": ["s0", "s1"], "eval": ["s2"]}))
    ds = ZdynDataset(ZdynConfig(path=str(path), split_file=str(split)))
    assert ds.split("eval").frames.shape == (20, 4)


def test_horizon_longer_than_every_utterance(tmp_path):
    path = _store(tmp_path)
    ds = ZdynDataset(ZdynConfig(path=str(path)))
    ds.check_horizon(9)
    with pytest.raises(ConfigError, match="longer than every train utterance allows") as e:
        RolloutNLL(RolloutNLLConfig(horizon=10), BuildContext(spec=ds.spec, dataset=ds))
    assert e.value.key == "horizon"


def test_head_dimension_mismatch(tmp_path):
    ds = ZdynDataset(ZdynConfig(path=str(_store(tmp_path))))
    with pytest.raises(ConfigError, match="does not match the data's D = 4") as e:
        GaussianMLPHead(GaussianMLPConfig(dim=8), BuildContext(spec=ds.spec))
    assert e.value.key == "dim"
