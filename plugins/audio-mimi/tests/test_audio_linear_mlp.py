"""The `linear_mlp` head (the linear baseline plus an MLP correction), the linear head's full-covariance
output, and zdyn's `val` split."""

from __future__ import annotations

import numpy as np
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


@pytest.mark.parametrize("output", ["gaussian", "gaussian_full", "vmf"])
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


@pytest.mark.parametrize("output", ["gaussian", "gaussian_full", "vmf"])
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


def test_full_covariance_output_fits_the_residual_covariance():
    g = torch.Generator().manual_seed(0)
    n, d = 6000, 5
    z = torch.randn(n, d, generator=g)
    mix = torch.randn(d, 2, generator=g)  # residuals on a 2-d subspace plus a little isotropic noise
    noise = torch.randn(n, 2, generator=g) @ mix.T + 0.01 * torch.randn(n, d, generator=g)
    a = 0.2 * torch.randn(d, d, generator=g)
    data = type("Pairs", (), {"pairs": lambda self, split: (z, z @ a.T + noise, torch.zeros(n, dtype=torch.long))})()
    head = LinearHead(LinearConfig(output="gaussian_full"), _build(d))
    head.fit(fit_context(Model(head), data))
    tril = head.scale_tril().detach()
    cov = mix @ mix.T + 1e-4 * torch.eye(d)
    assert torch.allclose(tril @ tril.T, cov, atol=0.08 * float(cov.abs().max()))
    dz = z @ a.T + noise
    ref = torch.distributions.MultivariateNormal(head.mean_step(z[:50]).detach(), scale_tril=tril)
    assert torch.allclose(head.nll(z[:50], dz[:50]).detach(), -ref.log_prob(dz[:50]), atol=1e-3)
    steps = head.sample_step(torch.zeros(4000, d), torch.Generator().manual_seed(1)).detach()
    assert torch.allclose(torch.cov(steps.T), cov, atol=0.15 * float(cov.abs().max()))
    diag = LinearHead(LinearConfig(output="gaussian"), _build(d))
    diag.fit(fit_context(Model(diag), data))
    with torch.no_grad():  # the correlations are worth many nats over a diagonal σ
        assert float(head.nll(z, dz).mean()) < float(diag.nll(z, dz).mean()) - 3


def test_expected_steps_are_the_noise_free_steps():
    from engram_audio_mimi.synthetic import generate, generate_with_expected_steps

    cfg = tiny_synthetic(dim=8, archetype_choice="state")
    plain, with_steps = generate(cfg), generate_with_expected_steps(cfg)
    assert all((a[2] == b[2]).all() for a, b in zip(plain, with_steps))  # the same process, same draws
    assert with_steps[0][3].shape == (cfg.frames - 1, 8)
    exact = tiny_synthetic(dim=8, archetype_choice="state", state_noise=0.0, off_manifold_noise=0.0, magnitude_spread=0.0)
    for _, _, z, expected in generate_with_expected_steps(exact):
        assert np.allclose(expected, np.diff(z, axis=0), atol=1e-5)
