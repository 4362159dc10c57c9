"""A key-value slot memory: softmax attention of z over learned keys reads learned values.

Attached at a head's `residual` point it adds `g · Σ_i softmax(z·k_i/√d)_i v_i` to the
head's prediction, with a learned scalar gate `g = sigmoid(gate_logit)` that starts
nearly closed so an untrained memory barely changes the head.
"""

from __future__ import annotations

import math

import attrs
import torch
from torch import nn

from engram_core import BuildContext, Memory, field
from engram_core.config import positive


@attrs.frozen
class KeyValueSlotsConfig:
    slots: int = field(32, help="number of key/value slots", validator=positive)
    temperature: float = field(1.0, help="softmax temperature of the read", validator=positive)
    gate_init: float = field(-4.0, help="initial gate logit (sigmoid(-4) ≈ 0.018)")


class KeyValueSlotsMemory(Memory):
    """Learned key/value slots read by softmax attention; a gated residual correction."""

    def __init__(self, cfg: KeyValueSlotsConfig, build: BuildContext):
        super().__init__()
        d = build.spec.dim
        self.scale = 1.0 / (math.sqrt(d) * cfg.temperature)
        self.keys = nn.Parameter(torch.randn(cfg.slots, d) / math.sqrt(d))
        self.values = nn.Parameter(torch.zeros(cfg.slots, d))
        self.gate_logit = nn.Parameter(torch.tensor(float(cfg.gate_init)))
        self.register_buffer("reads", torch.zeros(cfg.slots))  # soft usage since the last reset

    def weights(self, z: torch.Tensor) -> torch.Tensor:
        return torch.softmax(z @ self.keys.T * self.scale, dim=-1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        w = self.weights(z)
        if not self.training:
            self.reads += w.detach().reshape(-1, w.shape[-1]).sum(0)
        return torch.sigmoid(self.gate_logit) * (w @ self.values)

    def apply_residual(self, z: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor | None):
        """The `residual` point (engram_core.points.ResidualPoint): adds the read to mu."""
        return mu + self(z), log_sigma

    def reset(self) -> None:
        self.reads.zero_()

    def stats(self) -> dict[str, float]:
        total = float(self.reads.sum())
        used = float((self.reads > 0.01 * total / len(self.reads)).float().mean()) if total > 0 else 0.0
        return {"gate_mean": float(torch.sigmoid(self.gate_logit)), "slot_usage": used}

    def histograms(self) -> dict[str, torch.Tensor]:
        return {"slot_reads": self.reads.clone()}
