"""Experiment trackers beside TensorBoard: `run.loggers = ["wandb", "mlflow"]`.

TensorBoard is always written (`engram_core.run.tb.RunLogger`). A *tracker logger* receives
everything the run logger writes: scalars, histograms, figures, text, hparams, the resolved
recipe, and the summary at the end. Plugins add trackers through the ``engram_loggers``
hook (engram_core.hookspecs); the core registers ``wandb`` and ``mlflow``
(engram_core.run.loggers.wandb_logger, .mlflow_logger), each an extra of engram-core.

A tracker is a subclass of `Logger` overriding what it records; it is built as
``factory(ctx)`` with a `LoggerContext` when the run starts. A tracker's `state` dict is
kept in the run directory (loggers.json), so a resumed run continues the same tracker run.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import attrs
import torch

from ...errors import RecipeError, did_you_mean
from ..tb import RunLogger

TENSORBOARD = "tensorboard"  # always on; accepted in run.loggers for clarity
STATE_FILE = "loggers.json"


@attrs.define
class LoggerContext:
    """What a tracker's factory receives."""

    run_dir: Path
    name: str  # the run's name (run.name, else the recipe file's stem)
    recipe: Any  # engram_core.recipe.Recipe, resolved
    resumed: bool  # True when the run continues from a checkpoint
    state: dict  # this tracker's entry of run_dir/loggers.json (e.g. its run id); written back at close


class Logger:
    """A tracker: override what it records. Values arrive exactly as TensorBoard gets them."""

    def scalar(self, tag: str, value: float, step: int) -> None: ...

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        """`values`: flat, finite, float32, on the CPU."""

    def figure(self, tag: str, figure: Any, step: int) -> None:
        """A matplotlib Figure."""

    def text(self, tag: str, text: str, step: int) -> None: ...

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None: ...

    def recipe(self, toml: str, table: dict) -> None:
        """The resolved recipe, as written to recipe.toml and as nested tables."""

    def summary(self, summary: dict) -> None:
        """summary.json's content, at the end of the run (whatever its status)."""

    def flush(self) -> None: ...

    def close(self, status: str) -> None:
        """status: 'completed', 'interrupted', 'nonfinite', 'failed' or 'running'."""


def check_loggers(names, registry) -> list:
    """The trackers `run.loggers` names (`engram_core.registry.Extension`s), or one RecipeError
    line per bad name or missing package."""
    known = {n: e for n, e in registry.extensions["loggers"].items() if n != TENSORBOARD}
    problems, chosen = [], []
    for i, name in enumerate(names):
        if name == TENSORBOARD:
            continue
        entry = known.get(name)
        if entry is None:
            choices = [TENSORBOARD, *sorted(known)]
            problems.append((f"run.loggers.{i}", f"unknown logger '{name}'{did_you_mean(name, choices)}; loggers: {', '.join(choices)}"))
            continue
        missing = [m for m in entry.modules if importlib.util.find_spec(m) is None]
        if missing:
            problems.append((f"run.loggers.{i}", f"logger '{name}' needs the {', '.join(missing)} package: pip install '{entry.install or missing[0]}'"))
            continue
        precheck = getattr(entry.factory, "precheck", None)  # e.g. credentials, before any run folder exists
        problem = precheck() if callable(precheck) else None
        if problem:
            problems.append((f"run.loggers.{i}", problem))
            continue
        chosen.append(entry)
    if problems:
        raise RecipeError(problems)
    return chosen


class TrackedRunLogger(RunLogger):
    """The run's TensorBoard logger, handing every record to the trackers as well."""

    def __init__(self, log_dir: Path, purge_step: int | None, trackers: list[tuple[str, Logger]], state: dict):
        super().__init__(log_dir, purge_step=purge_step)
        self.trackers = trackers
        self.state = state

    def scalar(self, tag: str, value: float, step: int) -> None:
        super().scalar(tag, value, step)
        for _, t in self.trackers:
            t.scalar(tag, float(value), step)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        values = values.detach().float().cpu().flatten()
        values = values[torch.isfinite(values)]
        if values.numel():
            self.writer.add_histogram(tag, values, step)
            for _, t in self.trackers:
                t.histogram(tag, values, step)

    def figure(self, tag: str, figure: Any, step: int) -> None:
        """A matplotlib figure: TensorBoard's images, and every tracker's."""
        self.writer.add_figure(tag, figure, step, close=False)
        for _, t in self.trackers:
            t.figure(tag, figure, step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        super().text(tag, text, step)
        for _, t in self.trackers:
            t.text(tag, text, step)

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        super().hparams(hparams, metrics)
        for _, t in self.trackers:
            t.hparams(hparams, metrics)

    def summary(self, summary: dict, status: str) -> None:
        self.status = status
        for _, t in self.trackers:
            t.summary(summary)

    def flush(self) -> None:
        super().flush()
        for _, t in self.trackers:
            t.flush()

    def close(self) -> None:
        super().close()
        for _, t in self.trackers:
            t.close(getattr(self, "status", "running"))


def open_run_logger(run_dir: Path, purge_step: int | None, recipe, registry, resumed: bool) -> TrackedRunLogger:
    """TensorBoard plus the trackers of `run.loggers`, each handed the resolved recipe."""
    from ...errors import EngramError
    from ..rundir import atomic_write_json, read_json

    entries = check_loggers(getattr(recipe.run, "loggers", ()), registry)
    state_path = Path(run_dir) / STATE_FILE
    state = read_json(state_path, STATE_FILE) if (resumed and state_path.exists()) else {}
    trackers = []
    for e in entries:
        ctx = LoggerContext(Path(run_dir), recipe.name, recipe, resumed, state.setdefault(e.name, {}))
        try:
            trackers.append((e.name, e.factory(ctx)))
        except EngramError as exc:  # a tracker that cannot start (W&B refused the key): the run says so too
            _record_start_failure(Path(run_dir), recipe, str(exc).splitlines()[0])
            raise
    if entries:
        atomic_write_json(state_path, state)  # ids of the tracker runs, for --resume
    logger = TrackedRunLogger(Path(run_dir), purge_step, trackers, state)
    toml, table = recipe.to_toml(include_sweep=False), recipe.to_dict(include_sweep=False)
    for _, t in trackers:
        t.recipe(toml, table)
    return logger


def _record_start_failure(run_dir: Path, recipe, line: str) -> None:
    """summary.json of a new run whose trackers could not start (the engine writes it for
    every failure after this point; a resumed run keeps the summary it had)."""
    from ..rundir import atomic_write_json

    summary = run_dir / "summary.json"
    if summary.exists():
        return
    atomic_write_json(summary, {"name": recipe.name, "status": "failed", "run_dir": str(run_dir), "steps": 0, "wall_time_s": 0.0,
                                "device": None, "final": {}, "stages": {}, "error": line})


def flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    """{"head.dim": 64, "stages.0.lr": 0.001, ...}: a recipe's leaves by dotted path."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out.update(flatten(x, f"{key}.{i}."))
        else:
            out[key] = v
    return out
