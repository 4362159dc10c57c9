"""The hrr memory: contract kit, closed gate, per-write renormalisation, cleanup, errors."""

import pytest
import torch
import torch.nn.functional as F
from engram_deq_hrr.hrr import bind, cosine
from engram_deq_hrr.memories import HRRMemory, HRRMemoryConfig

from engram_core.components import BuildContext, DataSpec
from engram_core.config import ConfigError, structure
from engram_core.testing import MemoryContract

H, T, D, C = 16, 12, 32, 5


class _Head(torch.nn.Module):
    state_dim = H


def make(seed=0, **kw) -> HRRMemory:
    torch.manual_seed(seed)
    spec = DataSpec("test", n_classes=C)
    return HRRMemory(HRRMemoryConfig(dim=D, **kw), BuildContext(spec=spec, head=_Head(), seed=seed))


def inputs(batch_size, g):
    return {"states": torch.randn(batch_size, T, H, generator=g), "query": torch.randn(batch_size, H, generator=g)}


class TestHRRContract(MemoryContract):
    def make_memory(self, seed):
        return make(seed)

    def make_inputs(self, batch_size, generator):
        return inputs(batch_size, generator)

    def run(self, memory, x):
        return memory(x["states"], x["query"])["out"]


class TestHRRContractUnitaryInverse(TestHRRContract):
    def make_memory(self, seed):
        return make(seed, unitary_keys=True, unbind="inverse", renorm="final", cleanup_mode="hard", tie_query_key=False)


def test_closed_read_gate_passes_the_state_through():
    m = make(read_gate_bias=-1e4)
    x = inputs(3, torch.Generator().manual_seed(0))
    out = m(x["states"], x["query"])
    assert torch.equal(out["out"], torch.zeros(3, H))


@pytest.mark.parametrize("n_buckets", [1, 3])
@pytest.mark.parametrize("renorm", ["per_write", "none", "final"])
@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.0])
def test_write_matches_the_sequential_definition(n_buckets, renorm, alpha):
    if renorm == "per_write" and alpha != 1.0:
        pytest.skip("α < 1 is refused under per_write renormalisation (test_alpha_under_per_write_renorm)")
    m = make(alpha=alpha, beta=0.7, n_buckets=n_buckets, renorm=renorm)
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, T, D, generator=g), torch.randn(2, T, D, generator=g)
    gates = torch.rand(2, T, generator=g)
    buckets = m.buckets(k)
    trace = m.write(k, v, gates, buckets)
    ref = torch.zeros(2, n_buckets, D)
    for t in range(T):
        for i in range(2):
            b = buckets[i, t]
            ref[i, b] = alpha * ref[i, b] + 0.7 * gates[i, t] * bind(k[i, t], v[i, t])
            if renorm == "per_write":
                ref[i, b] = ref[i, b] / ref[i, b].norm()
    if renorm == "final":
        ref = ref / ref.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    assert trace.shape == (2, n_buckets, D)
    assert torch.allclose(trace, ref, atol=1e-4)


def test_alpha_under_per_write_renorm():
    """Under per-write renormalisation (α, β) and (1, β/α) give the same trace, so α < 1 is refused."""
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(T, D, generator=g), torch.randn(T, D, generator=g)
    gates = torch.rand(T, generator=g)

    def sequential(alpha, beta):
        m = torch.zeros(D)
        for t in range(T):
            m = alpha * m + beta * gates[t] * bind(k[t], v[t])
            m = m / m.norm()
        return m

    assert torch.allclose(sequential(0.99, 0.5), sequential(1.0, 0.5 / 0.99), atol=1e-5)
    with pytest.raises(ConfigError, match=r"beta = 0\.505051"):
        structure({"alpha": 0.99, "beta": 0.5}, HRRMemoryConfig)
    # a real decay where renormalisation does not undo it: older writes weigh less
    assert structure({"alpha": 0.9, "renorm": "final"}, HRRMemoryConfig).alpha == 0.9


def test_buckets_are_deterministic_and_used():
    m = make(n_buckets=4)
    k = torch.randn(64, D)
    b = m.buckets(k)
    assert torch.equal(b, make(n_buckets=4).buckets(k)) and b.unique().numel() == 4
    # a query reads exactly the bucket its key wrote to: one pair per bucket reads back cleanly
    m_u = make(n_buckets=4, unitary_keys=True)
    h = torch.randn(1, 6, H)
    keys, values = m_u.keys(h), m_u.values(h)
    traces = m_u.write(keys, values, torch.ones(1, 6))
    raw = m_u.read(traces, keys[:, 0])
    same = int((m_u.buckets(keys) == m_u.buckets(keys[:, 0])[:, None]).sum())
    assert cosine(raw, values[:, 0]).item() > 1 / same ** 0.5 - 0.25


def test_no_renorm_is_the_decayed_sum():
    m = make(alpha=0.5, renorm="none")  # α is a forgetting factor without per-write renormalisation
    k, v = torch.randn(1, 3, D), torch.randn(1, 3, D)
    trace = m.write(k, v, torch.ones(1, 3))[:, 0]
    ref = 0.25 * bind(k[:, 0], v[:, 0]) + 0.5 * bind(k[:, 1], v[:, 1]) + bind(k[:, 2], v[:, 2])
    assert torch.allclose(trace, ref, atol=1e-5)


def test_unitary_single_write_reads_back_exactly():
    m = make(unitary_keys=True)
    h = torch.randn(2, 1, H)
    k, v = m.keys(h), m.values(h)
    trace = m.write(k, v, torch.ones(2, 1))
    raw = m.read(trace, k[:, 0])
    assert cosine(raw, v[:, 0]).min() > 0.999


def test_cleanup_softmax_sharpening_and_hard():
    m = make(cleanup_mode="softmax", sharpen_topk=2, sharpen_temp=0.5)
    raw = torch.randn(4, D)
    cleaned, scores = m.cleanup(raw)
    protos = F.normalize(m.prototypes, dim=-1)
    weights = torch.linalg.lstsq(protos.T, cleaned.T).solution.T  # recover the mixture weights
    assert torch.allclose(weights.sum(-1), torch.ones(4), atol=1e-3)
    assert ((weights.abs() > 1e-3).sum(-1) <= 2).all()  # only the top-2 prototypes mix
    hard = make(cleanup_mode="hard")
    cleaned, scores = hard.cleanup(raw)
    assert torch.allclose(cleaned, F.normalize(hard.prototypes, dim=-1)[scores.argmax(-1)], atol=1e-5)


def test_detach_writes_stops_gradient_into_the_write_path():
    m = make()
    states = torch.randn(2, T, H, requires_grad=True)
    query = torch.randn(2, H)
    m(states, query, detach_writes=True)["out"].sum().backward()
    assert states.grad is None
    assert m.write_gate.weight.grad is None


def test_oracle_mix_one_reads_the_target_prototype():
    m = make()
    out = m(torch.randn(3, T, H), torch.randn(3, H), oracle=torch.tensor([0, 2, 4]), oracle_mix=1.0)
    assert torch.allclose(out["cleaned"], F.normalize(m.prototypes, dim=-1)[[0, 2, 4]])


def test_stats_and_reset():
    m = make().eval()
    x = inputs(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        m(x["states"], x["query"])
    assert m.stats()["trace_norm"] > 0 and "write_gates" in m.histograms()
    m.reset()
    assert m.stats()["trace_norm"] == 0 and m.histograms() == {}


@pytest.mark.parametrize("bad,match", [
    ({"dim": 100 + 1}, "not suited to the FFT path"),
    ({"dim": 2 * 53}, "prime factor 53"),
    ({"alpha": 1.5}, "alpha"),
    ({"cleanup_mode": "softmx"}, "did you mean 'softmax'"),
])
def test_bad_config(bad, match):
    with pytest.raises(ConfigError, match=match):
        structure(bad, HRRMemoryConfig)


def test_the_old_module_path_still_imports_with_a_deprecation_warning():
    import importlib
    import sys

    sys.modules.pop("engram_deq_hrr.memory", None)
    with pytest.warns(DeprecationWarning, match="engram_deq_hrr.memories"):
        old = importlib.import_module("engram_deq_hrr.memory")
    assert old.HRRMemory is HRRMemory and old.HRRMemoryConfig is HRRMemoryConfig
