"""Diagonal Gaussian negative log-likelihood, parameterised by log sigma."""

import math

import torch

_LOG_2PI = math.log(2 * math.pi)


def diagonal_gaussian_nll_per_item(mu: torch.Tensor, log_sigma: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """NLL in nats of `target` under N(mu, diag(exp(log_sigma))^2), summed over the last dim.

    Returns one value per item (all leading dims kept). `log_sigma` broadcasts.
    """
    z = (target - mu) * torch.exp(-log_sigma)
    return (0.5 * z.pow(2) + log_sigma + 0.5 * _LOG_2PI).sum(-1)


def gaussian_nll(mu: torch.Tensor, log_sigma: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean (or sum, or none) over items of the per-item diagonal Gaussian NLL (nats per item)."""
    per = diagonal_gaussian_nll_per_item(mu, log_sigma, target)
    if reduction == "mean":
        return per.mean()
    if reduction == "sum":
        return per.sum()
    if reduction == "none":
        return per
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
