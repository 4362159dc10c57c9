"""The NCE scheduler on scripted read-quality sequences."""

import pytest
import torch
from engram_deq_hrr.scheduler import NCEScheduler, NCESchedulerConfig

from engram_core.config import ConfigError, structure


def run(cfg: NCESchedulerConfig, reads, accs=None):
    s = NCEScheduler(cfg)
    accs = accs or [0.5] * len(reads)
    history = [s.epoch_end(r, a) for r, a in zip(reads, accs)]
    return s, history


def test_opens_when_read_ema_crosses_threshold_and_never_before():
    cfg = NCESchedulerConfig(read_threshold=0.6, read_ema_decay=0.0, warm_start_epochs=0, read_patience=1)
    s, h = run(cfg, [0.1, 0.3, 0.59, 0.61, 0.7])
    assert [x["gate_open"] for x in h] == [0, 0, 0, 1, 1]
    assert [x["lambda"] for x in h][:3] == [0, 0, 0]
    assert h[3]["lambda"] == cfg.lambda_start


def test_never_opens_below_threshold():
    cfg = NCESchedulerConfig(read_threshold=0.7, warm_start_epochs=0)
    s, h = run(cfg, [0.69] * 20)
    assert not s.gate_open and all(x["lambda"] == 0 for x in h)
    assert s.gate_open_fraction() == 0


def test_warm_start_blocks_opening():
    cfg = NCESchedulerConfig(read_threshold=0.5, read_ema_decay=0.0, warm_start_epochs=3)
    s, h = run(cfg, [0.9] * 5)
    assert [x["gate_open"] for x in h] == [0, 0, 0, 1, 1]


def test_patience_needs_consecutive_epochs():
    cfg = NCESchedulerConfig(read_threshold=0.5, read_ema_decay=0.0, warm_start_epochs=0, read_patience=2)
    s, h = run(cfg, [0.6, 0.4, 0.6, 0.6, 0.6])
    assert [x["gate_open"] for x in h] == [0, 0, 0, 1, 1]


def test_ema_smooths_read_quality():
    cfg = NCESchedulerConfig(read_threshold=0.6, read_ema_decay=0.5, warm_start_epochs=0)
    s, h = run(cfg, [0.2, 1.0, 1.0])
    assert h[0]["read_ema"] == pytest.approx(0.2)
    assert h[1]["read_ema"] == pytest.approx(0.6)
    assert [x["gate_open"] for x in h] == [0, 1, 1]


def test_freeze_then_ramp_then_cap():
    cfg = NCESchedulerConfig(read_threshold=0.5, read_ema_decay=0.0, warm_start_epochs=0, freeze_epochs_after_open=2,
                             lambda_start=0.001, lambda_increment=0.004, lambda_max=0.01)
    s, h = run(cfg, [0.9] * 8)
    lams = [round(x["lambda"], 6) for x in h]
    # open at 1, frozen at epochs 2-3, then +0.004 per epoch, capped at 0.01
    assert lams == [0.001, 0.001, 0.001, 0.005, 0.009, 0.01, 0.01, 0.01]


def test_pause_below_read_holds_lambda():
    cfg = NCESchedulerConfig(read_threshold=0.5, read_ema_decay=0.0, warm_start_epochs=0, freeze_epochs_after_open=0,
                             lambda_start=0.001, lambda_increment=0.001, lambda_max=0.1, pause_below_read=0.6)
    s, h = run(cfg, [0.9, 0.9, 0.55, 0.55, 0.9])
    lams = [round(x["lambda"], 6) for x in h]
    assert lams == [0.001, 0.002, 0.002, 0.002, 0.003]
    assert s.gate_open  # pausing never closes the gate


def test_plateau_requirement():
    cfg = NCESchedulerConfig(read_threshold=0.5, read_ema_decay=0.0, warm_start_epochs=0, require_plateau=True,
                             plateau_epochs=2, plateau_delta=0.0)
    # accuracy improves for 3 epochs, then stalls for 2: opens only after the stall
    s, h = run(cfg, [0.9] * 6, [0.5, 0.6, 0.7, 0.7, 0.7, 0.7])
    assert [x["gate_open"] for x in h] == [0, 0, 0, 0, 1, 1]


def test_require_read_false_opens_after_warm_start():
    cfg = NCESchedulerConfig(require_read=False, warm_start_epochs=2)
    s, h = run(cfg, [0.0] * 4)
    assert [x["gate_open"] for x in h] == [0, 0, 1, 1]


def test_disabled_never_opens():
    s, h = run(NCESchedulerConfig(enabled=False, require_read=False, warm_start_epochs=0), [1.0] * 5)
    assert not s.gate_open


def test_cooldown_and_lr_restart():
    cfg = NCESchedulerConfig(read_threshold=0.5, read_ema_decay=0.0, warm_start_epochs=0, write_cooldown_batches=2,
                             lr_restart_factor=0.5, lr_restart_epochs=2)
    s = NCEScheduler(cfg)
    assert not s.take_cooldown_batch()
    s.epoch_end(0.9, 0.5)
    assert s.lr_scale == 0.5
    assert s.take_cooldown_batch() and s.take_cooldown_batch() and not s.take_cooldown_batch()
    s.epoch_end(0.9, 0.5)
    assert s.lr_scale == pytest.approx(0.75)
    s.epoch_end(0.9, 0.5)
    assert s.lr_scale == pytest.approx(1.0)


def test_oracle_mix_ramp_and_floor():
    cfg = NCESchedulerConfig(oracle_mix_start=0.5, oracle_mix_ramp=0.2, oracle_mix_floor=0.1, warm_start_epochs=1,
                             read_threshold=1.0)
    s = NCEScheduler(cfg)
    mixes = [s.epoch_end(0.0, 0.5)["oracle_mix"] for _ in range(5)]
    assert mixes == pytest.approx([0.5, 0.3, 0.1, 0.1, 0.1])


def test_post_gate_drop_alarm():
    cfg = NCESchedulerConfig(read_threshold=0.5, read_ema_decay=0.0, warm_start_epochs=0, drop_tolerance=0.02)
    s, h = run(cfg, [0.3, 0.3, 0.9, 0.9, 0.9, 0.9], [0.9, 0.95, 0.95, 0.94, 0.90, 0.96])
    assert [x["post_gate_drop"] for x in h] == [0, 0, 0, 0, 1, 0]
    assert s.post_gate_drop_epochs == 1
    assert s.best_pre_gate_acc == pytest.approx(0.95)
    assert h[-1]["gate_open_fraction"] == pytest.approx(4 / 6)


def test_state_survives_checkpoint(tmp_path):
    cfg = NCESchedulerConfig(read_threshold=0.5, read_ema_decay=0.3, warm_start_epochs=1, write_cooldown_batches=3)
    a, _ = run(cfg, [0.4, 0.8, 0.9], [0.5, 0.6, 0.55])
    path = tmp_path / "s.pt"
    torch.save(a.state_dict(), path)
    b = NCEScheduler(cfg)
    b.load_state_dict(torch.load(path, weights_only=True))
    for r, acc in [(0.7, 0.6), (0.2, 0.4), (0.9, 0.7)]:
        assert a.epoch_end(r, acc) == b.epoch_end(r, acc)
    assert a.get_extra_state() == b.get_extra_state()


def test_bad_config_is_a_config_error():
    with pytest.raises(ConfigError, match="below its start"):
        structure({"lambda_start": 0.05, "lambda_max": 0.01}, NCESchedulerConfig)
    with pytest.raises(ConfigError, match=r"read_threshold.*\[0, 1\]"):
        structure({"read_threshold": 1.5}, NCESchedulerConfig)
