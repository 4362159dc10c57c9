"""A small LoRA for any `nn.Linear`, with named adapters that can be switched on and off.

Named adapters let one reader carry two low-rank updates: `reader` (how the reader reads
latent memory) and `encoder` (active only while the same network *writes* memory, the
ICAE / 500xCompressor arrangement). peft's multi-adapter API changes `requires_grad` when
switching adapters, which would fight the engine's `train`/`freeze` globs, hence this.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn


class AdapterSwitch:
    """The set of adapter names currently active, shared by every LoRALinear of one model."""

    def __init__(self, active: tuple[str, ...] = ("reader",)):
        self.active: set[str] = set(active)

    @contextlib.contextmanager
    def only(self, names):
        old = self.active
        self.active = set(names)
        try:
            yield
        finally:
            self.active = old


class _LowRank(nn.Module):
    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))  # zero: the adapter starts as the identity update
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x):
        return (x @ self.A.t() @ self.B.t()) * self.scale


class LoRALinear(nn.Module):
    """`base(x) + Σ_active B A x · alpha/r`; the base layer's parameters keep their names under `base.`."""

    def __init__(self, base: nn.Linear, switch: AdapterSwitch):
        super().__init__()
        self.base = base
        self.lora = nn.ModuleDict()
        self._switch = switch

    def add(self, name: str, rank: int, alpha: float) -> None:
        self.lora[name] = _LowRank(self.base.in_features, self.base.out_features, rank, alpha).to(
            self.base.weight.device, self.base.weight.dtype
        )

    def forward(self, x):
        y = self.base(x)
        for name in self._switch.active:
            if name in self.lora:
                y = y + self.lora[name](x)
        return y


def add_lora(model: nn.Module, name: str, rank: int, alpha: float, targets: list[str], switch: AdapterSwitch) -> int:
    """Wrap every `nn.Linear` whose attribute name is in `targets` (once) and add adapter `name`.

    Returns how many linear layers got the adapter (0 means the targets matched nothing).
    """
    count = 0
    for parent in list(model.modules()):
        if isinstance(parent, LoRALinear):
            continue
        for child_name, child in list(parent.named_children()):
            if child_name not in targets:
                continue
            if isinstance(child, nn.Linear):
                wrapped = LoRALinear(child, switch)
                setattr(parent, child_name, wrapped)
                child = wrapped
            if isinstance(child, LoRALinear):
                if name not in child.lora:
                    child.add(name, rank, alpha)
                    count += 1
    return count
