"""`gated_residual`: μ = μ_param + g(z) Σ w_i r_i, residual_topk's correction scaled by a
learned gate g ∈ (0, 1)."""

from __future__ import annotations

import attrs

from engram_core.components import BuildContext
from engram_core.config import field, non_negative, positive

from .base import DynamicsMemory
from .retrieval import GatedStore, residual_targets


@attrs.frozen
class GatedResidualConfig:
    """Also the config of `hybrid`."""

    k: int = field(256, help="number of keys (k-means centroids of z_t)", validator=positive)
    topk: int = field(8, help="keys retrieved per query", validator=positive)
    tau: float = field(
        0.0, help="softmax temperature; 0 = median squared distance to the nearest key", validator=non_negative
    )
    gate_init: float = field(0.0, help="initial gate bias (sigmoid(0) = 0.5 open)")


class GatedResidualMemory(GatedStore, DynamicsMemory):
    """μ = μ_param + g(z)·Σ w_i r_i with g(z) = sigmoid(wᵀz + b) learned in a train stage."""

    targets = staticmethod(residual_targets)  # the store's values: residuals of the head

    def __init__(self, cfg: GatedResidualConfig, build: BuildContext):
        super().__init__(build)
        self._init_gated(cfg)

    def forward(self, z, mu, log_sigma):
        return mu + self.gate(z) * self.correction(z), log_sigma
