"""k-means over fit data: the keys of the retrieval memories, the basis memory's initial
prototypes and the archetypes metric's clusters."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engram_core.config import ConfigError


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
    """Index of the nearest centroid of `c` (k, D) for each row of `x` (N, D), in Euclidean distance."""
    d2 = x.pow(2).sum(-1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(-1)
    return d2.argmin(-1)
