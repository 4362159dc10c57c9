"""Heads, objectives and metrics on small synthetic data."""

from __future__ import annotations

import math

import pytest
import torch
from audio_mimi_testutil import spec, tiny_dataset, tiny_head
from engram_audio_mimi.distributions import VonMisesFisher
from engram_audio_mimi.heads import VMFMagnitudeConfig, VMFMagnitudeHead, baseline_nll
from engram_audio_mimi.memories import GatedResidualConfig, GatedResidualMemory
from engram_audio_mimi.metrics import (
    ArchetypesConfig,
    ArchetypesMetric,
    DirectionCosConfig,
    DirectionCosMetric,
    DnllConfig,
    DnllMetric,
    GateMeanConfig,
    GateMeanMetric,
    KappaStatsConfig,
    KappaStatsMetric,
    RolloutMetric,
    RolloutMetricConfig,
)
from engram_audio_mimi.objectives import (
    MixedConfig,
    MixedObjective,
    OneStepNLL,
    OneStepNLLConfig,
    RolloutNLL,
    RolloutNLLConfig,
    rollout,
)

from engram_core.components import BuildContext, EvalContext, Model
from engram_core.nn import diagonal_gaussian_nll_per_item

D = 8


def vmf_head(seed=0, **kw):
    torch.manual_seed(seed)
    return VMFMagnitudeHead(VMFMagnitudeConfig(hidden=16, layers=1, **kw), BuildContext(spec=spec(D)))


def test_gaussian_head_nll_and_steps():
    head = tiny_head(D)
    z, dz = torch.randn(5, D), torch.randn(5, D)
    mu, ls = head.predict(z)
    assert torch.allclose(head.nll(z, dz), diagonal_gaussian_nll_per_item(mu, ls, dz))
    assert torch.equal(head.mean_step(z), mu)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    assert torch.equal(head.sample_step(z, g()), head.sample_step(z, g()))


def test_vmf_head_nll_is_a_density_of_dz():
    head = vmf_head(kappa_coupling="learned")
    z, dz = torch.randn(5, D), torch.randn(5, D)
    c = head.components(z)
    m = dz.norm(dim=-1)
    u = dz / m[:, None]
    manual = (
        -torch.distributions.Normal(c["mu_log_m"], c["log_sigma_log_m"].exp()).log_prob(m.log())
        - VonMisesFisher(c["direction"], c["kappa"]).log_prob(u)
        + D * m.log()
    )
    assert torch.allclose(head.nll(z, dz), manual, atol=1e-5)
    head.nll(z, dz).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


def test_vmf_head_nll_integrates_to_one_in_2d():
    # D = 2: integrate exp(−nll) over a polar grid of Δz
    torch.manual_seed(0)
    head = VMFMagnitudeHead(VMFMagnitudeConfig(hidden=8, layers=1), BuildContext(spec=spec(2)))
    z = torch.randn(1, 2)
    r = torch.linspace(1e-4, 30, 1500, dtype=torch.float64)
    th = torch.linspace(-math.pi, math.pi, 361, dtype=torch.float64)
    rr, tt = torch.meshgrid(r, th, indexing="ij")
    pts = torch.stack([rr * torch.cos(tt), rr * torch.sin(tt)], -1).reshape(-1, 2).float()
    with torch.no_grad():
        dens = torch.exp(-head.nll(z.expand(pts.shape[0], 2), pts)).double().reshape(rr.shape) * rr
    total = torch.trapezoid(torch.trapezoid(dens, th, dim=1), r)
    assert abs(float(total) - 1) < 0.02


def test_vmf_mean_step_and_samples():
    head = vmf_head()
    z = torch.randn(3, D).repeat(4000, 1)
    with torch.no_grad():
        draws = head.sample_step(z, torch.Generator().manual_seed(0)).reshape(4000, 3, D)
        mean = head.mean_step(z[:3])
    assert torch.allclose(draws.mean(0), mean, atol=0.1 * float(mean.norm(dim=-1).max()) + 0.05)


def test_rollout_k1_equals_one_step_and_states_follow_the_mean():
    head = tiny_head(D)
    model = Model(head)
    z0, dz = torch.randn(4, D), torch.randn(4, 3, D)
    out = rollout(head, z0, dz)
    assert torch.allclose(out["nll"][:, 0], head.nll(z0, dz[:, 0]))
    z1 = z0 + head.mean_step(z0)
    assert torch.allclose(out["nll"][:, 1], head.nll(z1, dz[:, 1]))
    assert torch.allclose(out["norm"][:, 0], z1.norm(dim=-1))
    one, _ = OneStepNLL(OneStepNLLConfig(), BuildContext())(model, {"z": z0, "dz": dz[:, 0]})
    k1, _ = RolloutNLL(RolloutNLLConfig(horizon=1), BuildContext())(model, {"z0": z0, "dz": dz[:, :1]})
    assert torch.allclose(one, k1)


def test_clip_stabiliser_bounds_the_state():
    head = tiny_head(D)
    with torch.no_grad():
        head.mu.bias.fill_(5.0)  # a head that drifts away
    with torch.no_grad():
        out = rollout(head, torch.zeros(2, D), torch.zeros(2, 6, D), clip_norm=3.0)
    assert float(out["norm"].max()) <= 3.0 + 1e-5
    assert int(out["clipped"].sum()) > 0


def test_sampled_rollout_is_reproducible_from_the_batch_seed(tmp_path):
    ds = tiny_dataset(tmp_path, dim=D)
    head = tiny_head(D)
    obj = RolloutNLL(RolloutNLLConfig(horizon=4, rollout="sample"), BuildContext(spec=ds.spec, dataset=ds))
    b1 = obj.sample(ds, "train", 8, torch.Generator().manual_seed(0))
    b2 = obj.sample(ds, "train", 8, torch.Generator().manual_seed(0))
    l1, _ = obj(Model(head), b1)
    l2, _ = obj(Model(head), b2)
    assert torch.equal(l1, l2)
    l1.backward()
    assert head.mu.weight.grad is not None


def test_mixed_is_one_step_plus_lambda_rollout(tmp_path):
    ds = tiny_dataset(tmp_path, dim=D)
    head = tiny_head(D)
    model = Model(head)
    build = BuildContext(spec=ds.spec, dataset=ds)
    batch = MixedObjective(MixedConfig(horizon=4, lam=0.5), build).sample(
        ds, "train", 8, torch.Generator().manual_seed(0)
    )
    loss, terms = MixedObjective(MixedConfig(horizon=4, lam=0.5), build)(model, batch)
    roll, _ = RolloutNLL(RolloutNLLConfig(horizon=4), build)(model, batch)
    one, _ = OneStepNLL(OneStepNLLConfig(), build)(model, batch)
    assert torch.allclose(loss, one + 0.5 * roll)
    assert torch.allclose(terms["nll"], one)


# ---- metrics ------------------------------------------------------------------------------


def run_metric(metric, model, ds, batch_size=64):
    metric.bind(EvalContext(model, ds, "eval", 0, "test", None, batch_size, torch.device("cpu")))
    metric.reset()
    with torch.no_grad():
        for b in metric.batches(ds, "eval", batch_size):
            metric.update(model, b)
    return metric.compute()


class BaselineHead(torch.nn.Module):
    """Predicts the unconditional baseline everywhere: dnll must be exactly zero."""

    def __init__(self, spec_):
        super().__init__()
        self.spec = spec_

    def predict(self, z):
        n = z.shape[0]
        return self.spec.dz_mean.expand(n, -1), self.spec.dz_log_std.expand(n, -1)


def test_dnll_of_the_baseline_is_zero(tmp_path):
    ds = tiny_dataset(tmp_path, dim=D)
    model = Model(BaselineHead(ds.spec))
    out = run_metric(DnllMetric(DnllConfig(), BuildContext()), model, ds)
    assert abs(out["dnll"]) < 1e-6
    z, dz, _ = ds.pairs("eval")
    assert out["nll"] == pytest.approx(float(baseline_nll(ds.spec, dz).mean()), rel=1e-5)


def test_direction_cos_and_rollout_metrics(tmp_path):
    ds = tiny_dataset(tmp_path, dim=D)
    model = Model(tiny_head(D))
    cos = run_metric(DirectionCosMetric(DirectionCosConfig(), BuildContext()), model, ds)["direction_cos"]
    assert -1 <= cos <= 1
    build = BuildContext(spec=ds.spec, dataset=ds)
    r = run_metric(RolloutMetric(RolloutMetricConfig(horizon=4, segments=20, clip_norm=1.0), build), model, ds)
    assert set(r) >= {
        "rollout/dnll",
        "rollout/nonfinite",
        "rollout/max_norm",
        "rollout/n_clipped",
        "rollout/mean_step_norm",
    }
    assert r["rollout/max_norm"] <= 1.0 + 1e-5 and r["rollout/nonfinite"] == 0
    # an exploding head: non-finite states are counted, not averaged in
    head = tiny_head(D)
    with torch.no_grad():
        head.mu.bias.fill_(1e38)
    r = run_metric(RolloutMetric(RolloutMetricConfig(horizon=4, segments=20), build), Model(head), ds)
    assert r["rollout/nonfinite"] == 1.0


def test_gate_mean_and_kappa_stats(tmp_path):
    ds = tiny_dataset(tmp_path, dim=D)
    head = tiny_head(D)
    mem = GatedResidualMemory(GatedResidualConfig(k=4, topk=2, gate_init=0.0), BuildContext(spec=ds.spec, head=head))
    out = run_metric(GateMeanMetric(GateMeanConfig(), BuildContext()), Model(head, mem, "residual"), ds)
    assert out["memory/gate_mean"] == pytest.approx(0.5)
    vh = vmf_head()
    k = run_metric(KappaStatsMetric(KappaStatsConfig(), BuildContext(head=vh)), Model(vh), ds)
    assert k["vmf/kappa_median"] > 0 and 0 <= k["vmf/expected_cos"] <= 1


class ArchetypeData:
    """Δz = one of 4 fixed directions (+ noise); z is that direction, so μ(z) = z is an oracle."""

    def __init__(self, seed):
        g = torch.Generator().manual_seed(seed)
        self.arch = torch.nn.functional.normalize(
            torch.randn(4, D, generator=torch.Generator().manual_seed(99)), dim=-1
        )
        c = torch.randint(0, 4, (400,), generator=g)
        self.z = self.arch[c]
        self.dz = self.arch[c] * torch.exp(0.3 * torch.randn(400, 1, generator=g)) + 0.05 * torch.randn(
            400, D, generator=g
        )

    def pairs(self, split):
        return self.z, self.dz, torch.zeros(400, dtype=torch.long)

    def eval_batches(self, split, batch_size):
        for i in range(0, 400, batch_size):
            yield {"z": self.z[i : i + batch_size], "dz": self.dz[i : i + batch_size]}


class Oracle(torch.nn.Module):
    def mean_step(self, z):
        return z


def test_archetypes_find_shared_directions():
    metric = ArchetypesMetric(ArchetypesConfig(k=4), BuildContext())
    train, evals = ArchetypeData(0), ArchetypeData(1)

    class Both(ArchetypeData):
        def __init__(self):
            pass

        def pairs(self, split):
            return train.pairs(split)

        def eval_batches(self, split, batch_size):
            return evals.eval_batches(split, batch_size)

    out = run_metric(metric, Model(Oracle()), Both())
    assert out["archetypes/tightness"] > 0.95 and out["archetypes/tightness_train"] > 0.95
    assert out["archetypes/centroid_match"] > 0.99
    assert out["archetypes/membership_acc"] > 0.99
    assert 0.25 <= out["archetypes/chance_acc"] < 0.5
    # a model whose mean step ignores the archetype is near chance
    out = run_metric(ArchetypesMetric(ArchetypesConfig(k=4), BuildContext()), Model(tiny_head(D)), Both())
    assert out["archetypes/membership_acc"] < 0.6


def test_vmf_fused_rollout_step_matches_the_separate_computations():
    head = vmf_head(kappa_coupling="learned")
    z, dz = torch.randn(6, D), torch.randn(6, D)
    nll, step = head.nll_and_step(z, dz, "mean")
    assert torch.allclose(nll, head.nll(z, dz), atol=1e-4)
    assert torch.allclose(step, head.mean_step(z), atol=1e-6)
