"""`residual_topk`: μ = μ_param + Σ w_i r_i, w ∝ softmax(−‖z − c_i‖²/τ) over the k nearest
keys, r_i = mean residual Δz − μ_param(z) of cluster i."""

from __future__ import annotations

import attrs

from engram_core.components import BuildContext, FitContext
from engram_core.config import field, non_negative, positive

from .base import DynamicsMemory
from .retrieval import TopKStore, residual_targets


@attrs.frozen
class ResidualTopKConfig:
    k: int = field(256, help="number of keys (k-means centroids of z_t)", validator=positive)
    topk: int = field(8, help="keys retrieved per query", validator=positive)
    tau: float = field(
        0.0,
        help="softmax temperature over −‖z − c‖²; 0 = set at fit time to the median "
        "squared distance to the nearest key",
        validator=non_negative,
    )


class ResidualTopKMemory(TopKStore, DynamicsMemory):
    """μ = μ_param + Σ_i w_i r_i over the `topk` nearest keys; r fitted on residuals Δz − μ_param."""

    def __init__(self, cfg: ResidualTopKConfig, build: BuildContext):
        super().__init__(build)
        self._init_store(cfg.k, cfg.topk, cfg.tau)
        self.cfg = cfg

    def forward(self, z, mu, log_sigma):
        return mu + self.correction(z), log_sigma

    def fit(self, ctx: FitContext, iters: int = 20, max_items: int = 100000) -> None:
        self._fit_store(ctx, iters, max_items, residual_targets)
