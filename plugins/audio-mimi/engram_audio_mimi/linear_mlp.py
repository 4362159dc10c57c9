"""`linear_mlp`: the closed-form linear head plus an MLP correction that starts at zero.

Every output of the `linear` head (Gaussian: μ, log σ; vMF: direction, log κ, μ_m, log σ_m)
gets an additive correction from an MLP of z whose last layer is initialised to zero:

    μ(z) = W z + b + g_μ(z),   log σ(z) = c + g_σ(z)              (output = "gaussian")

A `fit` stage (`kind = "fit"`, `target = "head"`, `action = "fit"`) sets the linear part by
least squares exactly as the `linear` head does, so after it the head *is* the linear
baseline; a train stage then fits the correction (and may move the linear part). Why: at
D = 512 most of Δz's predictable energy is the linear cancellation of the off-manifold
noise, which a plain MLP must relearn through its hidden layers from a few tens of speakers
and overfits (docs/results/audio-mimi.md, D = 512); starting from the least-squares
solution leaves the MLP only the nonlinear remainder. Choose its steps on a `val` split
(`data.val_fraction`), never on the eval speakers.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from engram_core.components import BuildContext
from engram_core.config import field, non_negative, one_of, positive

from .heads import _mlp
from .linear import LinearConfig, LinearFullGaussianHead, LinearGaussianHead, LinearVMFHead


@attrs.frozen
class LinearMLPConfig:
    output: str = field(
        "gaussian",
        help="output distribution: gaussian (diagonal) | gaussian_full (full covariance, fitted in closed form; "
        "the correction moves the mean only) | vmf (direction × log-normal magnitude)",
        validator=one_of("gaussian", "gaussian_full", "vmf"),
    )
    hidden: int = field(256, help="width of each hidden layer of the correction MLP", validator=positive)
    layers: int = field(2, help="hidden layers of the correction MLP", validator=positive)
    ridge: float = field(1e-6, help="ridge λ of the closed-form linear part, relative to the mean diagonal of ZᵀZ", validator=non_negative)
    dim: int = field(0, help="D of z; 0 = take it from the data", validator=non_negative)


def _correction(d: int, hidden: int, layers: int, outputs: int) -> tuple[nn.Sequential, nn.Linear]:
    trunk, width = _mlp(d, hidden, layers)
    last = nn.Linear(width, outputs)
    nn.init.zeros_(last.weight)  # a built (or just fitted) head is exactly the linear one
    nn.init.zeros_(last.bias)
    return trunk, last


class LinearMLPGaussianHead(LinearGaussianHead):
    """Diagonal Gaussian: linear μ and log σ plus an MLP correction of both."""

    def __init__(self, cfg: LinearMLPConfig, build: BuildContext):
        super().__init__(LinearConfig(output="gaussian", ridge=cfg.ridge, dim=cfg.dim), build)
        self.correction_trunk, self.correction = _correction(self.dim, cfg.hidden, cfg.layers, 2 * self.dim)

    def predict_param(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d_mu, d_log_sigma = self.correction(self.correction_trunk(z)).chunk(2, dim=-1)
        return self.mu(z) + d_mu, (self.log_sigma(z) + d_log_sigma).clamp_min(self.min_log_sigma)


class LinearMLPVMFHead(LinearVMFHead):
    """vMF × log-normal magnitude: linear direction, log κ, μ_m and log σ_m plus an MLP correction."""

    def __init__(self, cfg: LinearMLPConfig, build: BuildContext):
        super().__init__(LinearConfig(output="vmf", ridge=cfg.ridge, dim=cfg.dim), build)
        self.correction_trunk, self.correction = _correction(self.dim, cfg.hidden, cfg.layers, self.dim + 3)

    def raw_outputs(self, z: torch.Tensor):
        direction, log_kappa, mu_m, log_sigma_m = super().raw_outputs(z)
        c = self.correction(self.correction_trunk(z))
        d_dir, d_kappa, d_mu_m, d_sigma_m = c.split([self.dim, 1, 1, 1], dim=-1)
        return (direction + d_dir, log_kappa + d_kappa.squeeze(-1), mu_m + d_mu_m.squeeze(-1),
                log_sigma_m + d_sigma_m.squeeze(-1))


class LinearMLPFullGaussianHead(LinearFullGaussianHead):
    """Full-covariance Gaussian: linear mean plus an MLP correction; the covariance is the
    fitted residual one (trainable, not a function of z)."""

    def __init__(self, cfg: LinearMLPConfig, build: BuildContext):
        super().__init__(LinearConfig(output="gaussian_full", ridge=cfg.ridge, dim=cfg.dim), build)
        self.correction_trunk, self.correction = _correction(self.dim, cfg.hidden, cfg.layers, self.dim)

    def loc(self, z: torch.Tensor) -> torch.Tensor:
        return self.mu(z) + self.correction(self.correction_trunk(z))


def LinearMLPHead(cfg: LinearMLPConfig, build: BuildContext):
    """The `linear_mlp` head by `output`: LinearMLPGaussianHead, LinearMLPFullGaussianHead or LinearMLPVMFHead."""
    if cfg.output == "vmf":
        return LinearMLPVMFHead(cfg, build)
    return LinearMLPFullGaussianHead(cfg, build) if cfg.output == "gaussian_full" else LinearMLPGaussianHead(cfg, build)
