"""Precision and compilation: `run.precision` and `run.compile`.

    precision = "fp32"   plain fp32 (the default)
    precision = "bf16"   torch.autocast to bfloat16; weights, grads and optimizer state stay fp32
    precision = "fp16"   torch.autocast to float16 with a torch.amp.GradScaler (loss scaling)
    compile = true       torch.compile of the whole training forward: the objective on the head and
                         the memory, loss included (the backward through AOTAutograd); parameter
                         names and checkpoints are the same as eager. Evaluation stays eager.
    cuda_graphs = true   the whole training step replayed as one CUDA graph (engram_core.train.graphs)
    matmul_precision     float32 matmuls on CUDA: "highest" (fp32, torch's default), "high" (TF32
                         tensor cores), "medium" (bf16 passes) — torch.set_float32_matmul_precision

Precision applies on CUDA; on the CPU a run stays fp32 (CPU autocast is slow on most CPUs and
would change a GPU recipe's CPU smoke test), as docs/recipes.md has said from the start. An objective that calls the head as
`model.head(x)` and one that calls a helper method (`model.head.predict`) both run compiled,
since the compiled region is the objective's call itself.
"""

from __future__ import annotations

import contextlib

import torch

from ..errors import EngramError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# True while `engram_core.testing.host_reads.as_on_an_accelerator()` runs the CPU under the
# accelerator policy below (how a CPU test checks that a steady-state step reads nothing)
_cpu_as_accelerator = False


def host_reads_free(device: torch.device) -> bool:
    """Whether reading a value of a tensor on `device` from the host (`.item()`, `if t:`,
    `int(t)`, a boolean-mask index) costs nothing: on the CPU it does, so components may check
    their inputs at every forward; on an accelerator the host would wait for the device to
    finish every queued kernel, so components check once (the first forward) or never in
    the steady-state step. Never while torch.compile traces (a read there splits the graph).
    One policy for every component, so a test can switch it."""
    return device.type == "cpu" and not _cpu_as_accelerator and not torch.compiler.is_compiling()


class CompileError(EngramError):
    """torch.compile could not compile a component; one line, exit 2."""


def autocast(precision: str, device: torch.device, cache: bool = True):
    """The autocast context of a forward pass at `precision` (a null context for fp32).
    `cache=False` inside a captured CUDA graph (autocast's weight-cast cache must not
    outlive the capture)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def set_matmul_precision(precision: str, device: torch.device) -> None:
    """`run.matmul_precision` for this process's float32 matmuls, on CUDA only: on the CPU a
    run keeps torch's default, so a GPU recipe's CPU smoke test keeps its numerics (as with
    `run.precision`)."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision(precision)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (fp16 gradients underflow without loss scaling); None otherwise."""
    if precision != "fp16" or device.type != "cuda":
        return None
    return torch.amp.GradScaler(device.type)


def check_compilable(named: dict[str, torch.nn.Module | None]) -> None:
    """Before anything is compiled: a component may say it cannot be (`compilable = False`)."""
    for role, module in named.items():
        if module is not None and getattr(module, "compilable", True) is False:
            why = getattr(module, "compile_note", "") or "it declares compilable = False"
            raise CompileError(f"run.compile: the {role} ({type(module).__name__}) cannot be compiled: {why}; set run.compile = false")


def is_compile_failure(exc: BaseException) -> bool:
    """Whether an exception was raised by torch.compile's tracer or backend (not by the model)."""
    mod = type(exc).__module__ or ""
    return mod.startswith(("torch._dynamo", "torch._inductor", "torch.fx"))


def compile_failure(exc: BaseException, named: dict[str, torch.nn.Module | None]) -> CompileError:
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    which = ", ".join(f"{role} {type(m).__name__}" for role, m in named.items() if m is not None)
    return CompileError(f"run.compile: torch.compile failed on the first step ({which}): {type(exc).__name__}: {first}; set run.compile = false")
