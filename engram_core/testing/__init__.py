"""The memory contract kit: hypothesis strategies and a conformance suite for memory types.

Any memory type, ours or a third party's, proves the generic invariants by subclassing
`MemoryContract` in its own tests (pytest collects the inherited tests)::

    from engram_core.testing import MemoryContract

    class TestRingBuffer(MemoryContract):
        def make_memory(self, seed):
            torch.manual_seed(seed)
            return RingBufferMemory(RingBufferConfig(), BuildContext(spec=DataSpec(dim=8)))

        def make_inputs(self, batch_size, generator):
            return {"z": torch.randn(batch_size, 8, generator=generator)}

        def run(self, memory, inputs):
            return memory(inputs["z"])

Invariants checked: a state_dict round trip gives identical outputs; the same seed gives
the same result; finite inputs give finite outputs (hypothesis over seeds and input
scales); batch items are independent where the memory declares
``independent_batch_items = True``, compared along the output dimension the memory
declares as ``batch_dim`` (inputs are cut along ``input_batch_dim``); ``reset()`` restores the state the memory had before
it processed any input (traces, counters; what was fitted or learned stays);
gradients reach every trainable parameter. A check with nothing to check (items declared
dependent, no trainable parameter) is reported as skipped, not passed. A memory's own invariants (weights sum to
one, a closed gate passes through, ...) are tests of its own beside these.
"""

from __future__ import annotations

import copy
import fnmatch
from typing import Any

import attrs
import hypothesis.strategies as st
import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis.extra import numpy as hnp

__all__ = ["MemoryContract", "tensors", "configs", "slice_batch", "CONTRACT_SETTINGS"]

CONTRACT_SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])


# ---- strategies ---------------------------------------------------------------------------


def tensors(shape: tuple[int, ...] | st.SearchStrategy, min_value: float = -10.0, max_value: float = 10.0, dtype=torch.float32) -> st.SearchStrategy:
    """Finite float tensors of `shape` (a tuple or a strategy of tuples) with values in a range."""
    np_dtype = {torch.float32: np.float32, torch.float64: np.float64}[dtype]
    elements = st.floats(min_value, max_value, allow_nan=False, allow_infinity=False, width=32 if dtype == torch.float32 else 64)
    return hnp.arrays(np_dtype, shape, elements=elements).map(lambda a: torch.from_numpy(np.ascontiguousarray(a)))


def configs(cls: type, **fields: st.SearchStrategy) -> st.SearchStrategy:
    """Instances of an attrs config class with the given fields drawn from strategies.

    Draws that the class's validators reject are discarded, so the strategy yields
    only valid configs.
    """
    if not attrs.has(cls):
        raise TypeError(f"{cls!r} is not an attrs class")

    def build(kwargs):
        try:
            return cls(**kwargs)
        except (ValueError, TypeError):
            return None

    return st.fixed_dictionaries(fields).map(build).filter(lambda c: c is not None)


def slice_batch(inputs: Any, i: int, dim: int = 0) -> Any:
    """Item `i` of every tensor in `inputs` along `dim` (kept as a batch of one)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.narrow(dim, i, 1) if inputs.dim() > dim else inputs
    if isinstance(inputs, dict):
        return {k: slice_batch(v, i, dim) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(slice_batch(v, i, dim) for v in inputs)
    return inputs


def _skip(reason: str) -> None:
    """Report a check that has nothing to check as skipped, never as passed."""
    import pytest

    pytest.skip(reason)


def _outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in _outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _outputs(v)]
    return []


def _state(memory: torch.nn.Module) -> dict[str, Any]:
    return {k: (v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in memory.state_dict().items()}


def _assert_state_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: state keys differ: {sorted(set(a) ^ set(b))}"
    for k in a:
        va, vb = a[k], b[k]
        if isinstance(va, torch.Tensor):
            if va.shape != vb.shape:
                raise AssertionError(f"{what}: '{k}' has shape {tuple(vb.shape)}, was {tuple(va.shape)}")
            if not torch.equal(va, vb):
                diff = (va.double() - vb.double()).abs() if va.is_floating_point() else (va != vb).double()
                raise AssertionError(f"{what}: '{k}' differs: {int((diff > 0).sum())} of {va.numel()} elements, "
                                     f"max |difference| {diff.max().item():.4g}")
        else:
            assert va == vb, f"{what}: '{k}' is {vb!r}, was {va!r}"


class MemoryContract:
    """Subclass and implement `make_memory`, `make_inputs` and `run`.

    Optional: `prepare(memory)` puts a fresh memory into a non-trivial state (fit it,
    write to it) before the comparisons; `atol`; `batch_size`; `no_grad_params`, glob
    patterns of trainable parameters that legitimately get no gradient from `run`.
    """

    batch_size: int = 4
    atol: float = 1e-5
    no_grad_params: tuple[str, ...] = ()
    input_batch_dim: int = 0  # the dimension of make_inputs' tensors that indexes batch items
    output_batch_dim: int | None = None  # default: the memory's own `batch_dim` (0 if it declares none)

    # -- to implement ---------------------------------------------------------------------

    def make_memory(self, seed: int) -> torch.nn.Module:
        raise TypeError(f"{type(self).__name__} must implement make_memory(seed)")

    def make_inputs(self, batch_size: int, generator: torch.Generator) -> Any:
        raise TypeError(f"{type(self).__name__} must implement make_inputs(batch_size, generator)")

    def run(self, memory: torch.nn.Module, inputs: Any) -> Any:
        raise TypeError(f"{type(self).__name__} must implement run(memory, inputs)")

    def prepare(self, memory: torch.nn.Module) -> None:
        """Bring a fresh memory into the state the comparisons use (default: as built)."""

    def scale_inputs(self, inputs: Any, scale: float) -> Any:
        """Inputs multiplied by `scale` (floating tensors only); override for other kinds."""
        if isinstance(inputs, torch.Tensor):
            return inputs * scale if inputs.is_floating_point() else inputs
        if isinstance(inputs, dict):
            return {k: self.scale_inputs(v, scale) for k, v in inputs.items()}
        if isinstance(inputs, (list, tuple)):
            return type(inputs)(self.scale_inputs(v, scale) for v in inputs)
        return inputs

    # -- helpers ----------------------------------------------------------------------------

    def _fresh(self, seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        m = self.make_memory(seed)
        self.prepare(m)
        m.eval()
        return m

    def _inputs(self, seed: int, batch_size: int | None = None) -> Any:
        return self.make_inputs(batch_size or self.batch_size, torch.Generator().manual_seed(seed))

    def _close(self, a: Any, b: Any, what: str) -> None:
        ta, tb = _outputs(a), _outputs(b)
        assert len(ta) == len(tb) and ta, f"{what}: run() returned no tensors or different structures"
        for x, y in zip(ta, tb):
            assert x.shape == y.shape, f"{what}: shapes {tuple(x.shape)} vs {tuple(y.shape)}"
            from .points import assert_close

            assert_close(x, y, what, self.atol, 1e-5)

    # -- the invariants ---------------------------------------------------------------------

    def test_state_dict_round_trip(self):
        a = self._fresh(0)
        b = self._fresh(1)
        b.load_state_dict(a.state_dict())
        x = self._inputs(7)
        with torch.no_grad():
            self._close(self.run(a, x), self.run(b, x), "state_dict round trip")

    def test_same_seed_same_result(self):
        x = self._inputs(3)
        with torch.no_grad():
            self._close(self.run(self._fresh(5), x), self.run(self._fresh(5), x), "same seed")

    @CONTRACT_SETTINGS
    @given(seed=st.integers(0, 2**16), scale=st.sampled_from([0.0, 1e-3, 1.0, 10.0]))
    def test_finite_in_finite_out(self, seed, scale):
        m = self._fresh(seed % 7)
        x = self.scale_inputs(self._inputs(seed), scale)
        with torch.no_grad():
            for t in _outputs(self.run(m, x)):
                if t.is_floating_point():
                    bad = int((~torch.isfinite(t)).sum())
                    assert bad == 0, f"non-finite output for seed={seed} scale={scale}: {bad} of {t.numel()} elements (shape {tuple(t.shape)})"

    def test_batch_items_independent(self):
        m = self._fresh(0)
        if not getattr(m, "independent_batch_items", True):
            _skip(f"{type(m).__name__} declares independent_batch_items = False: batch items may interact")
        dim = self.output_batch_dim if self.output_batch_dim is not None else int(getattr(m, "batch_dim", 0))
        x = self._inputs(11)
        state = _state(m)
        with torch.no_grad():
            full = _outputs(self.run(m, x))
            compared = [f for f in full if f.dim() > dim and f.shape[dim] == self.batch_size]
            assert compared, (f"no output has the batch size {self.batch_size} along the declared batch dim {dim} "
                              f"(output shapes {[tuple(f.shape) for f in full]}); declare the memory's `batch_dim`")
            for i in range(self.batch_size):
                m.load_state_dict(state)
                if hasattr(m, "reset"):
                    m.reset()
                    m.load_state_dict(state)
                one = _outputs(self.run(m, slice_batch(x, i, self.input_batch_dim)))
                for f, o in zip(full, one):
                    if not (f.dim() > dim and f.shape[dim] == self.batch_size):
                        continue  # not a per-item output (a statistic, a scalar)
                    assert o.shape[dim] == 1, f"a batch of one gives shape {tuple(o.shape)}: its dim {dim} is not the batch"
                    from .points import assert_close

                    assert_close(o, f.narrow(dim, i, 1), f"item {i} alone vs in the batch (batch dim {dim}): it depends on the rest of the batch",
                                 self.atol, 1e-4)

    def test_reset_restores_initial_state(self):
        m = self._fresh(0)
        before = _state(m)
        with torch.no_grad():
            self.run(m, self._inputs(13))
            self.run(m, self._inputs(14))
        m.reset()
        _assert_state_equal(before, _state(m), "reset() after processing inputs")
        x = self._inputs(15)
        with torch.no_grad():
            self._close(self.run(m, x), self.run(self._fresh(0), x), "outputs after reset()")

    def test_gradients_reach_trainable_parameters(self):
        m = self._fresh(0)
        m.train()
        x = self._inputs(17)
        outs = [t for t in _outputs(self.run(m, x)) if t.is_floating_point() and t.requires_grad]
        trainable = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
        if not trainable:
            _skip(f"{type(m).__name__} has no trainable parameters")
        assert outs, "run() output does not depend on any trainable parameter"
        g = torch.Generator().manual_seed(0)
        loss = sum((t * torch.randn(t.shape, generator=g).to(t.device)).sum() for t in outs)
        loss.backward()
        for n, p in trainable:
            if any(fnmatch.fnmatchcase(n, pat) for pat in self.no_grad_params):
                continue
            assert p.grad is not None, f"no gradient reaches parameter '{n}'"
            grad = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
            assert torch.isfinite(grad).all(), f"non-finite gradient in '{n}'"
