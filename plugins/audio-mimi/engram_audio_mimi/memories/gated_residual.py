"""`gated_residual`: μ = μ_param + g(z) Σ w_i r_i, residual_topk's correction scaled by a
learned gate g ∈ (0, 1)."""

from __future__ import annotations

import attrs

from engram_core.components import BuildContext, FitContext
from engram_core.config import field, non_negative, positive

from .base import DynamicsMemory
from .retrieval import LearnedGate, TopKStore, residual_targets


@attrs.frozen
class GatedResidualConfig:
    """Also the config of `hybrid`."""

    k: int = field(256, help="number of keys (k-means centroids of z_t)", validator=positive)
    topk: int = field(8, help="keys retrieved per query", validator=positive)
    tau: float = field(
        0.0, help="softmax temperature; 0 = median squared distance to the nearest key", validator=non_negative
    )
    gate_init: float = field(0.0, help="initial gate bias (sigmoid(0) = 0.5 open)")


class GatedResidualMemory(TopKStore, LearnedGate, DynamicsMemory):
    """μ = μ_param + g(z)·Σ w_i r_i with g(z) = sigmoid(wᵀz + b) learned in a train stage."""

    def __init__(self, cfg: GatedResidualConfig, build: BuildContext):
        super().__init__(build)
        self._init_store(cfg.k, cfg.topk, cfg.tau)
        self.cfg = cfg
        self._init_gate(cfg.gate_init)

    def forward(self, z, mu, log_sigma):
        return mu + self.gate(z) * self.correction(z), log_sigma

    def fit(
        self,
        ctx: FitContext,
        iters: int = 20,
        max_items: int = 100000,
        gate_steps: int = 200,
        gate_lr: float = 1e-2,
        gate_batch: int = 256,
    ) -> None:
        """Fit keys and values (as residual_topk), then `gate_steps` Adam steps on the gate alone,
        minimising the head's NLL with the memory on (batches drawn with ctx.generator).
        gate_steps = 0 leaves the gate to a later train stage (train = ["memory.gate*"])."""
        self._fit_store(ctx, iters, max_items, residual_targets)
        self._fit_gate(ctx, max_items, gate_steps, gate_lr, gate_batch)
