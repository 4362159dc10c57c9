"""What every memory at a dynamics head's `residual` point shares: the head it corrects
(held, not owned) and the fit data (z, Δz and the head's parametric μ with the memory off)."""

from __future__ import annotations

import torch

from engram_core.components import BuildContext, FitContext, Memory
from engram_core.config import ConfigError


class DynamicsMemory(Memory):
    """Base: holds the head (not as a child module) and collects fit data."""

    def __init__(self, build: BuildContext):
        super().__init__()
        self.dim = int(build.spec.dim)
        object.__setattr__(self, "_head", build.head)

    def apply_residual(self, z: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor | None):
        """The `residual` point (engram_core.points.ResidualPoint): the memory's forward."""
        return self(z, mu, log_sigma)

    def _param_prediction(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        head = self._head
        if head is None:
            raise ConfigError(None, "this memory must be attached to a head before it is fitted")
        if hasattr(head, "predict_param"):
            return head.predict_param(z)
        was = self.enabled
        self.enabled = False
        try:
            if hasattr(head, "predict"):
                return head.predict(z)
            return head.mean_step(z), None  # a vMF head: its mean step, memory off
        finally:
            self.enabled = was

    @torch.no_grad()
    def collect(self, ctx: FitContext, max_items: int) -> dict[str, torch.Tensor]:
        """z, Δz and the parametric μ of (at most `max_items` random) pairs of ctx.split."""
        data = ctx.dataset
        if hasattr(data, "pairs"):
            z, dz, _ = data.pairs(ctx.split)
            if z.shape[0] > max_items:
                pick = torch.randperm(z.shape[0], generator=ctx.generator)[:max_items]
                z, dz = z[pick], dz[pick]
        else:
            zs, dzs = [], []
            for b in data.eval_batches(ctx.split, ctx.batch_size):
                zs.append(b["z"])
                dzs.append(b["dz"])
            z, dz = torch.cat(zs)[:max_items], torch.cat(dzs)[:max_items]
        z, dz = z.to(ctx.device), dz.to(ctx.device)
        mus = [self._param_prediction(z[i : i + 4096])[0] for i in range(0, z.shape[0], 4096)]
        return {"z": z, "dz": dz, "mu": torch.cat(mus)}


def check_fit(k: int, iters: int, max_items: int) -> None:
    """The fit action's options, checked before anything is fitted."""
    if iters < 1:
        raise ConfigError("iters", f"must be >= 1, got {iters}")
    if max_items < k:
        raise ConfigError("max_items", f"must be >= k = {k}, got {max_items}")
