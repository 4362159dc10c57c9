"""hrr against the `trace` point's contract, on the core backbone's width and vocabulary."""

import torch
from engram_deq_hrr.memory import HRRMemory, HRRMemoryConfig

from engram_core.testing.points import TracePointContract, backbone_build


class TestHRRTracePoint(TracePointContract):
    def make_memory(self, seed):
        return HRRMemory(HRRMemoryConfig(dim=32, cleanup_mode="softmax"), backbone_build(width=self.width, vocab_size=20, seed=seed))


class TestHRRBucketedTracePoint(TracePointContract):
    def make_memory(self, seed):
        return HRRMemory(HRRMemoryConfig(dim=32, n_buckets=4, renorm="none", cleanup_mode="none"), backbone_build(width=self.width, seed=seed))


def test_one_query_read_matches_the_deq_heads_call():
    """The point's read at one query equals the memory's own forward (what the DEQ head calls)."""
    torch.manual_seed(0)
    m = HRRMemory(HRRMemoryConfig(dim=32), backbone_build(width=16, vocab_size=10)).eval()
    g = torch.Generator().manual_seed(1)
    states, query = torch.randn(2, 9, 16, generator=g), torch.randn(2, 16, generator=g)
    mask = torch.ones(2, 9)
    with torch.no_grad():
        full = m(states, query, mask)["out"]
        point = m.read_trace(m.write_trace(states, mask), query[:, None])[:, 0]
    assert torch.allclose(full, point, atol=1e-5)
