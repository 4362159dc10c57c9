"""`kmeans`: hard nearest centroid of z_t → (E[Δz|c], Var[Δz|c]), a memory-only predictor."""

from __future__ import annotations

import attrs
import torch

from engram_core.components import BuildContext, FitContext
from engram_core.config import field, positive

from .base import DynamicsMemory, check_fit
from .clustering import kmeans, nearest


@attrs.frozen
class KMeansMemoryConfig:
    k: int = field(256, help="number of centroids over keys z_t", validator=positive)
    min_var: float = field(
        1e-4, help="floor on each per-cluster variance Var(Δz | c) (normalised units)", validator=positive
    )


class KMeansMemory(DynamicsMemory):
    """Memory-only predictor: the nearest centroid's E[Δz|c] and Var[Δz|c] replace the head's.

    Until it is fitted it passes the head's prediction through.
    """

    def __init__(self, cfg: KMeansMemoryConfig, build: BuildContext):
        super().__init__(build)
        self.cfg = cfg
        d = self.dim
        self.register_buffer("keys", torch.zeros(cfg.k, d))
        self.register_buffer("mean", torch.zeros(cfg.k, d))
        self.register_buffer("log_var", torch.zeros(cfg.k, d))
        self.register_buffer("counts", torch.zeros(cfg.k))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def forward(self, z, mu, log_sigma):
        if not bool(self.fitted):
            return mu, log_sigma
        idx = nearest(z, self.keys)
        return self.mean[idx], 0.5 * self.log_var[idx]

    @torch.no_grad()
    def fit(self, ctx: FitContext, iters: int = 20, max_items: int = 100000) -> None:
        check_fit(self.cfg.k, iters, max_items)
        data = self.collect(ctx, max_items)
        keys, labels = kmeans(data["z"], self.cfg.k, iters, ctx.generator)
        counts = torch.bincount(labels, minlength=self.cfg.k).float()
        s1 = torch.zeros_like(keys).index_add_(0, labels, data["dz"])
        s2 = torch.zeros_like(keys).index_add_(0, labels, data["dz"] ** 2)
        mean = s1 / counts.clamp_min(1)[:, None]
        var = (s2 / counts.clamp_min(1)[:, None] - mean**2).clamp_min(self.cfg.min_var)
        self.keys.copy_(keys)
        self.mean.copy_(mean)
        self.log_var.copy_(var.log())
        self.counts.copy_(counts)
        self.fitted.fill_(True)

    def stats(self):
        if not bool(self.fitted):
            return {}
        c = self.counts
        return {"slots_used": float((c > 0).float().mean()), "min_cluster_size": float(c.min())}

    def histograms(self):
        return {"cluster_size": self.counts.clone()} if bool(self.fitted) else {}
