"""`NCEScheduler`: opens the InfoNCE term on read quality and ramps its weight λ.

An *epoch* is one evaluation interval of a train stage (`eval_every` steps); the
scheduler advances by one epoch at each `on_eval_end`. Per epoch it receives the mean raw
read cosine of the training batches since the last evaluation (`read_quality`) and the
validation accuracy, and decides:

* read EMA ← decay·EMA + (1-decay)·read_quality (the first epoch sets it);
* the gate may open once `warm_start_epochs` have passed and, when `require_read`, the
  EMA has been ≥ `read_threshold` for `read_patience` consecutive epochs and, when
  `require_plateau`, validation accuracy has not improved by more than `plateau_delta`
  for `plateau_epochs` epochs. Once open it stays open.
* λ: `lambda_start` at opening, held for `freeze_epochs_after_open` epochs, then
  + `lambda_increment` per epoch up to `lambda_max`; increments pause while the EMA is
  below `pause_below_read` (0 = never pause).
* on opening: a write cooldown of `write_cooldown_batches` training batches (no gradient
  reaches the write path) and an LR warm restart: the optimiser's learning rates are
  scaled by `lr_restart_factor` and ramped back linearly over `lr_restart_epochs`.
* oracle mix ρ: `oracle_mix_start` during warm start, then − `oracle_mix_ramp` per epoch
  down to `oracle_mix_floor`.
* alarm: after opening, an epoch whose accuracy is below the best pre-gate accuracy by
  more than `drop_tolerance` raises `post_gate_drop` (and counts `post_gate_drop_epochs`).

The state is plain Python (ints, floats, bools, lists) so it survives checkpoints via
`get_extra_state` / `set_extra_state` and `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import attrs
from torch import nn

from engram_core.config import ConfigError, field, in_range, non_negative, probability


@attrs.frozen
class NCESchedulerConfig:
    """The seed's InfoNCE gate and λ ramp knobs (an epoch = one `eval_every` interval)."""

    enabled: bool = field(True, help="use the InfoNCE term at all (false: λ stays 0)")
    read_threshold: float = field(0.65, help="gate opens when the read EMA reaches this raw read cosine", validator=probability)
    read_threshold_capacity: float = field(0.0, help="when > 0: the read threshold is this fraction of the capacity "
                                                     "cosine 1/sqrt(n+1) of a trace of the data set's n_pairs pairs "
                                                     "(replaces read_threshold)", validator=in_range(0.0, 1.0))
    read_ema_decay: float = field(0.5, help="EMA decay of the per-epoch read quality", validator=probability)
    require_read: bool = field(True, help="require the read EMA >= read_threshold before opening")
    read_patience: int = field(1, help="consecutive epochs the EMA must stay >= threshold", validator=in_range(1, None))
    require_plateau: bool = field(False, help="also require val accuracy to have plateaued")
    plateau_epochs: int = field(2, help="plateau: epochs without improvement", validator=in_range(1, None))
    plateau_delta: float = field(0.005, help="plateau: improvement smaller than this does not count", validator=non_negative)
    warm_start_epochs: int = field(2, help="epochs before the gate may open (oracle mix held at its start)", validator=non_negative)
    freeze_epochs_after_open: int = field(1, help="epochs λ stays at lambda_start after opening", validator=non_negative)
    lambda_start: float = field(0.001, help="λ when the gate opens", validator=non_negative)
    lambda_increment: float = field(0.001, help="λ added per epoch after the freeze", validator=non_negative)
    lambda_max: float = field(0.02, help="cap on λ (must be >= lambda_start)", validator=non_negative)
    pause_below_read: float = field(0.0, help="pause λ increments while the read EMA is below this (0 = never)", validator=probability)
    write_cooldown_batches: int = field(1, help="training batches after opening with no gradient into the write path", validator=non_negative)
    lr_restart_factor: float = field(1.0, help="on opening, scale the LR by this and ramp back (1 = no restart)", validator=in_range(0.0, 1.0))
    lr_restart_epochs: int = field(2, help="epochs over which the LR returns to its base after a warm restart", validator=non_negative)
    oracle_mix_start: float = field(0.0, help="oracle mix ρ (target prototype blended into reads) during warm start", validator=probability)
    oracle_mix_ramp: float = field(0.0, help="ρ decrease per epoch after warm start", validator=non_negative)
    oracle_mix_floor: float = field(0.0, help="lowest ρ", validator=probability)
    drop_tolerance: float = field(0.02, help="alarm when post-gate accuracy falls this far below the pre-gate best", validator=probability)

    def __attrs_post_init__(self):
        if self.lambda_max < self.lambda_start:
            raise ConfigError("lambda_max", f"λ cap {self.lambda_max} is below its start lambda_start={self.lambda_start}")
        if self.oracle_mix_floor > self.oracle_mix_start:
            raise ConfigError("oracle_mix_floor", f"{self.oracle_mix_floor} is above oracle_mix_start={self.oracle_mix_start}")


_STATE_KEYS = ("epoch", "read_ema", "above_count", "gate_open", "open_epoch", "lam", "open_epochs", "best_acc",
               "best_pre_gate_acc", "acc_history", "cooldown_left", "lr_scale", "oracle_mix", "post_gate_drop",
               "post_gate_drop_epochs", "last_acc", "paused")


class NCEScheduler(nn.Module):
    """Gate + λ ramp + cooldown + LR warm restart + oracle mix; pure logic over epochs."""

    def __init__(self, cfg: NCESchedulerConfig):
        super().__init__()
        self.cfg = cfg
        self.reset_state()

    def reset_state(self) -> None:
        self.epoch = 0
        self.read_ema: float | None = None
        self.above_count = 0
        self.gate_open = False
        self.open_epoch = -1
        self.lam = 0.0
        self.open_epochs = 0
        self.best_acc = float("-inf")
        self.best_pre_gate_acc = float("-inf")
        self.acc_history: list[float] = []
        self.cooldown_left = 0
        self.lr_scale = 1.0
        self.oracle_mix = self.cfg.oracle_mix_start
        self.post_gate_drop = False
        self.post_gate_drop_epochs = 0
        self.last_acc: float | None = None
        self.paused = False

    # -- the decision, once per epoch --------------------------------------------------------

    def epoch_end(self, read_quality: float | None, val_acc: float | None = None) -> dict[str, float]:
        cfg = self.cfg
        self.epoch += 1
        just_opened = False
        if read_quality is not None:
            self.read_ema = read_quality if self.read_ema is None else cfg.read_ema_decay * self.read_ema + (1 - cfg.read_ema_decay) * read_quality
        ema = self.read_ema if self.read_ema is not None else 0.0
        self.above_count = self.above_count + 1 if ema >= cfg.read_threshold else 0
        if val_acc is not None:
            self.acc_history.append(float(val_acc))
            self.last_acc = float(val_acc)
        if not self.gate_open and cfg.enabled and self.epoch > cfg.warm_start_epochs:
            read_ok = (not cfg.require_read) or self.above_count >= cfg.read_patience
            plateau_ok = (not cfg.require_plateau) or self._plateaued()
            if read_ok and plateau_ok:
                self.gate_open, self.open_epoch, just_opened = True, self.epoch, True
                self.lam = cfg.lambda_start
                self.cooldown_left = cfg.write_cooldown_batches
                self.lr_scale = cfg.lr_restart_factor
        elif self.gate_open:
            self.open_epochs += 1
            since = self.epoch - self.open_epoch
            self.paused = cfg.pause_below_read > 0 and ema < cfg.pause_below_read
            if since > cfg.freeze_epochs_after_open and not self.paused:
                self.lam = min(cfg.lambda_max, self.lam + cfg.lambda_increment)
            if cfg.lr_restart_epochs > 0 and self.lr_scale < 1.0:
                self.lr_scale = min(1.0, cfg.lr_restart_factor + (1 - cfg.lr_restart_factor) * since / cfg.lr_restart_epochs)
            else:
                self.lr_scale = 1.0
        if just_opened:
            self.open_epochs = 1
        # accuracy bookkeeping and the post-gate alarm (pre-gate = epochs before opening)
        if val_acc is not None:
            if not self.gate_open or just_opened:
                self.best_pre_gate_acc = max(self.best_pre_gate_acc, float(val_acc))
            self.best_acc = max(self.best_acc, float(val_acc))
            self.post_gate_drop = bool(self.gate_open and not just_opened
                                       and val_acc < self.best_pre_gate_acc - cfg.drop_tolerance)
            self.post_gate_drop_epochs += int(self.post_gate_drop)
        if self.epoch > cfg.warm_start_epochs:
            self.oracle_mix = max(cfg.oracle_mix_floor, self.oracle_mix - cfg.oracle_mix_ramp)
        return self.summary()

    def _plateaued(self) -> bool:
        n = self.cfg.plateau_epochs
        h = self.acc_history
        if len(h) <= n:
            return False
        return max(h[-n:]) <= max(h[:-n]) + self.cfg.plateau_delta

    def take_cooldown_batch(self) -> bool:
        """True while the post-gate write cooldown lasts; consumes one batch."""
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            return True
        return False

    @property
    def in_cooldown(self) -> bool:
        return self.cooldown_left > 0

    @property
    def current_lambda(self) -> float:
        return self.lam if self.gate_open else 0.0

    def gate_open_fraction(self) -> float:
        return self.open_epochs / self.epoch if self.epoch else 0.0

    def summary(self) -> dict[str, float]:
        return {
            "lambda": self.current_lambda,
            "read_ema": float(self.read_ema) if self.read_ema is not None else 0.0,
            "gate_open": float(self.gate_open),
            "gate_open_fraction": self.gate_open_fraction(),
            "oracle_mix": float(self.oracle_mix),
            "lr_scale": float(self.lr_scale),
            "post_gate_drop": float(self.post_gate_drop),
            "post_gate_drop_epochs": float(self.post_gate_drop_epochs),
            "epoch": float(self.epoch),
        }

    # -- checkpoints: plain types only ------------------------------------------------------------

    def get_extra_state(self) -> dict:
        state = {k: getattr(self, k) for k in _STATE_KEYS}
        state["acc_history"] = list(self.acc_history)
        for k in ("best_acc", "best_pre_gate_acc"):  # -inf is fine for torch.save, but keep it plain
            state[k] = float(state[k])
        return state

    def set_extra_state(self, state: dict) -> None:
        for k in _STATE_KEYS:
            if k in state:
                setattr(self, k, list(state[k]) if k == "acc_history" else state[k])
