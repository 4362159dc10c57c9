"""Trackers beside TensorBoard: `run.loggers`, the `engram_loggers` hook, W&B (offline) and
MLflow (local file store) holding exactly the scalars TensorBoard holds."""

import json
import struct
import sys
import types
from pathlib import Path

import pytest
import torch

from engram_core.errors import RecipeError
from engram_core.hookspecs import hookimpl
from engram_core.registry import load_registry
from engram_core.run.loggers import Logger, TrackedRunLogger, check_loggers
from engram_core.testing.cli import run_cli

MINIMAL = str(Path(__file__).resolve().parents[1] / "recipes" / "minimal.toml")
TINY = ["data.n_sequences=16", "data.length=16", "stages.0.steps=12", "stages.0.eval_every=6",
        "stages.0.log_every=3", "stages.0.warmup_steps=0", "stages.0.checkpoint_every=0"]


def tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from tbparse import SummaryReader

    df = SummaryReader(str(run_dir)).scalars
    out: dict[str, dict[int, float]] = {}
    for tag, step, value in zip(df["tag"], df["step"], df["value"]):
        out.setdefault(tag, {})[int(step)] = float(value)
    return out


def wandb_offline_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """The history rows of the offline run file (<run>/wandb/offline-run-*/run-*.wandb).

    W&B writes it in the LevelDB log format (32 KiB blocks, 7-byte record headers: crc,
    length, type 1 full / 2 first / 3 middle / 4 last) after a 7-byte W&B header; each
    record is a protobuf `Record` of wandb.proto.wandb_internal_pb2."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunks, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        body, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = body if kind in (1, 2) else pending + body
        if kind in (1, 4):
            chunks.append(pending)
    out: dict[str, dict[int, float]] = {}
    for chunk in chunks:
        rec = pb.Record()
        rec.ParseFromString(chunk)
        if rec.WhichOneof("record_type") != "history":
            continue
        row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item}
        step = int(row.pop("global_step"))
        for tag, value in row.items():
            if not tag.startswith("_") and isinstance(value, (int, float)):
                out.setdefault(tag, {})[step] = float(value)
    return out


def mlflow_scalars(uri: str, run_id: str) -> dict[str, dict[int, float]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    return {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in run.data.metrics}


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for tag in a:
        assert sorted(a[tag]) == sorted(b[tag]), tag
        for step in a[tag]:
            assert a[tag][step] == pytest.approx(b[tag][step], rel=1e-6, abs=1e-7), (tag, step)  # TB keeps float32


def test_wandb_and_mlflow_hold_the_tensorboard_scalars(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    r = run_cli(MINIMAL, *TINY, 'run.loggers=["wandb", "mlflow"]', "--out", tmp_path / "runs", "--quiet")
    assert r.returncode == 0, r.stderr
    run_dir = next((tmp_path / "runs").rglob("summary.json")).parent
    tb = tensorboard_scalars(run_dir)
    assert {"train/loss", "lr", "eval/loss"} <= set(tb) and len(tb["train/loss"]) == 4
    assert_same(wandb_offline_scalars(run_dir), tb)
    state = json.loads((run_dir / "loggers.json").read_text())
    assert state["mlflow"]["tracking_uri"] == (tmp_path / "runs" / "mlruns").resolve().as_uri()  # local file store
    assert_same(mlflow_scalars(state["mlflow"]["tracking_uri"], state["mlflow"]["run_id"]), tb)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=state["mlflow"]["tracking_uri"])
    params = client.get_run(state["mlflow"]["run_id"]).data.params
    assert params["head.hidden"] == "64" and params["stages.0.steps"] == "12"  # the resolved recipe
    artifacts = {a.path for a in client.list_artifacts(state["mlflow"]["run_id"])}
    assert {"recipe.toml", "summary.json", "hparams.json"} <= artifacts


class Recorder(Logger):
    def __init__(self, ctx):
        self.ctx, self.calls = ctx, []
        RECORDED.append(self)

    def __getattribute__(self, name):
        attr = object.__getattribute__(self, name)
        if name in ("scalar", "histogram", "figure", "text", "hparams", "recipe", "summary", "close"):
            calls = object.__getattribute__(self, "calls")
            return lambda *a: calls.append((name, a))
        return attr


RECORDED: list[Recorder] = []


def test_a_plugin_registers_a_logger_through_the_hook(tmp_path, monkeypatch):
    plugin = types.ModuleType("recorder_plugin")

    @hookimpl
    def engram_loggers(register):
        register("recorder", Recorder)

    plugin.engram_loggers = engram_loggers
    monkeypatch.setitem(sys.modules, "recorder_plugin", plugin)
    reg = load_registry(extra={"recorder": plugin})
    from engram_core.recipe import load_recipe
    from engram_core.train.engine import Engine

    recipe = load_recipe(MINIMAL, [*TINY, 'run.loggers=["tensorboard", "recorder"]'], registry=reg)
    RECORDED.clear()
    eng = Engine(recipe, tmp_path / "run", registry=reg, show_progress=False)
    (tmp_path / "run").mkdir()
    eng.build()
    summary = eng.run()
    (rec,) = RECORDED
    kinds = [c[0] for c in rec.calls]
    assert kinds[0] == "recipe" and kinds[-2:] == ["hparams", "close"] and "summary" in kinds
    assert rec.calls[0][1][1]["head"]["type"] == "mlp_gaussian"
    scalars = {(a[0], a[2]): a[1] for k, a in rec.calls if k == "scalar"}
    assert set(t for t, _ in scalars) >= {"train/loss", "lr", "eval/loss"}
    assert next(a for k, a in rec.calls if k == "summary")[0]["final"] == summary["final"]
    assert rec.calls[-1][1] == ("completed",)
    # histograms and figures: forwarded as TensorBoard gets them (finite values only)
    logger = TrackedRunLogger(tmp_path / "tb", None, [("recorder", rec)], {})
    logger.histogram("memory/x", torch.tensor([1.0, float("nan"), 2.0]), 3)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    logger.figure("fig/a", fig, 4)
    logger.close()
    hist = next(a for k, a in rec.calls if k == "histogram")
    assert hist[0] == "memory/x" and hist[1].tolist() == [1.0, 2.0] and hist[2] == 3
    assert next(a for k, a in rec.calls if k == "figure") == ("fig/a", fig, 4)


def test_an_unknown_logger_is_one_line_exit_2(tmp_path):
    r = run_cli(MINIMAL, 'run.loggers=["wandbb"]', "--dry-run")
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert "minimal.toml: run.loggers.0: unknown logger 'wandbb' (did you mean 'wandb'?)" in line


def test_a_missing_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    r = run_cli("validate", MINIMAL, 'run.loggers=["mlflow"]', tool="engram")
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert line.endswith("logger 'mlflow' needs the mlflow package: pip install 'engram-core[mlflow]'"), line
    with pytest.raises(RecipeError, match="engram-core\\[mlflow\\]"):
        check_loggers(["mlflow"], load_registry())
