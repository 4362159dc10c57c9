"""What the context memories (mem_encoder, reader_encoder, token_select) share: the reader's
width, the `context` point, and the parameter-update and batch-similarity stats."""

from __future__ import annotations

import torch

from engram_core.components import BuildContext
from engram_core.config import ConfigError


def reader_width(build: BuildContext, out_dim: int) -> int:
    """The width the memory projects to: the reader's embedding width, or `out_dim` without a reader."""
    head = build.head
    width = getattr(head, "width", None) if head is not None else None
    if width is None:
        if out_dim <= 0:
            raise ConfigError("out_dim", "no reader to take the width from: set out_dim (the reader's embedding width)")
        return out_dim
    if out_dim and out_dim != width:
        raise ConfigError("out_dim", f"the encoder projects to {out_dim} but the reader's embedding width is {width}; "
                                     "set out_dim = 0 (follow the reader) or the reader's width")
    return width


class ContextPointMixin:
    """The `context` point (engram_core.points.ContextPoint) of every context memory."""

    def context_shape(self) -> tuple[int, int]:
        return self.cfg.n_slots, self.out_width

    def write_context(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self(ids, mask)


class MemoryStatsMixin:
    """Parameter-update check: relative change of the memory's parameters since it was built."""

    def _snapshot(self) -> None:
        # kept outside the state_dict on purpose: a debug reference, not model state
        self._init_params = {n: p.detach().clone() for n, p in self.named_parameters()}

    def param_update(self) -> float:
        num, den = 0.0, 0.0
        for n, p in self.named_parameters():
            p0 = self._init_params.get(n)
            if p0 is None or p0.shape != p.shape:
                continue
            num += float((p.detach().cpu() - p0.cpu()).pow(2).sum())
            den += float(p0.pow(2).sum())
        return (num / max(den, 1e-12)) ** 0.5

    def stats(self) -> dict[str, float]:
        out = {"param_update": self.param_update()}
        last = getattr(self, "last_output", None)
        if last is not None and last.shape[0] > 1:
            flat = torch.nn.functional.normalize(last.flatten(1).float(), dim=-1)
            sim = flat @ flat.t()
            n = sim.shape[0]
            out["batch_cos"] = float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))
        return out
