"""The two parts residual_topk, gated_residual and hybrid are made of, as mixins (plain
classes mixed into a `DynamicsMemory` subclass), so each memory is Memory → DynamicsMemory
→ itself and its buffers and parameters keep their names (`keys`, `values`, `tau`, `counts`,
`gate_layer.*`: checkpoints of every version load).

- `TopKStore`: `k` keys (k-means centroids of z_t) with one value each; a query reads the
  softmax(−‖z − c_i‖²/τ)-weighted mean of the values of its `topk` nearest keys.
- `LearnedGate`: g(z) = sigmoid(wᵀz + b), optionally fitted by Adam on the head's NLL.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engram_core.components import FitContext
from engram_core.config import ConfigError
from engram_core.nn import diagonal_gaussian_nll_per_item, soft_topk_weights

from .base import check_fit
from .clustering import kmeans


def residual_targets(data: dict) -> torch.Tensor:
    """What a residual store remembers: Δz − μ_param, the head's error."""
    return data["dz"] - data["mu"]


def delta_targets(data: dict) -> torch.Tensor:
    """What a blending store remembers: Δz itself (E[Δz | c])."""
    return data["dz"]


class TopKStore:
    """Keys and values read by soft top-k retrieval (mixed into a DynamicsMemory)."""

    def _init_store(self, k: int, topk: int, tau: float) -> None:
        if topk > k:
            raise ConfigError("topk", f"must be <= k = {k}, got {topk}")
        self.register_buffer("keys", torch.zeros(k, self.dim))
        self.register_buffer("values", torch.zeros(k, self.dim))
        self.register_buffer("tau", torch.tensor(float(tau or 1.0)))
        self.register_buffer("counts", torch.zeros(k))

    def retrieve(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(retrieved value (B, D), key indices (B, topk), weights (B, topk) summing to one)."""
        idx, w = soft_topk_weights(z, self.keys, self.cfg.topk, float(self.tau))
        value = (w.unsqueeze(-1) * self.values[idx]).sum(-2)  # = engram_core.nn.soft_topk, one search
        return value, idx, w

    def correction(self, z: torch.Tensor) -> torch.Tensor:
        return self.retrieve(z)[0]

    @torch.no_grad()
    def _fit_store(self, ctx: FitContext, iters: int, max_items: int, targets: Callable[[dict], torch.Tensor]) -> None:
        """Keys by k-means of z; each key's value the mean of `targets(data)` over its cluster;
        τ (when the config leaves it 0) the median squared distance to the nearest key."""
        check_fit(self.cfg.k, iters, max_items)
        data = self.collect(ctx, max_items)
        keys, labels = kmeans(data["z"], self.cfg.k, iters, ctx.generator)
        counts = torch.bincount(labels, minlength=self.cfg.k).float()
        target = targets(data)
        values = torch.zeros_like(keys).index_add_(0, labels, target) / counts.clamp_min(1)[:, None]
        self.keys.copy_(keys)
        self.values.copy_(values)
        self.counts.copy_(counts)
        if self.cfg.tau == 0:
            d2 = (data["z"] - keys[labels]).pow(2).sum(-1)
            self.tau.fill_(float(d2.median().clamp_min(1e-6)))

    def stats(self):
        return {"tau": float(self.tau), "value_norm": float(self.values.norm(dim=-1).mean())}


class LearnedGate:
    """g(z) = sigmoid(wᵀz + b) with w = 0 and b = `gate_init` at build (mixed into a DynamicsMemory)."""

    def _init_gate(self, gate_init: float) -> None:
        self.gate_layer = nn.Linear(self.dim, 1)
        nn.init.zeros_(self.gate_layer.weight)
        nn.init.constant_(self.gate_layer.bias, gate_init)

    def gate(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate_layer(z))

    def _fit_gate(self, ctx: FitContext, max_items: int, gate_steps: int, gate_lr: float, gate_batch: int) -> None:
        """`gate_steps` Adam steps on the gate alone, minimising the head's NLL with the memory
        on (batches drawn with ctx.generator). gate_steps = 0 leaves the gate to a later train
        stage (train = ["memory.gate*"])."""
        if gate_steps < 0:
            raise ConfigError("gate_steps", f"must be >= 0, got {gate_steps}")
        if gate_steps == 0:
            return
        head = self._head
        data = self.collect(ctx, max_items)
        params = list(self.gate_layer.parameters())
        flags = [p.requires_grad for p in params]  # a previous stage may have frozen the gate
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=gate_lr)
        was_enabled, self.enabled = self.enabled, True
        with torch.enable_grad():
            for _ in range(gate_steps):
                pick = torch.randint(0, data["z"].shape[0], (gate_batch,), generator=ctx.generator).to(data["z"].device)
                z, dz = data["z"][pick], data["dz"][pick]
                mu, log_sigma = head.predict_param(z) if hasattr(head, "predict_param") else self._param_prediction(z)
                mu, log_sigma = self(z, mu.detach(), log_sigma.detach())
                loss = diagonal_gaussian_nll_per_item(mu, log_sigma, dz).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        self.enabled = was_enabled
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


class GatedStore(TopKStore, LearnedGate):
    """The top-k store and the learned gate together, built from a `GatedResidualConfig` and
    fitted store first, then gate (gated_residual and hybrid differ only in `targets`, what
    the store's values are fitted to, and in how `forward` blends)."""

    targets: Callable[[dict], torch.Tensor]

    def _init_gated(self, cfg) -> None:
        self._init_store(cfg.k, cfg.topk, cfg.tau)
        self.cfg = cfg
        self._init_gate(cfg.gate_init)

    def fit(
        self,
        ctx: FitContext,
        iters: int = 20,
        max_items: int = 100000,
        gate_steps: int = 200,
        gate_lr: float = 1e-2,
        gate_batch: int = 256,
    ) -> None:
        """Fit keys and values (k-means of z, then each key's mean target: the residual for
        gated_residual, Δz itself for hybrid), then `gate_steps` Adam steps on the gate alone,
        minimising the head's NLL with the memory on (batches drawn with ctx.generator).
        gate_steps = 0 leaves the gate to a later train stage (train = ["memory.gate*"])."""
        self._fit_store(ctx, iters, max_items, type(self).targets)
        self._fit_gate(ctx, max_items, gate_steps, gate_lr, gate_batch)
