"""HRR capacity: measured recall cosine and clean-up accuracy against the theory (deq-hrr).

For each dimension d and load n (pairs superposed in one trace), bind n random key/value
pairs, unbind the first and compare with the stored value:
  * recall cosine vs 1/√(n+1) (Gaussian keys) and 1/√n (unitary keys);
  * clean-up accuracy: the recovered value's nearest neighbour among M = 16 candidate values
    (the n stored values plus random distractors) is the right one;
  * the same with the memory's per-write renormalisation (recency-weighted trace).
Prints a table and writes benchmarks/results/deq_hrr_capacity.json.

    OMP_NUM_THREADS=1 python benchmarks/deq_hrr_capacity.py        (about 10 s on one core)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from engram_deq_hrr.hrr import bind, cosine, expected_recall_cosine, random_keys, unbind

TRIALS = 256
CANDIDATES = 16


def measure(dim: int, n: int, unitary: bool, renorm: bool, g: torch.Generator) -> dict:
    keys = random_keys((TRIALS, n), dim, g, unitary=unitary)
    values = random_keys((TRIALS, n), dim, g)
    bound = bind(keys, values)
    if renorm:  # m ← normalise(m + w_t), as the hrr memory's renorm = "per_write" with α = β = 1
        m = torch.zeros(TRIALS, dim)
        for t in range(n):
            m = m + bound[:, t]
            m = m / m.norm(dim=-1, keepdim=True)
        trace = m
    else:
        trace = bound.sum(1)
    probe = 0  # the first (oldest) pair: the hardest one under per-write renormalisation
    rec = unbind(trace, keys[:, probe])
    cos = cosine(rec, values[:, probe])
    distractors = random_keys((TRIALS, max(CANDIDATES - n, 0)), dim, g)
    cands = torch.cat([values, distractors], 1)[:, :max(CANDIDATES, n)]
    sims = cosine(rec.unsqueeze(1), cands)
    acc = (sims.argmax(-1) == probe).float().mean()
    return {"d": dim, "n": n, "unitary": unitary, "per_write_renorm": renorm, "cos_mean": round(cos.mean().item(), 4),
            "cos_std": round(cos.std().item(), 4), "theory": round(expected_recall_cosine(n, unitary), 4),
            "cleanup_acc": round(acc.item(), 4)}


def main() -> None:
    g = torch.Generator().manual_seed(0)
    rows = []
    for dim in (64, 128, 256, 512):
        for n in (1, 2, 4, 8, 16, 32):
            for unitary in (False, True):
                rows.append(measure(dim, n, unitary, False, g))
            rows.append(measure(dim, n, False, True, g))
    print(f"{'d':>4} {'n':>3} {'keys':>8} {'renorm':>7} {'cos':>7} {'±':>6} {'theory':>7} {'cleanup':>8}")
    for r in rows:
        print(f"{r['d']:>4} {r['n']:>3} {'unitary' if r['unitary'] else 'gauss':>8} {str(r['per_write_renorm']):>7} "
              f"{r['cos_mean']:>7.3f} {r['cos_std']:>6.3f} {r['theory']:>7.3f} {r['cleanup_acc']:>8.3f}")
    out = Path(__file__).parent / "results" / "deq_hrr_capacity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"trials": TRIALS, "candidates": CANDIDATES, "rows": rows}, indent=1))
    print(f"wrote {out}")
    _ = math


if __name__ == "__main__":
    main()
