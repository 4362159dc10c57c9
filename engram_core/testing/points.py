"""Contract tests per attachment point (engram_core.points), for any memory, ours or not.

Subclass the point's contract in your tests and implement ``make_memory(seed)`` (build
it, e.g. with `backbone_build`); pytest collects the inherited tests::

    from engram_core.testing.points import TracePointContract, backbone_build

    class TestMyTrace(TracePointContract):
        def make_memory(self, seed):
            torch.manual_seed(seed)
            return MyTrace(MyTraceConfig(), backbone_build(width=self.width))

Each contract checks what the head relies on at that point (shapes, masks, the cached
generation step, what an empty or closed memory returns). The generic invariants
(state_dict round trip, reset, ...) are `engram_core.testing.MemoryContract`'s.
"""

from __future__ import annotations

import pytest
import torch

from ..components import BuildContext, DataSpec
from ..points import implements


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, atol: float, rtol: float = 1e-5) -> None:
    """`torch.allclose`, failing with the numbers: shapes, the largest difference and where."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    a, e = actual.detach().float(), expected.detach().float()
    if torch.allclose(a, e, atol=atol, rtol=rtol):
        return
    diff = (a - e).abs()
    where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape)) if diff.numel() else ()
    flat = diff.argmax()
    raise AssertionError(f"{what}: max |difference| {diff.max().item():.4g} at index {where} "
                         f"(got {a.flatten()[flat].item():.6g}, expected {e.flatten()[flat].item():.6g}; "
                         f"atol {atol:g}, rtol {rtol:g}; {int((diff > atol + rtol * e.abs()).sum())} of {diff.numel()} elements differ)")


def assert_shape(actual: torch.Tensor, expected: tuple[int, ...] | torch.Size, what: str) -> None:
    assert tuple(actual.shape) == tuple(expected), f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected)}"


def backbone_build(width: int = 32, vocab_size: int = 64, n_layers: int = 2, seed: int = 0, **spec) -> BuildContext:
    """A BuildContext whose head is a small core `causal_backbone` (what memories read:
    width, state_dim, memory_dims, token_embeddings) on a data spec with `vocab_size`."""
    from ..builtin.backbone import CausalBackbone, CausalBackboneConfig

    fields = {"vocab_size": vocab_size, "max_len": 64, **spec}
    data = DataSpec("contract", **fields)
    head = CausalBackbone(CausalBackboneConfig(dim=width, n_layers=n_layers, n_heads=4 if width % 4 == 0 else 1), BuildContext(spec=data, seed=seed))
    return BuildContext(spec=data, head=head, seed=seed)


class _PointContract:
    point: str = ""
    width: int = 32
    batch_size: int = 3
    atol: float = 1e-5

    def make_memory(self, seed: int):
        raise TypeError(f"{type(self).__name__} must implement make_memory(seed)")

    def _fresh(self, seed: int = 0):
        torch.manual_seed(seed)
        m = self.make_memory(seed)
        m.eval()
        return m

    def test_implements_the_point(self):
        m = self._fresh()
        assert implements(m, self.point), f"{type(m).__name__} does not implement the '{self.point}' point"


class ResidualPointContract(_PointContract):
    """``apply_residual(z, mu, log_sigma)`` keeps shapes; `close(memory)` (optional) must
    make it return its inputs unchanged."""

    point = "residual"

    def close(self, memory) -> None:
        pytest.skip("no close(memory) given: this memory has no closed state to check")

    def _inputs(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        b, d = self.batch_size, self.width
        return torch.randn(b, d, generator=g), torch.randn(b, d, generator=g), torch.randn(b, d, generator=g)

    def test_shapes(self):
        z, mu, ls = self._inputs(0)
        with torch.no_grad():
            mu2, ls2 = self._fresh().apply_residual(z, mu, ls)
        assert_shape(mu2, mu.shape, "apply_residual: mu")
        assert_shape(ls2, ls.shape, "apply_residual: log_sigma")

    def test_closed_passes_through(self):
        m = self._fresh()
        self.close(m)
        z, mu, ls = self._inputs(1)
        with torch.no_grad():
            mu2, ls2 = m.apply_residual(z, mu, ls)
        assert_close(mu2, mu, "closed memory: mu should pass through", self.atol)
        assert_close(ls2, ls, "closed memory: log_sigma should pass through", self.atol)


class LayerPointContract(_PointContract):
    """``apply_layer(index, hidden, ids)``: shapes; blocks outside `layer_indices()` and a
    closed gate (`close(memory)`, optional) pass hidden through; a cached step (the last
    position's hidden, every id so far) equals the full forward at that position."""

    point = "layer"
    vocab_size: int = 64
    seq_len: int = 12

    def close(self, memory) -> None:
        pytest.skip("no close(memory) given: this memory has no gate to close")

    def _inputs(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        hidden = torch.randn(self.batch_size, self.seq_len, self.width, generator=g)
        ids = torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len), generator=g)
        return hidden, ids

    def test_shape(self):
        m = self._fresh()
        h, ids = self._inputs(0)
        with torch.no_grad():
            for i in m.layer_indices():
                assert_shape(m.apply_layer(i, h, ids), h.shape, f"apply_layer({i}, hidden, ids)")

    def test_other_blocks_pass_through(self):
        m = self._fresh()
        h, ids = self._inputs(1)
        other = max(m.layer_indices()) + 1
        with torch.no_grad():
            assert_close(m.apply_layer(other, h, ids), h, f"apply_layer({other}) outside layer_indices() should pass hidden through", 0.0, 0.0)

    def test_closed_gate_passes_through(self):
        m = self._fresh()
        self.close(m)
        h, ids = self._inputs(2)
        with torch.no_grad():
            for i in m.layer_indices():
                assert_close(m.apply_layer(i, h, ids), h, f"closed gate: apply_layer({i}) should pass hidden through", self.atol)

    def test_cached_step_matches_full_forward(self):
        m = self._fresh()
        h, ids = self._inputs(3)
        with torch.no_grad():
            for i in m.layer_indices():
                full = m.apply_layer(i, h, ids)
                for t in (1, self.seq_len // 2, self.seq_len):
                    step = m.apply_layer(i, h[:, t - 1 : t], ids[:, :t])
                    assert_close(step, full[:, t - 1 : t], f"apply_layer({i}): cached step at position {t - 1} vs the full forward", self.atol)


class ContextPointContract(_PointContract):
    """``write_context(ids, mask)`` → (B, *context_shape()) with the head's width;
    masked-out tokens do not change it; items are independent."""

    point = "context"
    vocab_size: int = 64
    seq_len: int = 12

    def _inputs(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len), generator=g)
        mask = torch.ones_like(ids)
        mask[:, self.seq_len // 2 :] = 0
        return ids, mask

    def test_declared_shape(self):
        m = self._fresh()
        ids, mask = self._inputs(0)
        k, w = m.context_shape()
        with torch.no_grad():
            out = m.write_context(ids, mask)
        assert_shape(out, (self.batch_size, k, w), "write_context(ids, mask) vs (batch, *context_shape())")
        assert w == self.width, f"context width {w} is not the head's width {self.width}"

    def test_masked_tokens_do_not_matter(self):
        m = self._fresh()
        ids, mask = self._inputs(1)
        other = ids.clone()
        other[mask == 0] = (other[mask == 0] + 1) % self.vocab_size
        with torch.no_grad():
            assert_close(m.write_context(other, mask), m.write_context(ids, mask), "write_context: changing masked-out tokens changed it", self.atol)

    def test_items_independent(self):
        m = self._fresh()
        ids, mask = self._inputs(2)
        with torch.no_grad():
            full = m.write_context(ids, mask)
            one = m.write_context(ids[1:2], mask[1:2])
        assert_close(one, full[1:2], "write_context: item 1 alone vs in the batch", self.atol)


class TracePointContract(_PointContract):
    """``empty_trace / write_trace / read_trace``: a read before any write (or after an
    all-zero write mask) is zeros; masked-out positions do not change the trace; reads
    do not change it; (B, Q, D) out; items are independent."""

    point = "trace"
    seq_len: int = 10
    n_queries: int = 4

    def _inputs(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        states = torch.randn(self.batch_size, self.seq_len, self.width, generator=g)
        mask = torch.ones(self.batch_size, self.seq_len, dtype=torch.long)
        mask[:, ::3] = 0
        queries = torch.randn(self.batch_size, self.n_queries, self.width, generator=g)
        return states, mask, queries

    def test_read_before_write_is_zero(self):
        m = self._fresh()
        _, _, q = self._inputs(0)
        with torch.no_grad():
            out = m.read_trace(m.empty_trace(self.batch_size, q.device, q.dtype), q)
        assert_shape(out, q.shape, "read_trace(empty_trace, queries)")
        assert_close(out, torch.zeros_like(out), "read before any write should be zeros", 0.0, 0.0)

    def test_all_zero_write_mask_reads_zero(self):
        m = self._fresh()
        s, mask, q = self._inputs(1)
        with torch.no_grad():
            out = m.read_trace(m.write_trace(s, torch.zeros_like(mask)), q)
        assert_close(out, torch.zeros_like(out), "read after an all-zero write mask should be zeros", self.atol)

    def test_written_trace_is_read(self):
        m = self._fresh()
        s, mask, q = self._inputs(2)
        with torch.no_grad():
            out = m.read_trace(m.write_trace(s, mask), q)
        assert_shape(out, q.shape, "read_trace(write_trace(states, mask), queries)")
        assert out.abs().sum() > 0, f"a written trace reads as zeros (sum |read| = {out.abs().sum().item():.3g})"

    def test_masked_positions_do_not_write(self):
        m = self._fresh()
        s, mask, q = self._inputs(3)
        other = s.clone()
        other[mask == 0] = other[mask == 0] * -3.0 + 1.0
        with torch.no_grad():
            a = m.read_trace(m.write_trace(s, mask), q)
            b = m.read_trace(m.write_trace(other, mask), q)
        assert_close(b, a, "write_trace: changing masked-out states changed the read", self.atol)

    def test_read_does_not_change_trace(self):
        m = self._fresh()
        s, mask, q = self._inputs(4)
        with torch.no_grad():
            trace = m.write_trace(s, mask)
            before = trace.clone()
            first = m.read_trace(trace, q)
            second = m.read_trace(trace, q)
        assert_close(trace, before, "read_trace changed the trace", 0.0, 0.0)
        assert_close(second, first, "a second read differs from the first", self.atol)

    def test_items_independent(self):
        m = self._fresh()
        s, mask, q = self._inputs(5)
        with torch.no_grad():
            full = m.read_trace(m.write_trace(s, mask), q)
            one = m.read_trace(m.write_trace(s[1:2], mask[1:2]), q[1:2])
        assert_close(one, full[1:2], "read_trace: item 1 alone vs in the batch", self.atol)


__all__ = ["assert_close", "assert_shape", "backbone_build", "ResidualPointContract", "LayerPointContract", "ContextPointContract", "TracePointContract"]
