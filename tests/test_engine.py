"""The engine end to end on recipes/minimal.toml: run directory, TensorBoard, determinism,
kill-and-resume, non-finite loss, sweeps, parameter groups, fit and eval stages."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engram_core.testing.cli import run_cli

MINIMAL = Path(__file__).resolve().parents[1] / "recipes" / "minimal.toml"


def only_run(out: Path, name="minimal") -> Path:
    (run,) = (out / name).iterdir()
    return run


def test_minimal_writes_the_run_directory(small_recipe, tmp_path):
    out = tmp_path / "runs"
    r = run_cli(small_recipe, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    run = only_run(out)
    for f in ("recipe.toml", "env.json", "metrics.jsonl", "summary.json", "checkpoints/last.pt"):
        assert (run / f).exists(), f
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 60
    assert set(summary["stages"]) == {"train", "final"}
    assert summary["final"]["eval/loss"] < 0  # a Gaussian NLL of small deltas
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and "core" in env["plugins"]
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [20, 40, 60, 60]
    assert "tensorboard --logdir" in r.stdout and "eval/loss" in r.stdout
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ck["stage_done"] and ck["global_step"] == 60


def test_tensorboard_tags_hparams_and_layout(small_recipe, tmp_path):
    out = tmp_path / "runs"
    assert run_cli(small_recipe, "--out", out, "--quiet").returncode == 0
    run = only_run(out)
    assert not [p for p in run.iterdir() if p.is_dir() and p.name not in ("checkpoints",)], "stray hparams run folder"
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/nll", "eval/loss", "lr", "throughput/steps_per_s", "throughput/samples_per_s"} <= tags
    evals = acc.Scalars("eval/loss")
    assert [e.step for e in evals][:3] == [20, 40, 60]
    summary = json.loads((run / "summary.json").read_text())
    assert evals[-1].value == pytest.approx(summary["final"]["eval/loss"], rel=1e-5)
    lrs = [e.value for e in acc.Scalars("lr")]
    assert max(lrs) == pytest.approx(3e-3, rel=5e-2) and lrs[-1] < 1e-4  # warm-up then cosine to 0
    plugin_data = acc.PluginTagToContent("hparams")
    assert plugin_data, "no hparams summary in the run's own event file"
    assert acc.PluginTagToContent("custom_scalars"), "no custom scalars layout"


def test_resolved_recipe_runs_again_with_the_same_results(small_recipe, tmp_path):
    out = tmp_path / "runs"
    assert run_cli(small_recipe, "--out", out, "--quiet").returncode == 0
    first = only_run(out)
    again = tmp_path / "again"
    assert run_cli(first / "recipe.toml", "--out", again, "--quiet").returncode == 0
    a = json.loads((first / "summary.json").read_text())["final"]
    b = json.loads((only_run(again) / "summary.json").read_text())["final"]
    assert a == b


def test_same_seed_same_metrics_other_seed_differs(small_recipe, tmp_path):
    finals = []
    for i, seed in enumerate([0, 0, 1]):
        out = tmp_path / f"r{i}"
        assert run_cli(small_recipe, f"run.seed={seed}", "--out", out, "--quiet").returncode == 0
        finals.append(json.loads((only_run(out) / "summary.json").read_text())["final"])
    assert finals[0] == finals[1]
    assert finals[0] != finals[2]


def test_kill_and_resume_ends_with_the_same_metrics(tmp_path):
    args = ["stages.0.steps=600", "stages.0.eval_every=150", "stages.0.checkpoint_every=50"]
    ref = tmp_path / "ref"
    assert run_cli(MINIMAL, *args, "--out", ref, "--quiet").returncode == 0
    expected = json.loads((only_run(ref) / "summary.json").read_text())

    out = tmp_path / "killed"
    env = {**os.environ, "ENGRAM_PLUGINS": ""}
    cmd = [sys.executable, "-c", "from engram_core.cli import run_main; raise SystemExit(run_main())", str(MINIMAL), *args, "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    ckpt = None
    while time.time() < deadline and proc.poll() is None:
        found = list(out.glob("minimal/*/checkpoints/last.pt"))
        if found:
            ckpt = found[0]
            time.sleep(0.3)
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt is not None, "the run never wrote a checkpoint"
    run = ckpt.parents[1]
    assert json.loads((run / "summary.json").read_text()).get("status") != "completed" if (run / "summary.json").exists() else True
    r = run_cli("--resume", run, "--quiet")
    assert r.returncode == 0, r.stderr
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["status"] == "completed"
    assert resumed["final"] == expected["final"]
    assert resumed["stages"] == expected["stages"]
    steps = [json.loads(l)["step"] for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) + 1  # one eval per point, plus the eval stage


def test_a_signal_stops_after_a_step_with_a_checkpoint_and_resume_ends_as_the_uninterrupted_run(tmp_path):
    # no periodic checkpoint: all that a resume has is the one the signal made
    args = ["stages.0.steps=600", "stages.0.eval_every=150", "stages.0.checkpoint_every=0"]
    ref = tmp_path / "ref"
    assert run_cli(MINIMAL, *args, "--out", ref, "--quiet").returncode == 0
    expected = json.loads((only_run(ref) / "summary.json").read_text())

    out = tmp_path / "stopped"
    env = {**os.environ, "ENGRAM_PLUGINS": ""}
    cmd = [sys.executable, "-c", "from engram_core.cli import run_main; raise SystemExit(run_main())", str(MINIMAL), *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not any(f.stat().st_size for f in out.glob("minimal/*/metrics.jsonl")):
            time.sleep(0.05)  # until the first evaluation (step 150) is logged: training is under way
        proc.send_signal(signal.SIGTERM)  # what the results pipeline's deadline sends a run
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, output
    assert "SIGTERM: stopping after this step with a checkpoint" in output
    run = only_run(out)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    ck = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert not ck["stage_done"] and 150 <= ck["stage_step"] < 600 and ck["global_step"] == summary["steps"] == ck["stage_step"]
    r = run_cli("--resume", run, "--quiet")
    assert r.returncode == 0, r.stderr
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["status"] == "completed"
    assert resumed["final"] == expected["final"] and resumed["stages"] == expected["stages"]


def test_a_second_signal_stops_at_once_and_the_handlers_come_back():
    from engram_core.train.stopping import StopBetweenSteps

    # this process's SIGINT as a shell's foreground job has it, whatever the suite was started
    # from (a background job starts with SIGINT ignored, which StopBetweenSteps leaves alone)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        notes = []
        with StopBetweenSteps(notes.append) as signalled:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs in the main thread, between two bytecodes
            assert signalled.requested and notes == ["SIGINT: stopping after this step with a checkpoint (send it again to stop now)"]
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with StopBetweenSteps(notes.append, active=False) as off:  # a torchrun rank: the default stays
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and not off.requested
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with StopBetweenSteps(notes.append):  # an ignored signal stays ignored
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outer)


def test_resume_of_a_completed_run_changes_nothing(small_recipe, tmp_path):
    out = tmp_path / "runs"
    assert run_cli(small_recipe, "--out", out, "--quiet").returncode == 0
    run = only_run(out)
    before = (run / "summary.json").read_text()
    r = run_cli("--resume", run)
    assert r.returncode == 0 and "already completed" in r.stdout
    assert (run / "summary.json").read_text() == before


def test_non_finite_loss_stops_with_a_clear_message(small_recipe, tmp_path):
    out = tmp_path / "runs"
    r = run_cli(small_recipe, 'stages.0.optimizer="sgd"', "stages.0.lr=1e12", "stages.0.grad_clip=0.0",
               "stages.0.warmup_steps=0", 'stages.0.schedule="constant"', "--out", out, "--quiet")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    (line,) = [l for l in r.stderr.splitlines() if l.strip()]
    assert "stage 'train' step" in line and "loss is" in line
    summary = json.loads((only_run(out) / "summary.json").read_text())
    assert summary["status"] == "nonfinite"


def test_sweep_writes_one_run_per_point_and_tables(small_recipe, tmp_path):
    text = small_recipe.read_text() + '\n[sweep]\n"head.hidden" = [16, 32]\n"run.seed" = [0, 1]\n'
    p = tmp_path / "sweep.toml"
    p.write_text(text)
    out = tmp_path / "runs"
    r = run_cli(p, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    (sweep,) = (out / "minimal").iterdir()
    points = sorted(d for d in sweep.iterdir() if d.is_dir())
    assert len(points) == 4
    rows = (sweep / "sweep.csv").read_text().splitlines()
    assert rows[0].startswith("point,head.hidden,run.seed,status,eval/loss")
    assert len(rows) == 5 and all(",completed," in r for r in rows[1:])
    assert "| 000 | 16 | 0 | completed |" in (sweep / "sweep.md").read_text()
    for d in points:
        acc = EventAccumulator(str(d))
        acc.Reload()
        assert acc.PluginTagToContent("hparams")
        assert "[sweep]" not in (d / "recipe.toml").read_text()


def test_param_groups_and_freezing(small_recipe, tmp_path):
    from engram_core import registry
    from engram_core.recipe import load_recipe
    from engram_core.train.engine import Engine

    registry._cached = None
    os.environ["ENGRAM_PLUGINS"] = ""
    try:
        rec = load_recipe(small_recipe, [
            'stages.0.freeze=["head.log_sigma.*"]',
            'stages.0.param_groups=[{params=["head.mu.*"], lr=0.01, weight_decay=0.0}, {params=["head.trunk.0.*"], optimizer="sgd"}]',
        ])
        eng = Engine(rec, tmp_path / "run", show_progress=False)
        eng.build()
        chosen = eng._select_params(rec.stages[0], 0)
        names = [n for n, _ in chosen]
        assert "head.log_sigma.weight" not in names and "head.mu.weight" in names
        opts = eng._optimizers(rec.stages[0], chosen)
        kinds = sorted(type(o).__name__ for o in opts)
        assert kinds == ["AdamW", "SGD"]
        adamw = next(o for o in opts if isinstance(o, torch.optim.AdamW))
        assert sorted(g["lr"] for g in adamw.param_groups) == [3e-3, 0.01]
        before = eng.model.head.log_sigma.weight.detach().clone()
        (tmp_path / "run").mkdir()
        eng.run()
        assert torch.equal(before, eng.model.head.log_sigma.weight)
    finally:
        os.environ.pop("ENGRAM_PLUGINS", None)
        registry._cached = None


def test_dry_run_prints_a_recipe_that_validates(tmp_path):
    r = run_cli(MINIMAL, "head.hidden=32", "--dry-run")
    assert r.returncode == 0
    p = tmp_path / "resolved.toml"
    p.write_text(r.stdout)
    assert "hidden = 32" in r.stdout
    v = run_cli("validate", p, tool="engram")
    assert v.returncode == 0 and "ok" in v.stdout


def test_weighted_sum_objective_composes_registered_objectives(small_recipe, tmp_path):
    out = tmp_path / "runs"
    obj = 'stages.0.objective={type="weighted_sum", terms=[{type="gaussian_nll", weight=1.0}, {type="gaussian_nll", weight=0.5, name="half"}]}'
    r = run_cli(small_recipe, obj, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    acc = EventAccumulator(str(only_run(out)))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/gaussian_nll.loss", "train/half.loss", "train/half.nll"} <= tags
    loss = acc.Scalars("train/loss")[-1].value
    parts = acc.Scalars("train/gaussian_nll.loss")[-1].value + 0.5 * acc.Scalars("train/half.loss")[-1].value
    assert loss == pytest.approx(parts, rel=1e-5)
    bad = run_cli(small_recipe, 'stages.0.objective={type="weighted_sum", terms=[{type="gausian_nll"}]}', "--out", out)
    assert bad.returncode == 2 and "stages.0.objective.terms.0.type" in bad.stderr and "gaussian_nll" in bad.stderr


def test_sweep_resume_runs_only_unfinished_points(small_recipe, tmp_path):
    p = tmp_path / "sweep.toml"
    p.write_text(small_recipe.read_text() + '\n[sweep]\n"memory" = ["none"]\n"run.seed" = [0, 1]\n')
    out = tmp_path / "runs"
    assert run_cli(p, "--out", out, "--quiet").returncode == 0
    (sweep,) = (out / "minimal").iterdir()
    done = json.loads((sweep / "000" / "summary.json").read_text())
    (sweep / "001" / "summary.json").unlink()  # as if killed before the point finished
    import shutil

    shutil.rmtree(sweep / "001" / "checkpoints")
    r = run_cli("--resume", sweep, "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads((sweep / "000" / "summary.json").read_text()) == done  # untouched
    assert json.loads((sweep / "001" / "summary.json").read_text())["status"] == "completed"
    assert (sweep / "sweep.csv").read_text().count(",completed,") == 2


def test_loss_metric_does_not_depend_on_the_eval_batch_size(small_recipe, tmp_path):
    """The same weights give the same eval/loss whatever the evaluating stage's batch size:
    the metric evaluates one fixed eval set, weighted per example."""
    finals = []
    for bs in (16, 100, 1024):
        out = tmp_path / f"bs{bs}"
        r = run_cli(small_recipe, "--out", out, "--quiet", f"stages.1.batch_size={bs}")
        assert r.returncode == 0, r.stderr
        summary = json.loads((only_run(out) / "summary.json").read_text())
        finals.append(summary["stages"]["final"]["eval/loss"])
    assert finals[0] == pytest.approx(finals[1], rel=1e-5) and finals[0] == pytest.approx(finals[2], rel=1e-5)
