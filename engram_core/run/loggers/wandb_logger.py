"""Weights & Biases tracker (`run.loggers = ["wandb"]`; `pip install 'engram-core[wandb]'`).

Configured as W&B is everywhere: WANDB_PROJECT (default "engram"), WANDB_ENTITY,
WANDB_MODE (``offline`` writes the run under <run dir>/wandb/ for `wandb sync` later;
``disabled``), WANDB_API_KEY. The W&B run is named after the engram run, its config is the
resolved recipe, and recipe.toml is saved with it. Scalars use the engram step as the x
axis ("global_step", a W&B step metric), so values logged out of order (a `fit` stage's own
steps) are kept; rows of one step are sent together.
"""

from __future__ import annotations

import html
import netrc
import os
import re
from typing import Any
from urllib.parse import urlparse

from ...errors import EngramError
from . import Logger, LoggerContext

STEP = "global_step"


class TrackerError(EngramError):
    """A tracker could not start (no network, a refused key): one line, the run stops (exit 1)."""

    exit_code = 1


LOCAL_MODES = ("offline", "disabled", "dryrun")


def _key_format_problem(key: str) -> str | None:
    """A W&B API key is 40+ word characters, after an optional `<host>-` prefix (on-prem), or
    a JWT: a key of another shape (a truncated paste, a quoted value) is refused before the
    run, not after W&B's retries. A well-formed key W&B refuses still fails at wandb.init."""
    if re.fullmatch(r"[\w-]+\.[\w-]+\.[\w-]+", key):
        return None
    secret = key.split("-", 1)[-1]
    if re.fullmatch(r"[\w-]+", secret) and len(secret) >= 40:
        return None
    return (f"logger 'wandb': WANDB_API_KEY is not a W&B API key ({len(key)} characters; a key is 40 or more letters, "
            "digits and underscores): copy it again from https://wandb.ai/authorize, or set WANDB_MODE=offline")


class WandbLogger(Logger):
    @staticmethod
    def precheck() -> str | None:
        """Why W&B cannot start, said before the run (else wandb.init fails after its retries)."""
        if os.environ.get("WANDB_MODE", "").lower() in LOCAL_MODES or os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
            return None
        key = os.environ.get("WANDB_API_KEY", "").strip()
        if key:
            return _key_format_problem(key)
        host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
        try:
            login = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host or "")
        except (OSError, netrc.NetrcParseError):
            login = None
        if login and login[2]:
            return None
        return (f"logger 'wandb' has no API key (WANDB_API_KEY is unset and ~/.netrc has no login for {host}): "
                "set WANDB_API_KEY, run `wandb login`, or set WANDB_MODE=offline to log under the run directory for `wandb sync` later")

    def __init__(self, ctx: LoggerContext):
        import wandb

        self.wandb = wandb
        self.ctx = ctx
        run_id = ctx.state.get("id")
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "engram"),
                name=ctx.name,
                dir=str(ctx.run_dir),
                id=run_id,
                resume="allow" if run_id else None,
                job_type="engram-run",
                tags=[ctx.recipe.data.type_as_written, ctx.recipe.head.type_as_written],
            )
        except Exception as exc:  # wandb's own errors (a refused key, no network after its retries)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise TrackerError(f"W&B could not start ({type(exc).__name__}: {first}); check WANDB_API_KEY (or `wandb login`), "
                               f"or set WANDB_MODE=offline and resume: engram-run --resume {ctx.run_dir}") from None
        ctx.state["id"] = self.run.id
        self.run.define_metric(STEP)
        self.run.define_metric("*", step_metric=STEP)
        self.pending: dict[str, Any] = {}
        self.pending_step: int | None = None

    def _row(self, step: int) -> dict[str, Any]:
        if self.pending_step is not None and step != self.pending_step:
            self._send()
        self.pending_step = step
        return self.pending

    def _send(self) -> None:
        if self.pending:
            self.run.log({**self.pending, STEP: self.pending_step})
        self.pending, self.pending_step = {}, None

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._row(step)[tag] = value

    def histogram(self, tag, values, step) -> None:
        self._row(step)[tag] = self.wandb.Histogram(values.numpy())

    def figure(self, tag, figure, step) -> None:
        self._row(step)[tag] = self.wandb.Image(figure)

    def text(self, tag, text, step) -> None:
        self._row(step)[tag] = self.wandb.Html(f"<pre>{html.escape(text)}</pre>")

    def recipe(self, toml: str, table: dict) -> None:
        self.run.config.update(table, allow_val_change=True)
        self.run.save(str(self.ctx.run_dir / "recipe.toml"), base_path=str(self.ctx.run_dir), policy="now")

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        self.run.config.update({"hparams": hparams}, allow_val_change=True)

    def summary(self, summary: dict) -> None:
        self._send()
        self.run.summary.update({k: v for k, v in (summary.get("final") or {}).items()})
        self.run.summary.update({"status": summary.get("status"), "steps": summary.get("steps"), "wall_time_s": summary.get("wall_time_s")})

    def flush(self) -> None:
        self._send()

    def close(self, status: str) -> None:
        self._send()
        self.run.finish(exit_code=0 if status == "completed" else 1)


def make(ctx: LoggerContext) -> WandbLogger:
    return WandbLogger(ctx)
