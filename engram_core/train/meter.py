"""Training-step values kept on the device until a log step reads them.

A training step on a GPU must not wait for the GPU: reading the loss as a Python number
(`float(loss)`, `loss.item()`, `if loss != loss`) makes the host wait until every queued
kernel has run, so the next step cannot be queued while this one computes. `StepMeter`
keeps what the engine needs from each step as tensors on the run's device:

* running sums of the loss and of every tensor term since the last read (float64);
* the first step whose loss was not finite, with the loss and terms of that step.

`add` is a handful of device operations and no synchronisation; `read` copies everything
to the host in one transfer (one synchronisation) and starts a new window. Terms an
objective returns as Python numbers are summed on the host; a captured CUDA graph cannot
update those (engram_core.train.graphs refuses them).
"""

from __future__ import annotations

import attrs
import torch


@attrs.frozen
class NonFiniteStep:
    """The first step of a window whose loss was NaN or inf."""

    step: int  # 1-based step of the stage
    loss: float
    terms: dict[str, float]


@attrs.frozen
class MeterReading:
    steps: int  # steps added since the previous reading
    means: dict[str, float]  # "loss" and every term, averaged over those steps
    nonfinite: NonFiniteStep | None


class StepMeter:
    """Device-side loss and term sums of the steps since the last `read()`."""

    def __init__(self, device: torch.device, first_step: int = 0):
        self.device = device
        self.keys: list[str] = []  # tensor terms, in the order first seen
        self.sums = torch.zeros(1, dtype=torch.float64, device=device)  # [loss, *keys]
        self.host_sums: dict[str, float] = {}  # terms returned as Python numbers
        self.host_last: dict[str, float] = {}
        # step counter, first non-finite step (-1: none yet) and its values, all on the device
        self.counter = torch.full((), first_step, dtype=torch.int64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_values = torch.zeros(1, dtype=torch.float64, device=device)
        self.steps = 0  # host count of steps in this window
        self.last_loss: torch.Tensor | None = None  # the latest step's loss (a device tensor)

    def _grow(self, new_keys: list[str]) -> None:
        self.keys += new_keys
        pad = torch.zeros(len(new_keys), dtype=torch.float64, device=self.device)
        self.sums = torch.cat([self.sums, pad])
        self.bad_values = torch.cat([self.bad_values, pad])

    def add(self, loss: torch.Tensor, terms: dict) -> None:
        """Device work of one step: counter, sums, first non-finite step. No host sync."""
        tensor_terms = {k: v for k, v in terms.items() if k != "loss" and isinstance(v, torch.Tensor)}
        for k, v in terms.items():
            if k != "loss" and not isinstance(v, torch.Tensor):
                self.host_sums[k] = self.host_sums.get(k, 0.0) + float(v)
                self.host_last[k] = float(v)
        new = [k for k in tensor_terms if k not in self.keys]
        if new:
            self._grow(new)
        zero = loss.new_zeros((), dtype=torch.float64)
        parts = [loss.detach().reshape(()).to(torch.float64)]
        parts += [tensor_terms[k].detach().reshape(()).to(torch.float64) if k in tensor_terms else zero for k in self.keys]
        values = torch.stack(parts)
        self.last_loss = parts[0]
        self.sums += values
        self.counter += 1
        newly_bad = (~torch.isfinite(values[0])) & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(newly_bad, self.counter, self.first_bad))
        self.bad_values.copy_(torch.where(newly_bad, values, self.bad_values))

    def count_step(self) -> None:
        """Host bookkeeping of one step (outside a captured graph)."""
        self.steps += 1

    def nonfinite(self) -> NonFiniteStep | None:
        """The first non-finite step so far, or None (one small synchronisation)."""
        if int(self.first_bad) < 0:  # the common case: one scalar read
            return None
        packed = torch.cat([self.first_bad.reshape(1).to(torch.float64), self.bad_values]).tolist()
        return self._bad(packed)

    def _bad(self, packed: list[float]) -> NonFiniteStep | None:
        if packed[0] < 0:
            return None
        terms = dict(zip(self.keys, packed[2:]))
        terms.update(self.host_last)
        return NonFiniteStep(int(packed[0]), packed[1], terms)

    def read(self) -> MeterReading:
        """Means since the last read and the first non-finite step; starts a new window."""
        packed = torch.cat([self.sums, self.first_bad.reshape(1).to(torch.float64), self.bad_values]).tolist()
        n = max(self.steps, 1)
        k = len(self.keys) + 1
        means = {"loss": packed[0] / n, **{key: v / n for key, v in zip(self.keys, packed[1:k])}}
        means.update({key: v / n for key, v in self.host_sums.items()})
        reading = MeterReading(self.steps, means, self._bad(packed[k:]))
        self.sums.zero_()
        self.host_sums = {}
        self.steps = 0
        return reading
