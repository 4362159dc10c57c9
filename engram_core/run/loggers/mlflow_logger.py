"""MLflow tracker (`run.loggers = ["mlflow"]`; `pip install 'engram-core[mlflow]'`).

The tracking store is MLFLOW_TRACKING_URI when set (a server, ``sqlite:///mlflow.db``, ...),
else a local file store, ``<run.out_dir>/mlruns`` (MLflow keeps that backend in maintenance
mode; engram opts in with MLFLOW_ALLOW_FILE_STORE for it, as MLflow's message asks). The
experiment is MLFLOW_EXPERIMENT_NAME (default "engram"); the MLflow run is named after the
engram run. Params are the resolved recipe's leaves by dotted path; recipe.toml,
summary.json, figures (PNG) and text are artifacts; scalars are metrics at the engram step
(a character MLflow refuses in a metric name becomes '_').
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from . import Logger, LoggerContext, flatten

STATUS = {"completed": "FINISHED", "interrupted": "KILLED"}
BATCH = 100  # MLflow's most params per log_batch; metrics go in batches of up to 1000
_BAD = re.compile(r"[^A-Za-z0-9_\-. /]")


def metric_name(tag: str) -> str:
    return _BAD.sub("_", tag)


class MlflowLogger(Logger):
    def __init__(self, ctx: LoggerContext):
        from mlflow import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (Path(ctx.recipe.run.out_dir).resolve() / "mlruns").as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        self.ctx = ctx
        self.uri = uri
        run_id = ctx.state.get("run_id")
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "engram")
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
            run = self.client.create_run(exp_id, run_name=ctx.name, tags={"engram.run_dir": str(ctx.run_dir)})
            run_id = run.info.run_id
        ctx.state.update(run_id=run_id, tracking_uri=uri)
        self.run_id = run_id
        self.pending: list[Any] = []

    def scalar(self, tag: str, value: float, step: int) -> None:
        from mlflow.entities import Metric

        self.pending.append(Metric(metric_name(tag), value, int(time.time() * 1000), step))
        if len(self.pending) >= 1000:
            self.flush()

    def figure(self, tag, figure, step) -> None:
        self.client.log_figure(self.run_id, figure, f"figures/{tag}_{step}.png")

    def text(self, tag, text, step) -> None:
        self.client.log_text(self.run_id, text, f"text/{tag}_{step}.txt")

    def recipe(self, toml: str, table: dict) -> None:
        from mlflow.entities import Param

        self.client.log_text(self.run_id, toml, "recipe.toml")
        if self.ctx.resumed:
            return  # params are immutable in MLflow, and the recipe is the same
        params = [Param(k, str(v)[:500]) for k, v in flatten(table).items()]
        for i in range(0, len(params), BATCH):
            self.client.log_batch(self.run_id, params=params[i : i + BATCH])

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        self.client.log_dict(self.run_id, hparams, "hparams.json")

    def summary(self, summary: dict) -> None:
        self.flush()
        self.client.log_dict(self.run_id, summary, "summary.json")

    def flush(self) -> None:
        if self.pending:
            self.client.log_batch(self.run_id, metrics=self.pending)
            self.pending = []

    def close(self, status: str) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, STATUS.get(status, "FAILED"))


def make(ctx: LoggerContext) -> MlflowLogger:
    return MlflowLogger(ctx)
