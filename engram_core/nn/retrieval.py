"""Soft top-k retrieval: w_i ∝ softmax(-||q - c_i||² / τ) over the k nearest keys."""

import torch


def soft_topk_weights(query: torch.Tensor, keys: torch.Tensor, k: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (…, k) of the k nearest keys to each query and their weights (sum to one).

    query (…, D), keys (M, D). Distances are squared Euclidean; k is clipped to M.

    The k nearest are chosen without gradient from the whole (…, M) score matrix, and their
    distances recomputed from the k picked keys: the gradient is the one top-k gives (it
    reaches only the picked entries), but the backward touches k keys a query instead of a
    dense (…, M) matrix, and the forward keeps no such matrix for it
    (`benchmarks/soft_topk.py` times both).
    """
    k = min(int(k), keys.shape[0])
    flat = query.reshape(-1, query.shape[-1])
    with torch.no_grad():
        # nearest = largest 2 q·k − |k|²: |q|² is the same for every key of a query, so
        # dropping it keeps the order, and the rest is one matrix multiply-add
        scores = torch.addmm(keys.pow(2).sum(-1), flat, keys.T, beta=-1, alpha=2)
        idx = torch.topk(scores, k, dim=-1).indices
    d2 = (flat.unsqueeze(1) - keys[idx]).pow(2).sum(-1)  # (N, k), differentiable
    w = torch.softmax(-d2 / tau, dim=-1)
    shape = query.shape[:-1] + (k,)
    return idx.reshape(shape), w.reshape(shape)


def soft_topk(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k: int, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of the values (M, …) of the k nearest keys; returns (retrieved, weights)."""
    idx, w = soft_topk_weights(query, keys, k, tau)
    picked = values[idx]  # (…, k, V…)
    extra = picked.dim() - w.dim()
    wv = w.reshape(w.shape + (1,) * extra)
    return (wv * picked).sum(dim=w.dim() - 1), w
