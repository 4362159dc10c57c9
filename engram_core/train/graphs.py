"""`run.cuda_graphs`: a whole training step recorded once as a CUDA graph, then replayed.

A small model's step is hundreds of short kernels; launching them from Python costs more
than running them. With ``run.cuda_graphs = true`` the engine runs the first
`WARMUP_STEPS` steps eagerly on a side stream (they are real steps: optimiser state,
cuBLAS workspaces and, with ``run.compile``, the compiled code come into being), records
the next step — forward, backward, gradient clipping, optimiser step and the step meter —
as one `torch.cuda.CUDAGraph`, and from then on copies each batch into the graph's input
buffers and replays it (the PyTorch docs' "whole-network capture").

What a captured step needs (checked before or at capture, each a one-line error):
* CUDA, one process, ``grad_accum = 1``, no fp16 GradScaler, no row-holding tables;
* an optimiser whose learning rate can live in a tensor (``capturable``: Adam, AdamW),
  so the schedule updates it in place between replays;
* batches of one shape, and an objective whose terms are tensors (a Python number
  computed in the forward would be frozen at its captured value);
* no host synchronisation inside the step (``.item()``, ``if tensor:``, boolean-mask
  indexing): CUDA refuses those while capturing, and the error names the stage.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import EngramError

WARMUP_STEPS = 3  # eager steps before capture (the PyTorch docs use 3 on a side stream)


class GraphCaptureError(EngramError):
    """A training step could not be recorded as a CUDA graph; one line, exit 2."""


def make_capturable(optimizers: list[torch.optim.Optimizer], device: torch.device, where: str) -> None:
    """Learning rates as device tensors and `capturable` steps, so a replayed step reads
    the rate the schedule set (LRScheduler fills tensor rates in place)."""
    for opt in optimizers:
        if "capturable" not in opt.defaults:
            raise GraphCaptureError(f"{where}: run.cuda_graphs needs an optimiser whose step can be captured "
                                    f"(capturable: adam, adamw), got {type(opt).__name__}; set run.cuda_graphs = false")
        for group in opt.param_groups:
            group["capturable"] = True
            if not group.get("fused"):  # fused is one kernel already; foreach otherwise (the for-loop would be hundreds)
                group["foreach"] = True
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
            if "initial_lr" in group:
                group["initial_lr"] = float(group["initial_lr"])


class CapturedStep:
    """Calls `step(batch)` eagerly for WARMUP_STEPS calls, then records it as a CUDA graph
    and replays it for every later batch (copied into the graph's input buffers)."""

    def __init__(self, step: Callable[[dict], dict], where: str, warmup: int = WARMUP_STEPS):
        self.step = step
        self.where = where
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: dict[str, torch.Tensor] | None = None
        self.outputs: dict | None = None

    def __call__(self, batch: dict) -> dict:
        self.calls += 1
        if self.inputs is None:
            self._make_inputs(batch)
        self._copy_in(batch)
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        if self.calls <= self.warmup:
            return self._side_stream()
        return self._capture()

    def _make_inputs(self, batch: dict) -> None:
        """The graph's input buffers, contiguous. The warm-up steps read them too, so what
        they compile (`run.compile` specialises on strides) is what the capture replays: a
        data set's expanded view (stride 0) would otherwise recompile inside the capture."""
        if not all(isinstance(v, torch.Tensor) for v in batch.values()):
            raise GraphCaptureError(f"{self.where}: run.cuda_graphs needs batches of tensors only; set run.cuda_graphs = false")
        self.inputs = {k: torch.empty_like(v, memory_format=torch.contiguous_format) for k, v in batch.items()}

    def _side_stream(self) -> dict:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.step(self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _capture(self) -> dict:
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(graph):
                self.outputs = self.step(self.inputs)
        except Exception as exc:  # a sync or a CPU tensor inside the step
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
            raise GraphCaptureError(f"{self.where}: run.cuda_graphs could not record the training step "
                                    f"({type(exc).__name__}: {first}); set run.cuda_graphs = false") from None
        frozen = [k for k, v in self.outputs.items() if not isinstance(v, torch.Tensor)]
        if frozen:  # computed in Python at capture time: a replay would log the same number forever
            raise GraphCaptureError(f"{self.where}: run.cuda_graphs: the objective returns term '{frozen[0]}' as a Python number, "
                                    f"which a replayed step cannot update; return it as a tensor, or set run.cuda_graphs = false")
        self.graph = graph
        graph.replay()
        return self.outputs

    def _copy_in(self, batch: dict) -> None:
        if batch.keys() != self.inputs.keys():
            raise GraphCaptureError(f"{self.where}: run.cuda_graphs: a batch brought keys {sorted(batch)} where the captured step "
                                    f"had {sorted(self.inputs)}; set run.cuda_graphs = false")
        for k, v in batch.items():
            static = self.inputs[k]
            if v.shape != static.shape:
                raise GraphCaptureError(f"{self.where}: run.cuda_graphs needs batches of one shape, but '{k}' changed from "
                                        f"{tuple(static.shape)} to {tuple(v.shape)}; set run.cuda_graphs = false")
            static.copy_(v, non_blocking=True)
