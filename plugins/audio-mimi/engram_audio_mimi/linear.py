"""`linear`: the least-squares baseline head, fitted in closed form by a `fit` stage.

E[Δz | z] = W z + b with (W, b) the ridge least-squares solution over the train pairs
(normal equations in float64). On top, an output distribution fitted in closed form:

- `gaussian`: diagonal Gaussian, log σ_d = log of the residual std of dimension d;
- `gaussian_full`: a Gaussian with the full residual covariance (its Cholesky factor): the
  noise of a sampled step then lies where the residuals lie (on the data's manifold), not
  in all D directions alike as a diagonal σ or a vMF direction puts it;
- `vmf`: Δz = m·u with u ~ vMF(normalise(W z + b), κ), κ the maximum-likelihood
  concentration of the residual directions (A_D(κ) = mean cosine, solved by bisection),
  log m ~ N(w_mᵀ z + c_m, σ_m²) with (w_m, c_m) least squares on log ‖Δz‖.

The heads are the MLP heads with the trunk replaced by the identity (so their NLL, mean
step, sampling, rollouts and memory attachment points are the MLP heads' own), and stay
trainable: a later train stage fine-tunes them like any head.
"""

from __future__ import annotations

import math

import attrs
import torch
from torch import nn

from engram_core.components import BuildContext, Head
from engram_core.config import ConfigError, field, non_negative, one_of

from .distributions import vmf_mean_resultant
from .heads import _HALF_LOG_2PI, GaussianMLPConfig, GaussianMLPHead, VMFMagnitudeConfig, VMFMagnitudeHead, _check_dim


@attrs.frozen
class LinearConfig:
    output: str = field(
        "gaussian",
        help="output distribution: gaussian (diagonal) | gaussian_full (full residual covariance) | vmf (direction × log-normal magnitude)",
        validator=one_of("gaussian", "gaussian_full", "vmf"),
    )
    ridge: float = field(1e-6, help="ridge λ of the least squares, relative to the mean diagonal of ZᵀZ", validator=non_negative)
    dim: int = field(0, help="D of z; 0 = take it from the data", validator=non_negative)


def least_squares(x: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (out, in), b (out,)) minimising ‖y − (x Wᵀ + b)‖² + λ‖W‖², in float64."""
    x64, y64 = x.double(), y.double()
    mx, my = x64.mean(0), y64.mean(0)
    xc, yc = x64 - mx, y64 - my
    gram = xc.T @ xc
    lam = ridge * float(gram.diagonal().mean().clamp_min(1e-12))
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), xc.T @ yc).T
    return w, my - w @ mx


def vmf_kappa_mle(dim: int, mean_cos: float, lo: float = 1e-3, hi: float = 1e5) -> float:
    """κ with A_dim(κ) = mean_cos (the vMF maximum-likelihood concentration), by bisection on log κ."""
    mean_cos = min(max(mean_cos, 0.0), 1.0 - 1e-9)
    a, b = math.log(lo), math.log(hi)
    for _ in range(80):
        mid = 0.5 * (a + b)
        if float(vmf_mean_resultant(dim, torch.tensor(math.exp(mid), dtype=torch.float64))) < mean_cos:
            a = mid
        else:
            b = mid
    return math.exp(0.5 * (a + b))


def _train_pairs(ctx, max_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = ctx.dataset
    if hasattr(data, "pairs"):
        z, dz, _ = data.pairs(ctx.split)
    else:
        zs, dzs = [], []
        for b in data.eval_batches(ctx.split, ctx.batch_size):
            zs.append(b["z"])
            dzs.append(b["dz"])
        z, dz = torch.cat(zs), torch.cat(dzs)
    if max_items and z.shape[0] > max_items:
        pick = torch.randperm(z.shape[0], generator=ctx.generator)[:max_items]
        z, dz = z[pick], dz[pick]
    return z.to(ctx.device), dz.to(ctx.device)


def _fit_summary(ctx, head, z, dz, extra: dict) -> None:
    with torch.no_grad():
        nll = float(torch.cat([head.nll(z[i : i + 8192], dz[i : i + 8192]) for i in range(0, z.shape[0], 8192)]).mean())
    msg = f"  linear fit on {z.shape[0]} {ctx.split} pairs: train NLL {nll:.2f} nats/frame" + "".join(f", {k} {v:.4g}" for k, v in extra.items())
    print(msg)


class LinearGaussianHead(GaussianMLPHead):
    def attach_memory(self, memory, point):
        if point != "residual":
            raise ConfigError("memory", f"the linear Gaussian head takes a memory at 'residual' only, got {point!r}")
        super().attach_memory(memory, point)

    def __init__(self, cfg: LinearConfig, build: BuildContext):
        super().__init__(GaussianMLPConfig(hidden=1, layers=1, dim=cfg.dim), build)
        d = self.dim
        self.cfg_linear = cfg
        self.trunk = nn.Identity()
        self.mu = nn.Linear(d, d)
        self.log_sigma = nn.Linear(d, d)
        nn.init.zeros_(self.mu.weight)
        nn.init.zeros_(self.mu.bias)
        nn.init.zeros_(self.log_sigma.weight)
        nn.init.zeros_(self.log_sigma.bias)

    @torch.no_grad()
    def fit(self, ctx, max_items: int = 0) -> None:
        """Closed-form least squares of Δz on z, then the residual std per dimension."""
        z, dz = _train_pairs(ctx, max_items)
        w, b = least_squares(z, dz, self.cfg_linear.ridge)
        self.mu.weight.copy_(w.float())
        self.mu.bias.copy_(b.float())
        resid = dz.double() - (z.double() @ w.T + b)
        self.log_sigma.weight.zero_()
        self.log_sigma.bias.copy_(resid.std(0).clamp_min(math.exp(self.min_log_sigma)).log().float())
        _fit_summary(ctx, self, z, dz, {"residual share of Δz energy": float(resid.pow(2).sum() / dz.double().pow(2).sum())})


class LinearVMFHead(VMFMagnitudeHead):
    def __init__(self, cfg: LinearConfig, build: BuildContext):
        super().__init__(VMFMagnitudeConfig(hidden=1, layers=1, dim=cfg.dim), build)
        d = self.dim
        self.cfg_linear = cfg
        self.trunk = nn.Identity()
        self.direction = nn.Linear(d, d)
        self.log_kappa = nn.Linear(d, 1)
        self.log_m = nn.Linear(d, 2)
        for layer in (self.direction, self.log_kappa, self.log_m):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.constant_(self.log_kappa.bias, math.log(d))

    @torch.no_grad()
    def fit(self, ctx, max_items: int = 0) -> None:
        """Least squares for the mean direction and for log ‖Δz‖; κ and σ_m by maximum likelihood."""
        z, dz = _train_pairs(ctx, max_items)
        w, b = least_squares(z, dz, self.cfg_linear.ridge)
        self.direction.weight.copy_(w.float())
        self.direction.bias.copy_(b.float())
        m = dz.norm(dim=-1).clamp_min(self.cfg.min_magnitude)
        pred = z.double() @ w.T + b
        cos = float((torch.nn.functional.cosine_similarity(pred, dz.double(), dim=-1)).mean())
        kappa = vmf_kappa_mle(self.dim, cos)
        self.log_kappa.weight.zero_()
        self.log_kappa.bias.fill_(math.log(kappa))
        wm, bm = least_squares(z, m.log()[:, None], self.cfg_linear.ridge)
        resid = m.log().double() - (z.double() @ wm.T + bm).squeeze(-1)
        self.log_m.weight.zero_()
        self.log_m.bias.zero_()
        self.log_m.weight[0].copy_(wm[0].float())
        self.log_m.bias[0] = float(bm[0])
        self.log_m.bias[1] = math.log(max(float(resid.std()), math.exp(self.cfg.min_log_sigma)))
        _fit_summary(ctx, self, z, dz, {"mean cos": cos, "κ": kappa})


class LinearFullGaussianHead(Head):
    """Δz ~ N(W z + b, L Lᵀ) with L the Cholesky factor of the residual covariance (trainable)."""

    min_log_sigma = -7.0  # floor on the diagonal of L (as the Gaussian heads' log σ)

    def attach_memory(self, memory, point):
        raise ConfigError("memory", "the linear head with output = 'gaussian_full' takes no memory (use output = 'gaussian')")

    def __init__(self, cfg: LinearConfig, build: BuildContext):
        super().__init__()
        d = _check_dim(cfg.dim, build)
        self.cfg_linear = cfg
        self.dim = d
        self.mu = nn.Linear(d, d)
        nn.init.zeros_(self.mu.weight)
        nn.init.zeros_(self.mu.bias)
        self.scale_offdiag = nn.Parameter(torch.zeros(d, d))  # only the strict lower triangle is used
        self.scale_log_diag = nn.Parameter(torch.zeros(d))

    def scale_tril(self) -> torch.Tensor:
        log_diag = self.scale_log_diag.clamp_min(self.min_log_sigma)
        return torch.tril(self.scale_offdiag, -1) + torch.diag_embed(log_diag.exp())

    def loc(self, z: torch.Tensor) -> torch.Tensor:
        """E[Δz | z] (a subclass adds a correction)."""
        return self.mu(z)

    def nll_and_step(self, z, dz, mode: str = "mean", generator=None):
        """(NLL of dz | z, the rollout step from z: the mean or a reparameterised draw)."""
        mu = self.loc(z)
        tril = self.scale_tril()
        white = torch.linalg.solve_triangular(tril, (dz - mu).unsqueeze(-1), upper=False).squeeze(-1)
        log_det = tril.diagonal().log().sum()
        nll = 0.5 * white.pow(2).sum(-1) + log_det + self.dim * _HALF_LOG_2PI
        if mode == "mean":
            return nll, mu
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return nll, mu + eps @ tril.T

    def nll(self, z: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
        return self.nll_and_step(z, dz)[0]

    def mean_step(self, z: torch.Tensor) -> torch.Tensor:
        return self.loc(z)

    def sample_step(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mu = self.loc(z)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + eps @ self.scale_tril().T

    def forward(self, z):
        return self.mean_step(z)

    @torch.no_grad()
    def fit(self, ctx, max_items: int = 0) -> None:
        """Closed-form least squares of Δz on z, then the Cholesky factor of the residual covariance."""
        z, dz = _train_pairs(ctx, max_items)
        w, b = least_squares(z, dz, self.cfg_linear.ridge)
        self.mu.weight.copy_(w.float())
        self.mu.bias.copy_(b.float())
        resid = dz.double() - (z.double() @ w.T + b)
        cov = torch.cov(resid.T) + math.exp(2 * self.min_log_sigma) * torch.eye(self.dim, dtype=resid.dtype, device=resid.device)
        tril = torch.linalg.cholesky(cov)
        self.scale_offdiag.copy_(torch.tril(tril, -1).float())
        self.scale_log_diag.copy_(tril.diagonal().log().float())
        eig = torch.linalg.eigvalsh(cov).flip(0)
        _fit_summary(ctx, self, z, dz, {"residual share of Δz energy": float(resid.pow(2).sum() / dz.double().pow(2).sum()),
                                         "residual variance in its top 8 directions": float(eig[:8].sum() / eig.sum())})


def LinearHead(cfg: LinearConfig, build: BuildContext):
    """The `linear` head: a LinearGaussianHead, LinearFullGaussianHead or LinearVMFHead by `output`."""
    if cfg.output == "vmf":
        return LinearVMFHead(cfg, build)
    return LinearFullGaussianHead(cfg, build) if cfg.output == "gaussian_full" else LinearGaussianHead(cfg, build)
