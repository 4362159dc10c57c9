"""StepMeter: the loss and terms of the training steps, kept on the device until read."""

from __future__ import annotations

import math

import pytest
import torch

from engram_core.train.meter import StepMeter


def test_means_over_a_window_then_a_fresh_window():
    m = StepMeter(torch.device("cpu"))
    for loss, ce in [(1.0, 2.0), (3.0, 4.0)]:
        m.add(torch.tensor(loss), {"ce": torch.tensor(ce), "lam": 0.5, "loss": torch.tensor(99.0)})
        m.count_step()
    r = m.read()
    assert r.steps == 2 and r.nonfinite is None
    assert r.means == {"loss": 2.0, "ce": 3.0, "lam": 0.5}
    m.add(torch.tensor(5.0), {"ce": torch.tensor(6.0)})
    m.count_step()
    assert m.read().means == {"loss": 5.0, "ce": 6.0}


def test_a_term_that_appears_later_is_averaged_over_the_whole_window():
    m = StepMeter(torch.device("cpu"))
    m.add(torch.tensor(1.0), {})
    m.count_step()
    m.add(torch.tensor(1.0), {"extra": torch.tensor(4.0)})
    m.count_step()
    assert m.read().means == {"loss": 1.0, "extra": 2.0}  # as the engine always averaged: sum / steps


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_the_first_non_finite_step_is_kept_with_its_values(bad):
    m = StepMeter(torch.device("cpu"), first_step=10)  # a resumed stage counts on from its step
    for loss in [1.0, bad, 2.0, math.nan]:
        m.add(torch.tensor(loss), {"ce": torch.tensor(loss * 2)})
        m.count_step()
    found = m.nonfinite()
    assert found is not None and found.step == 12
    assert (found.loss == bad or (math.isnan(found.loss) and math.isnan(bad)))
    assert set(found.terms) == {"ce"}
    reading = m.read()
    assert reading.nonfinite is not None and reading.nonfinite.step == 12  # the read of a log step sees it too
    again = m.nonfinite()
    assert again is not None and again.step == 12  # and it stays: the stage is stopped by whoever checks first


def test_a_finite_run_reads_no_failure():
    m = StepMeter(torch.device("cpu"))
    m.add(torch.tensor(1.0), {})
    assert m.nonfinite() is None


def test_steps_are_counted_over_windows_and_a_check_each_step_sees_each_row_once():
    m = StepMeter(torch.device("cpu"), first_step=100, capacity=4)
    losses = [1.0, 2.0, 3.0, 4.0, math.inf, 6.0]
    for i, loss in enumerate(losses):
        m.add(torch.tensor(loss), {"ce": torch.tensor(loss + 1)})
        m.count_step()
        found = m.nonfinite()  # the CPU's check after every step
        assert (found is None) == (i < 4)
        if (i + 1) % 3 == 0:
            r = m.read()
            assert r.steps == 3
    assert found.step == 105 and found.loss == math.inf and found.terms == {"ce": math.inf}
    assert r.means["loss"] == pytest.approx((4.0 + math.inf + 6.0) / 3)


def test_a_window_as_long_as_the_table_is_an_error_before_a_row_falls_past_it():
    m = StepMeter(torch.device("cpu"), capacity=3)
    for _ in range(2):
        m.add(torch.tensor(1.0), {})
        m.count_step()
    m.add(torch.tensor(1.0), {})
    with pytest.raises(RuntimeError, match="3 steps without a read fill its 3 rows"):
        m.count_step()
