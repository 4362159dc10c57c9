"""Memories: the core contract kit plus each memory's own invariants."""

from __future__ import annotations

import pytest
import torch
from audio_mimi_testutil import PairData, fit_context, spec, tiny_head
from engram_audio_mimi.memories import (
    BasisMemory,
    BasisMemoryConfig,
    GatedResidualConfig,
    GatedResidualMemory,
    HybridMemory,
    KMeansMemory,
    KMeansMemoryConfig,
    ResidualTopKConfig,
    ResidualTopKMemory,
    kmeans,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_core.components import BuildContext, Model
from engram_core.config import ConfigError
from engram_core.nn import soft_topk
from engram_core.testing import MemoryContract

DIM = 6
SETTINGS = settings(max_examples=5, deadline=None)


def build(cls, cfg, seed=0, head=None):
    head = head or tiny_head(DIM)
    mem = cls(cfg, BuildContext(spec=spec(DIM), head=head, seed=seed))
    Model(head, mem, "residual")
    return head, mem


def fitted(cls, cfg, seed=0):
    head, mem = build(cls, cfg, seed)
    mem.fit(fit_context(head_model(head, mem), PairData(DIM), seed), **fit_options(mem))
    return head, mem


def fit_options(mem):
    return {"iters": 5, "gate_steps": 5} if isinstance(mem, (GatedResidualMemory, HybridMemory)) else {"iters": 5}


def head_model(head, mem):
    m = Model.__new__(Model)
    torch.nn.Module.__init__(m)
    m.head, m.memory = head, mem
    return m


class _Contract(MemoryContract):
    cls = None
    cfg = None

    def make_memory(self, seed):
        return build(self.cls, self.cfg, seed)[1]

    def prepare(self, memory):
        memory.fit(fit_context(head_model(memory._head, memory), PairData(DIM), 0), **fit_options(memory))

    def make_inputs(self, batch_size, generator):
        return {
            "z": torch.randn(batch_size, DIM, generator=generator),
            "mu": torch.randn(batch_size, DIM, generator=generator),
            "log_sigma": 0.1 * torch.randn(batch_size, DIM, generator=generator),
        }

    def run(self, memory, inputs):
        return memory(inputs["z"], inputs["mu"], inputs["log_sigma"])


class TestKMeansContract(_Contract):
    cls, cfg = KMeansMemory, KMeansMemoryConfig(k=8)


class TestResidualTopKContract(_Contract):
    cls, cfg = ResidualTopKMemory, ResidualTopKConfig(k=8, topk=3)


class TestGatedResidualContract(_Contract):
    cls, cfg = GatedResidualMemory, GatedResidualConfig(k=8, topk=3)


class TestHybridContract(_Contract):
    cls, cfg = HybridMemory, GatedResidualConfig(k=8, topk=3)


class TestBasisContract(_Contract):
    cls, cfg = BasisMemory, BasisMemoryConfig(prototypes=4)


# ---- own invariants ------------------------------------------------------------------------


@SETTINGS
@given(seed=st.integers(0, 1000), topk=st.integers(1, 8), tau=st.floats(0.01, 10.0))
def test_residual_topk_weights_sum_to_one(seed, topk, tau):
    _, mem = fitted(ResidualTopKMemory, ResidualTopKConfig(k=8, topk=topk, tau=tau))
    z = torch.randn(5, DIM, generator=torch.Generator().manual_seed(seed))
    got, idx, w = mem.retrieve(z)
    assert idx.shape == (5, topk)
    ref, _ = soft_topk(z, mem.keys, mem.values, topk, float(mem.tau))  # the core's retrieval
    assert torch.allclose(got, ref, atol=1e-6)
    assert torch.allclose(w.sum(-1), torch.ones(5), atol=1e-5)
    assert (w >= 0).all()


@SETTINGS
@given(seed=st.integers(0, 1000))
def test_zero_residual_store_changes_nothing(seed):
    for cls, cfg in [(ResidualTopKMemory, ResidualTopKConfig(k=8)), (GatedResidualMemory, GatedResidualConfig(k=8))]:
        _, mem = fitted(cls, cfg)
        mem.values.zero_()
        g = torch.Generator().manual_seed(seed)
        z, mu, ls = torch.randn(4, DIM, generator=g), torch.randn(4, DIM, generator=g), torch.randn(4, DIM, generator=g)
        out_mu, out_ls = mem(z, mu, ls)
        assert torch.equal(out_mu, mu) and torch.equal(out_ls, ls)


@SETTINGS
@given(seed=st.integers(0, 1000))
def test_closed_gate_passes_parametric_prediction(seed):
    for cls in (GatedResidualMemory, HybridMemory):
        _, mem = fitted(cls, GatedResidualConfig(k=8, gate_init=-1e4))
        g = torch.Generator().manual_seed(seed)
        z, mu, ls = torch.randn(4, DIM, generator=g), torch.randn(4, DIM, generator=g), torch.randn(4, DIM, generator=g)
        out_mu, out_ls = mem(z, mu, ls)
        assert torch.equal(out_mu, mu) and torch.equal(out_ls, ls)


def test_open_gate_hybrid_is_memory_prediction():
    _, mem = fitted(HybridMemory, GatedResidualConfig(k=8, gate_init=1e4))
    z, mu = torch.randn(4, DIM), torch.randn(4, DIM)
    out_mu, _ = mem(z, mu, torch.zeros(4, DIM))
    assert torch.allclose(out_mu, mem.correction(z), atol=1e-6)


def test_built_basis_changes_nothing_and_weights_sum_to_one():
    _, mem = build(BasisMemory, BasisMemoryConfig(prototypes=5))
    z, mu, ls = torch.randn(4, DIM), torch.randn(4, DIM), torch.randn(4, DIM)
    out_mu, out_ls = mem(z, mu, ls)
    assert torch.equal(out_mu, mu) and torch.equal(out_ls, ls)
    assert torch.allclose(mem.attention(z).sum(-1), torch.ones(4), atol=1e-6)


def test_kmeans_memory_is_memory_only_and_matches_cluster_stats():
    head, mem = fitted(KMeansMemory, KMeansMemoryConfig(k=8, min_var=1e-6))
    data = PairData(DIM)
    from engram_audio_mimi.memories import nearest

    idx = nearest(data.z, mem.keys)
    mu, ls = mem(data.z, torch.full((200, DIM), 99.0), torch.zeros(200, DIM))
    for c in idx.unique()[:3]:
        members = data.dz[idx == c]
        assert torch.allclose(mu[idx == c][0], members.mean(0), atol=1e-4)
        if members.shape[0] > 1:
            var = members.var(0, unbiased=False).clamp_min(1e-6)
            assert torch.allclose(ls[idx == c][0], 0.5 * var.log(), atol=1e-3)


def test_residual_values_are_mean_residuals():
    head, mem = fitted(ResidualTopKMemory, ResidualTopKConfig(k=8, topk=1))
    data = PairData(DIM)
    with torch.no_grad():
        resid = data.dz - head.predict_param(data.z)[0]
    from engram_audio_mimi.memories import nearest

    idx = nearest(data.z, mem.keys)
    for c in idx.unique()[:3]:
        assert torch.allclose(mem.values[c], resid[idx == c].mean(0), atol=1e-4)
    # with topk = 1 retrieval returns exactly the nearest key's value
    got, _, _ = mem.retrieve(data.z[:5])
    assert torch.allclose(got, mem.values[idx[:5]], atol=1e-5)


def test_residual_memory_improves_fit_on_its_training_data():
    head, mem = fitted(ResidualTopKMemory, ResidualTopKConfig(k=32, topk=1))
    data = PairData(DIM)
    with torch.no_grad():
        mu_p, _ = head.predict_param(data.z)
        mu_m, _ = mem(data.z, mu_p, torch.zeros_like(mu_p))
    assert (data.dz - mu_m).pow(2).mean() < (data.dz - mu_p).pow(2).mean()


def test_kmeans_spherical_returns_unit_centroids():
    x = torch.randn(100, 5)
    c, labels = kmeans(x, 4, 10, torch.Generator().manual_seed(0), spherical=True)
    assert torch.allclose(c.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert labels.shape == (100,) and int(labels.max()) < 4


def test_fit_options_are_checked():
    head, mem = build(ResidualTopKMemory, ResidualTopKConfig(k=8))
    with pytest.raises(ConfigError, match="iters"):
        mem.fit(fit_context(head_model(head, mem), PairData(DIM)), iters=0)
    with pytest.raises(ConfigError, match="topk"):
        build(ResidualTopKMemory, ResidualTopKConfig(k=4, topk=8))


def test_gate_fit_lowers_the_nll():
    head, mem = build(GatedResidualMemory, GatedResidualConfig(k=16, topk=2, gate_init=-3.0))
    data = PairData(DIM)
    ctx = fit_context(head_model(head, mem), data)
    mem.fit(ctx, iters=5, gate_steps=0)
    from engram_core.nn import gaussian_nll

    def nll():
        with torch.no_grad():
            return float(gaussian_nll(*mem(data.z, *head.predict_param(data.z)), data.dz))

    before, g0 = nll(), float(mem.gate(data.z).detach().mean())
    mem.fit(ctx, iters=5, gate_steps=100)
    assert nll() < before and float(mem.gate(data.z).detach().mean()) > g0


# ---- layout: what checkpoints hold, and a flat class tree ------------------------------------

_GATE = ["gate_layer.weight", "gate_layer.bias"]
_STORE = ["keys", "values", "tau", "counts"]


@pytest.mark.parametrize(
    "cls, cfg, names",
    [
        (KMeansMemory, KMeansMemoryConfig(k=8), ["keys", "mean", "log_var", "counts", "fitted"]),
        (ResidualTopKMemory, ResidualTopKConfig(k=8), _STORE),
        (GatedResidualMemory, GatedResidualConfig(k=8), _STORE + _GATE),
        (HybridMemory, GatedResidualConfig(k=8), _STORE + _GATE),
        (BasisMemory, BasisMemoryConfig(prototypes=4),
         ["prototypes", "confidence", "query.weight", "query.bias", "scale.weight", "scale.bias"]),
    ],
)
def test_state_dict_names_are_those_saved_checkpoints_hold(cls, cfg, names):
    """Checkpoints and cached runs written before the memories moved into one module each
    (and before gated_residual and hybrid stopped inheriting residual_topk) must load."""
    _, mem = build(cls, cfg)
    assert list(mem.state_dict()) == names
    _, other = build(cls, cfg, seed=1)
    other.load_state_dict(mem.state_dict())  # strict: no key missing or unexpected


def test_every_memory_is_at_most_two_classes_below_memory():
    from engram_core.components import Memory
    from engram_core.registry import load_registry

    mine = [c.factory for c in load_registry().components["memories"].values() if c.plugin == "audio-mimi"]
    assert len(mine) == 5
    for cls in mine:
        below = [k for k in cls.__mro__ if issubclass(k, Memory) and k is not Memory]
        assert len(below) <= 2, (cls.__name__, [k.__name__ for k in below])
