"""Memories attached at the dynamics head's `residual` point.

Each memory is called as ``memory(z, mu, log_sigma) -> (mu, log_sigma)``: it receives the
head's parametric prediction and returns the combined one. Fitting is a `fit` stage
action (``[[stages]] kind = "fit"``, ``action = "fit"``), on pairs of the train split;
residuals are computed with the memory switched off.

    kmeans          hard nearest centroid of z_t → (E[Δz|c], Var[Δz|c]); memory-only predictor
    residual_topk   μ = μ_param + Σ w_i r_i, w ∝ softmax(−‖z − c_i‖²/τ) over the k nearest keys,
                    r_i = mean residual Δz − μ_param(z) of cluster i
    gated_residual  μ = μ_param + g(z) Σ w_i r_i with a learned gate g ∈ (0, 1)
    hybrid          μ = (1 − g(z)) μ_param + g(z) Σ w_i E[Δz|c_i]
    basis           μ = μ_param + s(z) Σ_k a_k(z) p̂_k: K learned unit direction prototypes,
                    soft attention a(z), learned step size s(z) (zero at build: changes nothing)
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from engram_core.components import BuildContext, FitContext, Memory
from engram_core.config import ConfigError, field, non_negative, positive
from engram_core.nn import diagonal_gaussian_nll_per_item, soft_topk_weights

# ---- k-means ---------------------------------------------------------------------------


def kmeans(
    x: torch.Tensor, k: int, iters: int, generator: torch.Generator, spherical: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means (cosine similarity when `spherical`). Returns centroids (k, D), labels (N,).

    Initialised on k distinct random points drawn with `generator`; an empty cluster is
    re-seeded on the point farthest from its centroid, so every centroid stays in use.
    """
    n = x.shape[0]
    if n < k:
        raise ConfigError("k", f"k-means needs at least k = {k} points, got {n}")
    if spherical:
        x = F.normalize(x, dim=-1)
    c = _kmeans_pp_init(x, k, generator, spherical)
    labels = torch.zeros(n, dtype=torch.long, device=x.device)
    for _ in range(max(1, iters)):
        if spherical:
            score = x @ c.T
            labels = score.argmax(-1)
            best = score.gather(1, labels[:, None]).squeeze(1)
        else:
            d2 = x.pow(2).sum(-1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(-1)
            labels = d2.argmin(-1)
            best = -d2.gather(1, labels[:, None]).squeeze(1)
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        empty = counts == 0
        c = sums / counts.clamp_min(1)[:, None]
        if empty.any():
            far = torch.argsort(best)[: int(empty.sum())]
            c[empty] = x[far]
        if spherical:
            c = F.normalize(c, dim=-1)
    # final assignment to the final centroids, so stored cluster statistics match lookups
    labels = (x @ c.T).argmax(-1) if spherical else nearest(x, c)
    return c, labels


def _kmeans_pp_init(x: torch.Tensor, k: int, generator: torch.Generator, spherical: bool) -> torch.Tensor:
    """k-means++ seeding (D² sampling) drawn with `generator` on the CPU."""
    n = x.shape[0]
    first = int(torch.randint(0, n, (1,), generator=generator))
    c = [x[first]]
    d2 = None
    for _ in range(1, k):
        last = c[-1]
        new = (1 - x @ last) if spherical else (x - last).pow(2).sum(-1)
        d2 = new if d2 is None else torch.minimum(d2, new)
        w = d2.clamp_min(0).double().cpu()
        if float(w.sum()) <= 0:
            idx = int(torch.randint(0, n, (1,), generator=generator))
        else:
            idx = int(torch.multinomial(w, 1, generator=generator))
        c.append(x[idx])
    return torch.stack(c).clone()


def nearest(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    d2 = x.pow(2).sum(-1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(-1)
    return d2.argmin(-1)


# ---- shared base -----------------------------------------------------------------------


class DynamicsMemory(Memory):
    """Base: holds the head (not as a child module) and collects fit data."""

    def __init__(self, build: BuildContext):
        super().__init__()
        self.dim = int(build.spec.dim)
        object.__setattr__(self, "_head", build.head)

    def _param_prediction(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        head = self._head
        if head is None:
            raise ConfigError(None, "this memory must be attached to a head before it is fitted")
        if hasattr(head, "predict_param"):
            return head.predict_param(z)
        was = self.enabled
        self.enabled = False
        try:
            if hasattr(head, "predict"):
                return head.predict(z)
            return head.mean_step(z), None  # a vMF head: its mean step, memory off
        finally:
            self.enabled = was

    @torch.no_grad()
    def collect(self, ctx: FitContext, max_items: int) -> dict[str, torch.Tensor]:
        """z, Δz and the parametric μ of (at most `max_items` random) pairs of ctx.split."""
        data = ctx.dataset
        if hasattr(data, "pairs"):
            z, dz, _ = data.pairs(ctx.split)
            if z.shape[0] > max_items:
                pick = torch.randperm(z.shape[0], generator=ctx.generator)[:max_items]
                z, dz = z[pick], dz[pick]
        else:
            zs, dzs = [], []
            for b in data.eval_batches(ctx.split, ctx.batch_size):
                zs.append(b["z"])
                dzs.append(b["dz"])
            z, dz = torch.cat(zs)[:max_items], torch.cat(dzs)[:max_items]
        z, dz = z.to(ctx.device), dz.to(ctx.device)
        mus = [self._param_prediction(z[i : i + 4096])[0] for i in range(0, z.shape[0], 4096)]
        return {"z": z, "dz": dz, "mu": torch.cat(mus)}


def _check_fit(k: int, iters: int, max_items: int) -> None:
    if iters < 1:
        raise ConfigError("iters", f"must be >= 1, got {iters}")
    if max_items < k:
        raise ConfigError("max_items", f"must be >= k = {k}, got {max_items}")


# ---- kmeans (memory-only) --------------------------------------------------------------


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
        _check_fit(self.cfg.k, iters, max_items)
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


# ---- residual top-k --------------------------------------------------------------------


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


class ResidualTopKMemory(DynamicsMemory):
    """μ = μ_param + Σ_i w_i r_i over the `topk` nearest keys; r fitted on residuals Δz − μ_param."""

    def __init__(self, cfg: ResidualTopKConfig, build: BuildContext):
        super().__init__(build)
        if cfg.topk > cfg.k:
            raise ConfigError("topk", f"must be <= k = {cfg.k}, got {cfg.topk}")
        self.cfg = cfg
        self.register_buffer("keys", torch.zeros(cfg.k, self.dim))
        self.register_buffer("values", torch.zeros(cfg.k, self.dim))
        self.register_buffer("tau", torch.tensor(float(cfg.tau or 1.0)))
        self.register_buffer("counts", torch.zeros(cfg.k))

    def retrieve(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(retrieved value (B, D), key indices (B, topk), weights (B, topk) summing to one)."""
        idx, w = soft_topk_weights(z, self.keys, self.cfg.topk, float(self.tau))
        value = (w.unsqueeze(-1) * self.values[idx]).sum(-2)  # = engram_core.nn.soft_topk, one search
        return value, idx, w

    def correction(self, z: torch.Tensor) -> torch.Tensor:
        return self.retrieve(z)[0]

    def forward(self, z, mu, log_sigma):
        return mu + self.correction(z), log_sigma

    def _targets(self, data: dict) -> torch.Tensor:
        return data["dz"] - data["mu"]

    @torch.no_grad()
    def fit(self, ctx: FitContext, iters: int = 20, max_items: int = 100000) -> None:
        _check_fit(self.cfg.k, iters, max_items)
        data = self.collect(ctx, max_items)
        keys, labels = kmeans(data["z"], self.cfg.k, iters, ctx.generator)
        counts = torch.bincount(labels, minlength=self.cfg.k).float()
        target = self._targets(data)
        values = torch.zeros_like(keys).index_add_(0, labels, target) / counts.clamp_min(1)[:, None]
        self.keys.copy_(keys)
        self.values.copy_(values)
        self.counts.copy_(counts)
        if self.cfg.tau == 0:
            d2 = (data["z"] - keys[labels]).pow(2).sum(-1)
            self.tau.fill_(float(d2.median().clamp_min(1e-6)))

    def stats(self):
        return {"tau": float(self.tau), "value_norm": float(self.values.norm(dim=-1).mean())}


# ---- gated residual --------------------------------------------------------------------


@attrs.frozen
class GatedResidualConfig:
    k: int = field(256, help="number of keys (k-means centroids of z_t)", validator=positive)
    topk: int = field(8, help="keys retrieved per query", validator=positive)
    tau: float = field(
        0.0, help="softmax temperature; 0 = median squared distance to the nearest key", validator=non_negative
    )
    gate_init: float = field(0.0, help="initial gate bias (sigmoid(0) = 0.5 open)")


class GatedResidualMemory(ResidualTopKMemory):
    """μ = μ_param + g(z)·Σ w_i r_i with g(z) = sigmoid(wᵀz + b) learned in a train stage."""

    def __init__(self, cfg: GatedResidualConfig, build: BuildContext):
        super().__init__(ResidualTopKConfig(k=cfg.k, topk=cfg.topk, tau=cfg.tau), build)
        self.gate_layer = nn.Linear(self.dim, 1)
        nn.init.zeros_(self.gate_layer.weight)
        nn.init.constant_(self.gate_layer.bias, cfg.gate_init)

    def gate(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate_layer(z))

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
        """Fit keys and values (as the parent), then `gate_steps` Adam steps on the gate alone,
        minimising the head's NLL with the memory on (batches drawn with ctx.generator).
        gate_steps = 0 leaves the gate to a later train stage (train = ["memory.gate*"])."""
        super().fit(ctx, iters=iters, max_items=max_items)
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


# ---- hybrid ----------------------------------------------------------------------------


class HybridMemory(GatedResidualMemory):
    """μ = (1 − g(z))·μ_param + g(z)·Σ w_i E[Δz|c_i]: a gated blend of param and memory predictions."""

    def _targets(self, data: dict) -> torch.Tensor:
        return data["dz"]

    def forward(self, z, mu, log_sigma):
        g = self.gate(z)
        return (1 - g) * mu + g * self.correction(z), log_sigma


# ---- basis -----------------------------------------------------------------------------


@attrs.frozen
class BasisMemoryConfig:
    prototypes: int = field(16, help="number K of learned direction prototypes", validator=positive)
    tau: float = field(0.1, help="attention temperature over cosine(query(z), prototype)", validator=positive)
    fit_target: str = field(
        "residual",
        help="what the fit action clusters into initial prototypes: residual (Δz − μ_param) | delta (Δz)",
        validator=lambda i, a, v: _one_of(a, v, ("residual", "delta")),
    )


def _one_of(attribute, value, choices):
    if value not in choices:
        raise ConfigError(attribute.name, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")


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
        _check_fit(self.cfg.prototypes, iters, max_items)
        data = self.collect(ctx, max_items)
        target = data["dz"] - data["mu"] if self.cfg.fit_target == "residual" else data["dz"]
        centroids, labels = kmeans(target, self.cfg.prototypes, iters, ctx.generator, spherical=True)
        self.prototypes.copy_(centroids)

    def stats(self):
        p = F.normalize(self.prototypes.detach(), dim=-1)
        sim = p @ p.T
        off = sim[~torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)]
        return {"prototype_max_cos": float(off.max()) if off.numel() else 0.0}
