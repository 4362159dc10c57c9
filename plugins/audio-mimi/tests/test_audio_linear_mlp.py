"""The `linear_mlp` head (the linear baseline plus an MLP correction) and zdyn's `val` split."""

from __future__ import annotations

import pytest
import torch
from audio_mimi_testutil import PairData, fit_context, spec, tiny_synthetic
from engram_audio_mimi.data import ZdynConfig, ZdynDataset
from engram_audio_mimi.linear import LinearConfig, LinearHead
from engram_audio_mimi.linear_mlp import LinearMLPConfig, LinearMLPHead

from engram_core.components import BuildContext, Model
from engram_core.errors import ConfigError


def _build(dim):
    s = spec(dim)
    s._fields["dz_max_norm"] = 10.0
    return BuildContext(spec=s)


@pytest.mark.parametrize("output", ["gaussian", "vmf"])
def test_fitted_linear_mlp_is_the_linear_head(output):
    data = PairData(6, n=400)
    torch.manual_seed(0)
    linear = LinearHead(LinearConfig(output=output), _build(6))
    both = LinearMLPHead(LinearMLPConfig(output=output, hidden=16, layers=2), _build(6))
    for head in (linear, both):
        head.fit(fit_context(Model(head), data))
    with torch.no_grad():
        assert torch.allclose(both.nll(data.z, data.dz), linear.nll(data.z, data.dz), atol=1e-4)
        assert torch.allclose(both.mean_step(data.z), linear.mean_step(data.z), atol=1e-5)


@pytest.mark.parametrize("output", ["gaussian", "vmf"])
def test_the_correction_learns_what_the_linear_part_cannot(output):
    data = PairData(6, n=400)  # Δz = 0.3·tanh(roll(z)) + noise: not linear in z
    torch.manual_seed(0)
    head = LinearMLPHead(LinearMLPConfig(output=output, hidden=32, layers=2), _build(6))
    head.fit(fit_context(Model(head), data))
    with torch.no_grad():
        linear_nll = float(head.nll(data.z, data.dz).mean())
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        head.nll(data.z, data.dz).mean().backward()
        opt.step()
    with torch.no_grad():
        assert float(head.nll(data.z, data.dz).mean()) < linear_nll - 0.5


def _dataset(tmp_path, **kw):
    cfg = ZdynConfig(eval_fraction=0.25, synthetic=tiny_synthetic(dim=8, speakers=8), **kw)
    return ZdynDataset(cfg, BuildContext(cache_dir=tmp_path))


def test_val_split_holds_out_train_speakers(tmp_path):
    plain = _dataset(tmp_path)
    ds = _dataset(tmp_path, val_fraction=0.34)
    assert plain.splits == ("train", "eval") and ds.splits == ("train", "eval", "val")
    speakers = {name: set(ds.split(name).speakers.tolist()) for name in ds.splits}
    assert len(speakers["val"]) == 2 and len(speakers["train"]) == 4
    assert not (speakers["val"] & speakers["train"]) and not (speakers["val"] & speakers["eval"])
    assert speakers["eval"] == set(plain.split("eval").speakers.tolist())  # the eval speakers do not move
    assert speakers["train"] | speakers["val"] == set(plain.split("train").speakers.tolist())
    with pytest.raises(ConfigError, match="val"):
        plain.split("val")
