"""`hybrid`: μ = (1 − g(z)) μ_param + g(z) Σ w_i E[Δz|c_i], a gated blend of the head's
and the memory's predictions (config: gated_residual's)."""

from __future__ import annotations

from engram_core.components import BuildContext

from .base import DynamicsMemory
from .gated_residual import GatedResidualConfig
from .retrieval import GatedStore, delta_targets


class HybridMemory(GatedStore, DynamicsMemory):
    """μ = (1 − g(z))·μ_param + g(z)·Σ w_i E[Δz|c_i]: a gated blend of param and memory predictions."""

    targets = staticmethod(delta_targets)  # the store's values: Δz itself, not the residual

    def __init__(self, cfg: GatedResidualConfig, build: BuildContext):
        super().__init__(build)
        self._init_gated(cfg)

    def forward(self, z, mu, log_sigma):
        g = self.gate(z)
        return (1 - g) * mu + g * self.correction(z), log_sigma
