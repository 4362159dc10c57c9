"""hrr against the `trace` point's contract, on the core backbone's width and vocabulary."""

import torch
from engram_deq_hrr.memories import HRRMemory, HRRMemoryConfig

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


class _SumTrace(torch.nn.Module):
    """A trace memory that knows only the point: the masked sum of projected states."""

    enabled = True

    def __init__(self, width):
        super().__init__()
        self.v = torch.nn.Linear(width, width, bias=False)

    def empty_trace(self, batch_size, device, dtype):
        return torch.zeros(batch_size, self.v.out_features, device=device, dtype=dtype)

    def write_trace(self, states, write_mask, key_states=None):
        return (self.v(states) * write_mask.to(states.dtype).unsqueeze(-1)).sum(1)

    def read_trace(self, trace, queries):
        return queries * 0 + trace.unsqueeze(1)


def test_the_deq_head_calls_any_trace_memory_through_the_point():
    from engram_deq_hrr.data import NeedleConfig, NeedleDataset
    from engram_deq_hrr.head import DEQClassifier, DEQClassifierConfig

    from engram_core.components import BuildContext, Model

    data = NeedleDataset(NeedleConfig(seq_len=16, n_pairs=2, n_train=8, n_eval=8))
    build = BuildContext(spec=data.spec)
    torch.manual_seed(0)
    head = DEQClassifier(DEQClassifierConfig(hidden=16, embed=16, max_iter=5), build)
    batch = data.sample("train", 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = head.forward_classify(batch)
        model = Model(head, _SumTrace(16), "trace")
        with_trace = model.head.forward_detailed(batch)
    assert "memory" not in with_trace  # hrr's diagnostics are hrr's, not the point's
    assert with_trace["logits"].shape == plain.shape and not torch.allclose(with_trace["logits"], plain)
