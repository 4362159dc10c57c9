"""Slot-usage, collision and gate telemetry of one Engram block, off the hot path.

The forward hands over what it already made — the rows it read (N, H), the n-gram mixes
(N, O) they came from and, with padding, which of the N positions are real — and does
only device-side work of fixed shape with it, never a host synchronisation:

- `usage` (a buffer, one count per table row): one `index_add_` of the rows read (padded
  positions add 0);
- a ring buffer of `capacity` (mix, rows, real) entries, written by `index_copy_` at a
  device-side position: each
  forward contributes an evenly strided sample of at most capacity / 8 positions, so the
  buffer always spans several forwards and a decode step (N = batch) costs two tiny copies;
- the gate values of the last forward, kept by reference (and their padding mask).

The reductions (distinct n-grams, slots shared by several of them, gate means, boolean
selection of real positions) run when `stats()` / `histograms()` ask, at evaluation time.
The collision rate is computed from the rows the forward read, not by hashing again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .hashing import NgramHasher


class BlockTelemetry(nn.Module):
    def __init__(self, n_rows: int, n_orders: int, heads_per_order: int, capacity: int = 65536):
        super().__init__()
        self.capacity = int(capacity)
        self.heads_per_order = int(heads_per_order)
        # not saved in checkpoints: telemetry is not state
        self.register_buffer("usage", torch.zeros(n_rows, dtype=torch.long), persistent=False)
        self.register_buffer("sample_mixes", torch.zeros(self.capacity, n_orders, dtype=torch.long), persistent=False)
        self.register_buffer("sample_rows", torch.zeros(self.capacity, n_orders * heads_per_order, dtype=torch.long), persistent=False)
        self.register_buffer("sample_real", torch.zeros(self.capacity, dtype=torch.bool), persistent=False)
        self.register_buffer("written", torch.zeros((), dtype=torch.long), persistent=False)  # entries since the last clear
        self.gate: torch.Tensor | None = None
        self.gate_real: torch.Tensor | None = None

    @torch.no_grad()
    def record(self, rows: torch.Tensor, mixes: torch.Tensor, real: torch.Tensor | None, gate: torch.Tensor) -> None:
        """rows (N, H), mixes (N, O), real (N,) bool or None (all real), gate (N, 1)."""
        n = rows.shape[0]
        weight = torch.ones_like(rows) if real is None else real[:, None].expand_as(rows).long()
        self.usage.index_add_(0, rows.reshape(-1), weight.reshape(-1))
        self.gate, self.gate_real = gate.detach(), real
        take = min(n, max(1, self.capacity // 8))
        stride = max(1, n // take)
        pick = slice(0, stride * take, stride)
        self._write(mixes[pick], rows[pick], real[pick] if real is not None else None)

    def _write(self, mixes, rows, real) -> None:
        # the write position lives on the device: no host value changes per forward, so
        # nothing syncs and torch.compile has nothing to re-specialise on
        k = mixes.shape[0]
        at = (self.written + torch.arange(k, device=mixes.device)) % self.capacity
        self.sample_mixes.index_copy_(0, at, mixes)
        self.sample_rows.index_copy_(0, at, rows)
        self.sample_real.index_copy_(0, at, torch.ones(k, dtype=torch.bool, device=mixes.device) if real is None else real)
        self.written.add_(k)

    # -- reductions (evaluation time) ------------------------------------------------
    def gates(self) -> torch.Tensor | None:
        """Gate values of the real positions of the last recorded forward (flat, fp32)."""
        if self.gate is None:
            return None
        g = self.gate.flatten() if self.gate_real is None else self.gate.reshape(-1)[self.gate_real.reshape(-1)]
        return g.float()

    def clear_gate(self) -> None:
        self.gate = self.gate_real = None

    def sampled(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixes (M, O), rows (M, H)) of the real sampled positions since the last clear."""
        n = min(int(self.written), self.capacity)  # the one sync, at evaluation time
        real = self.sample_real[:n]
        return self.sample_mixes[:n][real], self.sample_rows[:n][real]

    def collision_rate(self, moduli: torch.Tensor) -> tuple[float, float]:
        """(observed, birthday expectation) fraction of distinct sampled n-grams that share
        their slot with another distinct n-gram, averaged over heads; nan without a sample."""
        mixes, rows = self.sampled()
        if mixes.shape[0] == 0:
            return float("nan"), float("nan")
        return rows_collision_stats(mixes, rows, moduli, self.heads_per_order)

    def clear_sample(self) -> None:
        self.written.zero_()

    def reset(self) -> None:
        self.usage.zero_()
        self.clear_sample()
        self.clear_gate()


def rows_collision_stats(mixes: torch.Tensor, rows: torch.Tensor, moduli: torch.Tensor, heads_per_order: int) -> tuple[float, float]:
    """Observed vs birthday-bound collision fraction from mixes (N, O) and the rows (N, H)
    the forward read for them (N positions, repeats allowed)."""
    rates, expected = [], []
    for o in range(mixes.shape[1]):
        uniq, first = torch.unique(mixes[:, o], return_inverse=True)
        m = uniq.numel()
        # one row per distinct n-gram: the row of any of its positions (rows are a function of the mix)
        pos = torch.empty(m, dtype=torch.long, device=mixes.device).scatter_(0, first, torch.arange(first.numel(), device=mixes.device))
        for j in range(heads_per_order):
            h = o * heads_per_order + j
            slots = rows[pos, h]
            _, inverse, counts = torch.unique(slots, return_inverse=True, return_counts=True)
            rates.append(float((counts[inverse] > 1).float().mean()))
            p = int(moduli[h])
            expected.append(1.0 - (1.0 - 1.0 / p) ** (m - 1))
    return sum(rates) / len(rates), sum(expected) / len(expected)


def collision_stats(mixes: torch.Tensor, hasher: NgramHasher) -> tuple[float, float]:
    """Observed vs birthday-bound collision fraction for distinct n-grams `mixes` (N, O),
    hashing them again with `hasher` (a check of `rows_collision_stats`, which reads the rows)."""
    rates, expected = [], []
    for o in range(mixes.shape[1]):
        uniq = torch.unique(mixes[:, o])
        m = uniq.numel()
        for j in range(hasher.heads_per_order):
            h = o * hasher.heads_per_order + j
            p = int(hasher.moduli[h])
            slots = torch.remainder(uniq, p)
            _, inverse, counts = torch.unique(slots, return_inverse=True, return_counts=True)
            rates.append(float((counts[inverse] > 1).float().mean()))
            expected.append(1.0 - (1.0 - 1.0 / p) ** (m - 1))
    return sum(rates) / len(rates), sum(expected) / len(expected)
