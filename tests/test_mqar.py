"""mqar's sampler (distinct keys by Floyd's algorithm, query slots by Gumbel top-k), its
cache, and its data kept on the run's device (`place`). The task's structure (pairs,
queries, masks, spacings) is tested in test_points.py."""

import pytest
import torch

from engram_core.builtin.mqar import (
    MQARConfig,
    MQARDataset,
    distinct_keys,
    generate_mqar,
    pack,
    query_slots,
    unpack,
)
from engram_core.components import BuildContext
from engram_core.config import ConfigError


def test_keys_are_distinct_in_range_and_seeded():
    a = distinct_keys(5000, 6, 10, torch.Generator().manual_seed(0))
    b = distinct_keys(5000, 6, 10, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert a.min() >= 0 and a.max() < 10
    assert (a.sort(1).values.diff(dim=1) > 0).all()  # no row repeats a key
    assert not torch.equal(a, distinct_keys(5000, 6, 10, torch.Generator().manual_seed(1)))


def test_every_key_is_equally_likely_at_every_place():
    """Floyd's algorithm alone puts high ids late in a row; the shuffle must undo that."""
    n, k, n_keys = 40000, 4, 12
    keys = distinct_keys(n, k, n_keys, torch.Generator().manual_seed(3))
    expected = n / n_keys  # per place: each key with probability 1 / n_keys
    for place in range(k):
        counts = torch.bincount(keys[:, place], minlength=n_keys).double()
        assert ((counts - expected).abs() / expected).max() < 0.06, (place, counts.tolist())


def test_all_keys_can_be_drawn_when_every_key_is_needed():
    keys = distinct_keys(100, 7, 7, torch.Generator().manual_seed(0))
    assert (keys.sort(1).values == torch.arange(7)).all()


@pytest.mark.parametrize("spacing", ["random", "power"])
def test_query_slots_follow_the_weights_as_multinomial_does(spacing):
    cfg = MQARConfig(n_pairs=3, seq_len=40, vocab_size=16, query_spacing=spacing, power_a=0.3)
    n, slots = 40000, 17
    chosen = query_slots(cfg, n, slots, torch.Generator().manual_seed(0))
    assert (chosen.sort(1).values.diff(dim=1) > 0).all()  # distinct slots
    i = torch.arange(1, slots + 1, dtype=torch.float64)
    weights = i ** (cfg.power_a - 1) if spacing == "power" else torch.ones(slots, dtype=torch.float64)
    reference = torch.multinomial(weights.expand(n, slots), 3, replacement=False, generator=torch.Generator().manual_seed(1))
    got = torch.bincount(chosen.flatten(), minlength=slots).double() / n
    want = torch.bincount(reference.flatten(), minlength=slots).double() / n
    assert (got - want).abs().max() < 0.015, (got.tolist(), want.tolist())
    if spacing == "power":
        assert got[0] > 2 * got[-1]  # early slots likelier


def test_each_sequence_scores_its_pairs_and_the_stored_form_is_exact():
    cfg = MQARConfig(n_pairs=4, seq_len=64, vocab_size=8192, n_train=300, n_eval=10)
    data = generate_mqar(cfg, 300, 7)
    assert ((data["labels"] != -100).sum(1) == 4).all()
    assert ((data["labels"] == -100) | (data["labels"] >= 4096)).all()  # only values are scored
    again = unpack(pack(data, cfg), cfg)
    assert pack(data, cfg)["input_ids"].dtype == torch.int16
    assert all(torch.equal(again[k], data[k]) for k in data)


def test_the_data_set_is_cached_by_config_and_seed(tmp_path, capsys):
    cfg = MQARConfig(n_pairs=2, seq_len=16, vocab_size=32, n_train=64, n_eval=16, seed=3)
    built = MQARDataset(cfg, BuildContext(cache_dir=tmp_path))
    assert "cache miss core/mqar" in capsys.readouterr().out
    loaded = MQARDataset(cfg, BuildContext(cache_dir=tmp_path))
    assert "cache hit core/mqar" in capsys.readouterr().out
    fresh = MQARDataset(cfg)  # no cache at all
    for split in ("train", "eval"):
        for k, v in fresh._splits[split].items():
            assert torch.equal(built._splits[split][k], v) and torch.equal(loaded._splits[split][k], v), (split, k)
    assert torch.equal(fresh._splits["train"]["input_ids"], generate_mqar(cfg, 64, 7)["input_ids"])
    MQARDataset(MQARConfig(n_pairs=2, seq_len=16, vocab_size=32, n_train=64, n_eval=16, seed=4), BuildContext(cache_dir=tmp_path))
    assert "cache miss core/mqar" in capsys.readouterr().out  # another seed, another entry


def test_the_spec_needs_no_data_and_declares_the_scored_bound():
    cfg = MQARConfig(n_pairs=3, seq_len=24, vocab_size=32, n_train=16, n_eval=8)
    spec = MQARDataset.dry_spec(cfg)
    assert dict(spec) == dict(MQARDataset(cfg).spec) and spec.max_scored == 3


def _batches(ds):
    g = torch.Generator().manual_seed(11)
    drawn = [ds.sample("train", 8, g) for _ in range(3)]
    return drawn + list(ds.eval_batches("eval", 5))


def test_placing_the_data_keeps_every_batch():
    cfg = MQARConfig(n_pairs=3, seq_len=24, vocab_size=32, n_train=40, n_eval=12)
    before = _batches(MQARDataset(cfg))
    placed = MQARDataset(cfg)
    placed.place(torch.device("cpu"))
    after = _batches(placed)
    assert len(before) == len(after) == 6
    for i, (a, b) in enumerate(zip(before, after)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        # training batches' masks are views of their one row (no gather a step); evaluation
        # batches and every ids and labels tensor are contiguous
        masks_are_views = i < 3
        assert all((b[k].stride(0) == 0) == masks_are_views for k in ("write_mask", "read_mask"))
        assert all(b[k].is_contiguous() for k in ("input_ids", "labels"))


def test_placed_data_lives_on_the_device_and_masks_stay_one_row():
    ds = MQARDataset(MQARConfig(n_pairs=3, seq_len=24, vocab_size=32, n_train=40, n_eval=12))
    ds.place("meta")  # a device other than the CPU, without needing one
    assert ds._splits["train"]["input_ids"].device.type == "meta"
    assert ds._splits["train"]["write_mask"].stride(0) == 0  # not materialised per sequence
    batch = ds.sample("train", 8, torch.Generator().manual_seed(0))
    assert all(v.device.type == "meta" and v.shape == (8, 24) for v in batch.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_on_cuda_are_the_cpu_batches():
    cfg = MQARConfig(n_pairs=3, seq_len=24, vocab_size=32, n_train=40, n_eval=12)
    before = _batches(MQARDataset(cfg))
    placed = MQARDataset(cfg)
    placed.place("cuda")
    for a, b in zip(before, _batches(placed)):
        assert all(b[k].is_cuda and torch.equal(a[k], b[k].cpu()) for k in a)


def test_a_val_split_is_disjoint_from_train_and_eval_and_changes_neither(tmp_path):

    base = MQARConfig(n_pairs=4, seq_len=32, vocab_size=64, n_train=200, n_eval=50, seed=3)
    with_val = MQARConfig(n_pairs=4, seq_len=32, vocab_size=64, n_train=200, n_eval=50, n_val=50, seed=3)
    a = MQARDataset(base, BuildContext(cache_dir=tmp_path / "a"))
    b = MQARDataset(with_val, BuildContext(cache_dir=tmp_path / "b"))
    assert a.splits == ("train", "eval") and b.splits == ("train", "val", "eval")
    for split in ("train", "eval"):  # adding val changes neither
        assert torch.equal(a._split(split)["input_ids"], b._split(split)["input_ids"])
    seen = {tuple(r) for s in ("train", "eval") for r in b._split(s)["input_ids"].tolist()}
    val = [tuple(r) for r in b._split("val")["input_ids"].tolist()]
    assert sum(r in seen for r in val) <= 1  # another stream: a repeat is a coincidence of 64^8 sequences
    assert b._split("val")["labels"].ne(-100).sum(1).eq(4).all()  # scored like the others
    with pytest.raises(ConfigError, match="no split 'val'"):
        a._split("val")
