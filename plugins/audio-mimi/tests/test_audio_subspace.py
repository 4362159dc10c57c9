"""The vMF head's `subspace` option: the direction on the sphere of the train Δz's principal
subspace, the rest of Δz an isotropic Gaussian around a linear prediction."""

from __future__ import annotations

import math

import pytest
import torch
from audio_mimi_testutil import tiny_dataset
from engram_audio_mimi.heads import VMFMagnitudeConfig, VMFMagnitudeHead
from engram_audio_mimi.memories import BasisMemory, BasisMemoryConfig

from engram_core.components import BuildContext, DataSpec
from engram_core.errors import ConfigError


def _head(dim=3, r=2, seed=0, **kw) -> VMFMagnitudeHead:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    spec = DataSpec("test", dim=dim, dz_cov=(a @ a.T).float(), dz_max_norm=5.0)
    torch.manual_seed(seed)
    head = VMFMagnitudeHead(VMFMagnitudeConfig(hidden=8, layers=1, subspace=r, init_log_kappa=1.0, **kw), BuildContext(spec=spec)).double()
    with torch.no_grad():  # a complement mean and σ⊥ away from their starting values
        head.off_mean.weight.normal_(0, 0.3, generator=g)
        head.off_mean.bias.normal_(0, 0.3, generator=g)
        head.log_sigma_off.fill_(math.log(0.5))
        head.log_m.weight.zero_()  # m ~ LogNormal(0, 0.3): light tails, so a finite grid holds the mass
        head.log_m.bias.copy_(torch.tensor([0.0, math.log(0.3)]))
    return head


def test_the_subspace_density_integrates_to_one():
    head = _head()
    z = torch.randn(1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = torch.linspace(-6, 6, 121, dtype=torch.float64)
    cell = float(g[1] - g[0]) ** 3
    grid = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    with torch.no_grad():
        nll = torch.cat([head.nll(z.expand(len(c), 3), c) for c in grid.split(200_000)])
    assert float(torch.exp(-nll).sum()) * cell == pytest.approx(1.0, abs=2e-3)


def test_the_shared_forward_pass_equals_nll_and_mean_step():
    head = _head(dim=6, r=3)
    g = torch.Generator().manual_seed(2)
    z, dz = torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randn(16, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        nll, step = head.nll_and_step(z, dz, mode="mean")
        assert torch.allclose(nll, head.nll(z, dz))
        assert torch.allclose(step, head.mean_step(z))
        nll_s, _ = head.nll_and_step(z, dz, mode="sample", generator=g)
        assert torch.allclose(nll_s, head.nll(z, dz))


def test_samples_put_the_direction_noise_inside_the_subspace():
    head = _head(dim=6, r=2)
    z = torch.randn(1, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).expand(40_000, 6)
    with torch.no_grad():
        draws = head.sample_step(z, torch.Generator().manual_seed(4))
        c = head.components(z[:1])
        mean = head.mean_step(z[:1])[0]
    u = head.basis.double()
    off = draws - (draws @ u) @ u.T - c["mu_off"][0]  # what is left outside the subspace: σ⊥ noise only
    assert float(off.std()) * math.sqrt(6 / 4) == pytest.approx(0.5, rel=0.03)  # 4 of 6 coordinates carry it
    assert torch.allclose(draws.mean(0), mean, atol=0.03)
    assert torch.allclose(c["direction"].norm(dim=-1), torch.ones(1, dtype=torch.float64))


def test_the_basis_is_the_train_steps_principal_subspace(tmp_path):
    data = tiny_dataset(tmp_path, dim=12)
    tr = data._splits["train"]  # noqa: SLF001 (this plugin's own split)
    dz = (tr.frames[tr.pair_index + 1] - tr.frames[tr.pair_index]).double()
    assert torch.allclose(data.spec.dz_cov.double(), torch.cov(dz.T), atol=1e-5)
    head = VMFMagnitudeHead(VMFMagnitudeConfig(hidden=8, layers=1, subspace=3), BuildContext(spec=data.spec))
    top = torch.linalg.eigh(torch.cov(dz.T))[1][:, -3:]
    proj_head, proj_top = head.basis.double() @ head.basis.double().T, top @ top.T
    assert torch.allclose(proj_head, proj_top, atol=1e-4)
    assert head.sphere_dim == 3 and head.direction.out_features == 3


def test_subspace_errors_are_one_line_config_errors():
    spec = DataSpec("test", dim=4, dz_max_norm=1.0)  # no dz_cov
    with pytest.raises(ConfigError, match="dz_cov"):
        VMFMagnitudeHead(VMFMagnitudeConfig(subspace=2), BuildContext(spec=spec))
    with pytest.raises(ConfigError, match="below the data's D = 3"):
        _head(dim=3, r=3)
    head = _head(dim=6, r=2)
    memory = BasisMemory(BasisMemoryConfig(prototypes=4), BuildContext(spec=DataSpec("test", dim=6)))
    with pytest.raises(ConfigError, match="subspace = 0"):
        head.attach_memory(memory, "direction")
