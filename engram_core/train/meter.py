"""Training-step values kept on the device until a log step reads them.

A training step on a GPU must not wait for the GPU: reading the loss as a Python number
(`float(loss)`, `loss.item()`, `if loss != loss`) makes the host wait until every queued
kernel has run, so the next step cannot be queued while this one computes. `StepMeter`
keeps each step's loss and tensor terms as one row of a small table on the run's device:

* `add` writes the step's row where a device-side slot counter points and advances the
  counter: three kernel launches and no synchronisation (an eager step of a small model on a
  GPU is its launches, so the engine's own bookkeeping is kept to these);
* `read` copies the window's rows to the host in one transfer (one synchronisation),
  averages them there in float64, finds the first row whose loss is NaN or inf, and starts
  a new window; `nonfinite` does the same check without starting one.

The table holds `capacity` rows: the engine reads at every log step, so a window never has
more steps than `log_every`, and the engine gives it one row more than that. Terms an objective returns as Python numbers are summed on the
host; a captured CUDA graph cannot update those (engram_core.train.graphs refuses them).
"""

from __future__ import annotations

import math

import attrs
import torch


@attrs.frozen
class NonFiniteStep:
    """The first step of a stage whose loss was NaN or inf."""

    step: int  # 1-based step of the stage
    loss: float
    terms: dict[str, float]


@attrs.frozen
class MeterReading:
    steps: int  # steps added since the previous reading
    means: dict[str, float]  # "loss" and every term, averaged over those steps
    nonfinite: NonFiniteStep | None


class StepMeter:
    """Device-side rows [loss, *terms] of the steps since the last `read()`."""

    def __init__(self, device: torch.device, first_step: int = 0, capacity: int = 1024):
        self.device = device
        self.capacity = max(1, capacity)
        self.keys: list[str] = []  # tensor terms, in the order first seen (columns 1.. of a row)
        self.rows = torch.zeros(self.capacity, 1, dtype=torch.float32, device=device)
        self.slot = torch.zeros(1, dtype=torch.int64, device=device)  # the row the next step writes
        self.host_sums: dict[str, float] = {}  # terms returned as Python numbers
        self.host_last: dict[str, float] = {}
        self.window_start = first_step  # stage steps done before the window's first row
        self.steps = 0  # host count of steps in this window
        self.first_bad: NonFiniteStep | None = None  # found by a read; kept: the stage stops
        self.scanned = 0  # rows of the window a check has looked at
        self.last_loss: torch.Tensor | None = None  # the latest step's loss (a device tensor)
        self._zero: torch.Tensor | None = None  # a term a step did not return counts 0

    def _grow(self, new_keys: list[str]) -> None:
        """Columns for terms first seen now (earlier rows of the window count them as 0)."""
        self.keys += new_keys
        self.rows = torch.cat([self.rows, self.rows.new_zeros(self.capacity, len(new_keys))], dim=1)

    def add(self, loss: torch.Tensor, terms: dict) -> None:
        """Device work of one step: its row, written at the slot; the slot advanced. No host sync."""
        tensor_terms = {k: v for k, v in terms.items() if k != "loss" and isinstance(v, torch.Tensor)}
        for k, v in terms.items():
            if k != "loss" and not isinstance(v, torch.Tensor):
                self.host_sums[k] = self.host_sums.get(k, 0.0) + float(v)
                self.host_last[k] = float(v)
        new = [k for k in tensor_terms if k not in self.keys]
        if new:
            self._grow(new)
        parts = [loss.detach().reshape(()).float()]
        parts += [tensor_terms[k].detach().reshape(()).float() if k in tensor_terms else self._zeros(loss) for k in self.keys]
        row = torch.stack(parts)
        self.last_loss = row[0]
        self.rows.index_copy_(0, self.slot, row[None])
        self.slot.add_(1)

    def _zeros(self, like: torch.Tensor) -> torch.Tensor:
        if self._zero is None:
            self._zero = like.new_zeros((), dtype=torch.float32)
        return self._zero

    def count_step(self) -> None:
        """Host bookkeeping of one step (outside a captured graph)."""
        self.steps += 1
        if self.steps >= self.capacity:  # the next step's row would fall past the table (a device-side error)
            raise RuntimeError(f"StepMeter: {self.steps} steps without a read fill its {self.capacity} rows")

    def _scan(self, rows: list[list[float]], first: int) -> NonFiniteStep | None:
        """The first non-finite loss among `rows` (rows `first`.. of the window), once found kept."""
        if self.first_bad is None:
            for i, row in enumerate(rows):
                if not math.isfinite(row[0]):
                    terms = dict(zip(self.keys, row[1:]))
                    terms.update(self.host_last)
                    self.first_bad = NonFiniteStep(self.window_start + first + i + 1, row[0], terms)
                    break
        self.scanned = first + len(rows)
        return self.first_bad

    def nonfinite(self) -> NonFiniteStep | None:
        """The first non-finite step so far, or None (one small synchronisation). Reads only
        the rows no check has seen: on the CPU the engine checks after every step."""
        if self.first_bad is not None or self.scanned >= self.steps:
            return self.first_bad
        return self._scan(self.rows[self.scanned : self.steps].tolist(), self.scanned)

    def read(self) -> MeterReading:
        """Means since the last read and the first non-finite step; starts a new window."""
        rows = self.rows[: self.steps].tolist() if self.steps else []
        n = max(self.steps, 1)
        columns = list(zip(*rows)) if rows else [()] * (len(self.keys) + 1)
        sums = [math.fsum(c) for c in columns]
        means = {"loss": sums[0] / n, **{key: v / n for key, v in zip(self.keys, sums[1:])}}
        means.update({key: v / n for key, v in self.host_sums.items()})
        reading = MeterReading(self.steps, means, self._scan(rows, 0))
        self.window_start += self.steps
        self.scanned = 0
        self.slot.zero_()
        self.host_sums = {}
        self.steps = 0
        return reading
