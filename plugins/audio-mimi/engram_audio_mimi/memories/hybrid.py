"""`hybrid`: μ = (1 − g(z)) μ_param + g(z) Σ w_i E[Δz|c_i], a gated blend of the head's
and the memory's predictions (config: gated_residual's)."""

from __future__ import annotations

from engram_core.components import BuildContext, FitContext

from .base import DynamicsMemory
from .gated_residual import GatedResidualConfig
from .retrieval import LearnedGate, TopKStore, delta_targets


class HybridMemory(TopKStore, LearnedGate, DynamicsMemory):
    """μ = (1 − g(z))·μ_param + g(z)·Σ w_i E[Δz|c_i]: a gated blend of param and memory predictions."""

    def __init__(self, cfg: GatedResidualConfig, build: BuildContext):
        super().__init__(build)
        self._init_store(cfg.k, cfg.topk, cfg.tau)
        self.cfg = cfg
        self._init_gate(cfg.gate_init)

    def forward(self, z, mu, log_sigma):
        g = self.gate(z)
        return (1 - g) * mu + g * self.correction(z), log_sigma

    def fit(
        self,
        ctx: FitContext,
        iters: int = 20,
        max_items: int = 100000,
        gate_steps: int = 200,
        gate_lr: float = 1e-2,
        gate_batch: int = 256,
    ) -> None:
        """Fit keys and values E[Δz|c] (Δz itself, not the residual), then `gate_steps` Adam
        steps on the gate alone, as gated_residual."""
        self._fit_store(ctx, iters, max_items, delta_targets)
        self._fit_gate(ctx, max_items, gate_steps, gate_lr, gate_batch)
