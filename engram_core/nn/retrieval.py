"""Soft top-k retrieval: w_i ∝ softmax(-||q - c_i||² / τ) over the k nearest keys."""

import torch


def soft_topk_weights(query: torch.Tensor, keys: torch.Tensor, k: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (…, k) of the k nearest keys to each query and their weights (sum to one).

    query (…, D), keys (M, D). Distances are squared Euclidean; k is clipped to M.
    """
    k = min(int(k), keys.shape[0])
    flat = query.reshape(-1, query.shape[-1])
    d2 = (flat.pow(2).sum(-1, keepdim=True) - 2 * flat @ keys.T + keys.pow(2).sum(-1)).clamp_min(0)
    neg, idx = torch.topk(-d2, k, dim=-1)
    w = torch.softmax(neg / tau, dim=-1)
    shape = query.shape[:-1] + (k,)
    return idx.reshape(shape), w.reshape(shape)


def soft_topk(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of the values (M, …) of the k nearest keys; returns (retrieved, weights)."""
    idx, w = soft_topk_weights(query, keys, k, tau)
    picked = values[idx]  # (…, k, V…)
    extra = picked.dim() - w.dim()
    wv = w.reshape(w.shape + (1,) * extra)
    return (wv * picked).sum(dim=w.dim() - 1), w
