"""`basis`: μ = μ_param + s(z) Σ_k a_k(z) p̂_k: K learned unit direction prototypes, soft
attention a(z), learned step size s(z) (zero at build: changes nothing)."""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from engram_core.components import BuildContext, FitContext
from engram_core.config import ConfigError, field, positive

from .base import DynamicsMemory, check_fit
from .clustering import kmeans


def _one_of(attribute, value, choices):
    if value not in choices:
        raise ConfigError(attribute.name, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")


@attrs.frozen
class BasisMemoryConfig:
    prototypes: int = field(16, help="number K of learned direction prototypes", validator=positive)
    tau: float = field(0.1, help="attention temperature over cosine(query(z), prototype)", validator=positive)
    fit_target: str = field(
        "residual",
        help="what the fit action clusters into initial prototypes: residual (Δz − μ_param) | delta (Δz)",
        validator=lambda i, a, v: _one_of(a, v, ("residual", "delta")),
    )


class BasisMemory(DynamicsMemory):
    """Memory as a basis (seed 001): K learned direction prototypes p_k, soft attention
    a = softmax(cos(q(z), p_k)/τ), the retrieved direction r(z) = Σ_k a_k p̂_k (‖r‖ ≤ 1, = 1
    when the attention picks one prototype).

    - at a Gaussian head's `residual` point: μ = μ_param + s(z)·r(z) and
      log σ = log σ_param − c·log ‖r(z)‖;
    - at a vMF head's `direction` point: μ_dir = normalise(μ̂_param + s(z)·r(z)) and
      log κ = log κ_param + c·log ‖r(z)‖ (c learned): a peaked attention sharpens κ, a spread
      one (no archetype fits) blunts it.

    s(z) and c start at zero, so a built memory changes nothing until trained; `fit`
    initialises the prototypes by spherical k-means of train residual (or Δz) directions.
    """

    def __init__(self, cfg: BasisMemoryConfig, build: BuildContext):
        super().__init__(build)
        self.cfg = cfg
        d = self.dim
        g = torch.Generator().manual_seed(build.seed)
        self.prototypes = nn.Parameter(F.normalize(torch.randn(cfg.prototypes, d, generator=g), dim=-1))
        self.query = nn.Linear(d, d)
        self.scale = nn.Linear(d, 1)
        nn.init.zeros_(self.scale.weight)
        nn.init.zeros_(self.scale.bias)
        self.confidence = nn.Parameter(torch.zeros(()))  # c: weight of log ‖r(z)‖

    def attention(self, z: torch.Tensor) -> torch.Tensor:
        q = F.normalize(self.query(z), dim=-1)
        return torch.softmax(q @ F.normalize(self.prototypes, dim=-1).T / self.cfg.tau, dim=-1)

    def correction(self, z: torch.Tensor) -> torch.Tensor:
        a = self.attention(z)
        return self.scale(z) * (a @ F.normalize(self.prototypes, dim=-1))

    def _retrieve(self, z):
        r = self.attention(z) @ F.normalize(self.prototypes, dim=-1)
        return r, r.norm(dim=-1, keepdim=True).clamp_min(1e-6).log()

    def forward(self, z, mu, log_sigma):
        """The Gaussian head's (μ, log σ) → (μ + s(z)·r(z), log σ − c·log ‖r(z)‖)."""
        r, log_peak = self._retrieve(z)
        return mu + self.scale(z) * r, log_sigma - self.confidence * log_peak

    def direction(self, z, direction, log_kappa):
        """The vMF head's (unnormalised μ_dir, log κ) → (μ̂_dir + s(z)·r(z), log κ + c·log ‖r(z)‖)."""
        r, log_peak = self._retrieve(z)
        return F.normalize(direction, dim=-1) + self.scale(z) * r, log_kappa + self.confidence * log_peak.squeeze(-1)

    @torch.no_grad()
    def fit(self, ctx: FitContext, iters: int = 20, max_items: int = 100000) -> None:
        check_fit(self.cfg.prototypes, iters, max_items)
        data = self.collect(ctx, max_items)
        target = data["dz"] - data["mu"] if self.cfg.fit_target == "residual" else data["dz"]
        centroids, labels = kmeans(target, self.cfg.prototypes, iters, ctx.generator, spherical=True)
        self.prototypes.copy_(centroids)

    def stats(self):
        p = F.normalize(self.prototypes.detach(), dim=-1)
        sim = p @ p.T
        off = sim[~torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)]
        return {"prototype_max_cos": float(off.max()) if off.numel() else 0.0}
