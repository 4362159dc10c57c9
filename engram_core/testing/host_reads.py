"""Host reads in a training step, found on the CPU.

On a GPU a step must not read a tensor's value on the host (`.item()`, `if t:`, `int(t)`,
`.tolist()`, `nonzero`, a boolean-mask index): the host then waits until every queued kernel
has run, and a CUDA graph cannot record the step at all. CI has no GPU, so this module finds
such reads where they are written, in Python, on the CPU:

* `as_on_an_accelerator()` makes the CPU follow the accelerator policy
  (`engram_core.run.accel.host_reads_free` answers False), so components skip the input checks
  they run at every forward only where a read is free;
* `HostReads` is a `torch.overrides.TorchFunctionMode` that records every such call and the
  line of the caller outside torch;
* `host_reads_in_training(recipe, overrides)` runs a recipe's training on the CPU and returns
  the reads made in the forward and backward of its steady-state steps (after the first
  `steady_after`, which may check their inputs once). Empty is the property a GPU needs.

A plugin's test of its memory (`host_reads_with_memory`: a five-step zoo recipe, the core
backbone on mqar with a window of 2, and the memory attached)::

    from engram_core.testing.host_reads import host_reads_with_memory

    def test_the_step_reads_nothing_on_the_host():
        assert host_reads_with_memory('{ type = "my_memory", dim = 64 }') == []

What this cannot see: reads inside torch's C++ (an operator that synchronises by itself,
such as `torch.unique` without a size, is listed by name), and the optimiser's step, which is
torch's (its step counters are host tensors unless the step is captured).
"""

from __future__ import annotations

import contextlib
import tempfile
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from ..run import accel

# Python-level calls that read a value on the host (or, for an accelerator tensor, synchronise)
READS = {
    torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__,
    torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.masked_select,
    torch.masked_select, torch.unique, torch.Tensor.unique, torch.unique_consecutive, torch.Tensor.cpu,
}
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}


@contextlib.contextmanager
def as_on_an_accelerator() -> Iterator[None]:
    """The CPU under the accelerator policy: `accel.host_reads_free` answers False."""
    before = accel._cpu_as_accelerator
    accel._cpu_as_accelerator = True
    try:
        yield
    finally:
        accel._cpu_as_accelerator = before


def _bool_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _caller() -> str:
    """file:line of the innermost frame outside torch and this module."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        f = frame.filename.replace("\\", "/")
        if "/torch/" not in f and not f.endswith("testing/host_reads.py") and "/contextlib.py" not in f:
            return f"{f}:{frame.lineno}"
    return "?"


class HostReads(TorchFunctionMode):
    """Records host reads (`READS`, and boolean-mask indexing) made while active: `found` is a
    list of 'name at file:line'."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in READS or (func in _INDEXING and len(args) > 1 and _bool_index(args[1])):
            self.found.append(f"{getattr(func, '__name__', func)} at {_caller()}")
        return func(*args, **kwargs)


def host_reads_in_training(recipe_file: str | Path, overrides: Sequence[str] = (), steady_after: int = 2, registry=None,
                           device: str = "cpu") -> list[str]:
    """Run the recipe (with `overrides`) on the CPU under the accelerator policy and return the
    host reads in the forward and backward of every training step after the first
    `steady_after`. Keep the recipe short (a few steps, no evaluation needed). `registry`:
    the engine's (default: every installed plugin). `device`: "cpu" (the default, what CI has),
    or "cuda" for a memory whose kernels run only there (the same reads are recorded)."""
    from ..recipe import load_recipe
    from ..train.engine import Engine

    recipe = load_recipe(Path(recipe_file), list(overrides), registry=registry)
    reads = HostReads()
    with tempfile.TemporaryDirectory() as tmp, as_on_an_accelerator():
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        engine = Engine(recipe, run_dir, registry=registry, device=device, show_progress=False)
        engine.build()
        inner = engine.forward_backward_step
        calls = 0

        def counted(run, piece, sync_grads=True):
            nonlocal calls
            calls += 1
            if calls <= steady_after:
                return inner(run, piece, sync_grads)
            with reads:
                return inner(run, piece, sync_grads)

        engine.forward_backward_step = counted
        engine.run()
        if calls <= steady_after:
            raise ValueError(f"{recipe_file}: {calls} training steps ran, none after the first {steady_after}: give the recipe more steps")
    return reads.found


# the memory zoo's backbone and task (recipes/bases/zoo.toml), five steps of a small batch
ZOO_PROBE = """
[run]
name = "host_reads_probe"
[data]
type = "mqar"
n_pairs = 4
seq_len = 32
vocab_size = 64
n_train = 256
n_eval = 32
[head]
type = "causal_backbone"
dim = 64
n_layers = 2
n_heads = 4
window = 2
[[stages]]
name = "train"
objective = { type = "token_lm" }
steps = 5
batch_size = 8
lr = 3e-3
grad_clip = 1.0
[[metrics]]
type = "completion_accuracy"
"""


def host_reads_with_memory(memory: str | None, overrides: Sequence[str] = (), registry=None, device: str = "cpu") -> list[str]:
    """`host_reads_in_training` of `ZOO_PROBE` with `memory` (a TOML inline table, or None
    for the backbone alone) and `overrides`."""
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "zoo_probe.toml"
        recipe.write_text(ZOO_PROBE)
        extra = [f"memory={memory}"] if memory else []
        return host_reads_in_training(recipe, [*extra, *overrides], registry=registry, device=device)
