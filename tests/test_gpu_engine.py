"""The engine on a GPU: no host synchronisation in the steady-state step, compiled and
CUDA-graphed steps equal eager within a stated tolerance, non-finite losses still caught
(CUDA tests are skipped without CUDA); `run.cuda_graphs` where it cannot work is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engram_core.recipe import load_recipe
from engram_core.testing.cli import run_cli
from engram_core.testing.dist import run_dirs
from engram_core.train.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = ROOT / "recipes" / "minimal.toml"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# the zoo backbone on mqar, small enough for a test; full attention learns it
ZOO = """
[run]
name = "zoo_gpu_test"
seed = 0
device = "cuda"
[data]
type = "mqar"
n_pairs = 4
seq_len = 32
vocab_size = 256
n_train = 4096
n_eval = 256
[head]
type = "causal_backbone"
dim = 64
n_layers = 2
n_heads = 4
[[stages]]
name = "train"
objective = { type = "token_lm" }
steps = 80
batch_size = 64
lr = 3e-3
weight_decay = 0.1
schedule = "cosine"
warmup_steps = 8
grad_clip = 1.0
eval_every = 0
log_every = 10
[[metrics]]
type = "completion_accuracy"
"""
# graphed (capturable AdamW, tensor lr) and compiled (inductor's fused kernels) runs follow
# eager's fp32 training loss within this relative distance over 80 steps
TOLERANCE = 2e-3


def _train_losses(tmp_path: Path, *overrides: str) -> list[float]:
    recipe = tmp_path / "zoo.toml"
    recipe.write_text(ZOO)
    out = tmp_path / ("out" + "_".join(o.replace("=", "-").replace(".", "-") for o in overrides))
    r = run_cli(recipe, *overrides, "--out", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    (run_dir,) = run_dirs(out)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars("train/loss")]


def test_cuda_graphs_on_the_cpu_is_one_line(tmp_path):
    r = run_cli(MINIMAL, "run.cuda_graphs=true", "--device", "cpu", "stages.0.steps=5", "--out", str(tmp_path), "--quiet")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "run.cuda_graphs: needs CUDA (this run is on cpu); set run.cuda_graphs = false" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_cuda_graphs_auto_on_the_cpu_trains_eagerly(tmp_path):
    """"auto" is a no-op off CUDA: the same losses as a run without it, no note."""
    def losses(*overrides):
        out = tmp_path / ("out" + str(len(overrides)))
        r = run_cli(MINIMAL, *overrides, "--device", "cpu", "stages.0.steps=20", "stages.0.log_every=5", "--out", str(out))
        assert r.returncode == 0, r.stderr
        assert "eager steps" not in r.stdout + r.stderr
        (run_dir,) = run_dirs(out)
        return json.loads((run_dir / "summary.json").read_text())["final"]
    assert losses('run.cuda_graphs="auto"') == losses()


@pytest.mark.parametrize("value, expected", [("3", "expected true, false or a string, got integer 3"),
                                             ('"Auto"', "must be true, false or 'auto', got 'Auto' (did you mean 'auto'?)"),
                                             ('"yes"', "must be true, false or 'auto', got 'yes'")])
def test_cuda_graphs_takes_true_false_or_auto(tmp_path, value, expected):
    r = run_cli(MINIMAL, f"run.cuda_graphs={value}", "--device", "cpu", "--out", str(tmp_path), "--quiet")
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "run.cuda_graphs" in lines[0] and expected in lines[0], r.stderr


@cuda
@pytest.mark.parametrize("mode", [["run.cuda_graphs=true"], ['run.cuda_graphs="auto"'], ["run.compile=true"], ["run.compile=true", "run.cuda_graphs=true"],
                                  ["run.cuda_graphs=true", 'stages.0.optimizer_impl="fused"'], ['stages.0.optimizer_impl="fused"']])
def test_compiled_and_graphed_steps_follow_eager(tmp_path, mode):
    eager = _train_losses(tmp_path)
    other = _train_losses(tmp_path, *mode)
    assert len(eager) == len(other) == 8
    for a, b in zip(eager, other):
        assert abs(a - b) <= TOLERANCE * max(abs(a), 1.0), (mode, eager, other)


@cuda
def test_no_host_synchronisation_in_the_steady_state_step(tmp_path):
    recipe = tmp_path / "zoo.toml"
    recipe.write_text(ZOO.replace("log_every = 10", "log_every = 80"))
    engine = Engine(load_recipe(recipe), tmp_path / "run", show_progress=False)
    engine.build()
    (tmp_path / "run").mkdir()
    guarded = {"steps": 0}

    def no_sync(fn):
        def call(*args, **kwargs):
            if 5 <= engine.step < 79:  # after warm-up; the last step logs (one read by design)
                torch.cuda.set_sync_debug_mode("error")
                guarded["steps"] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        return call

    engine.train_step = no_sync(engine.train_step)
    engine._next_batch = no_sync(engine._next_batch)
    summary = engine.run()
    assert summary["status"] == "completed"
    assert guarded["steps"] > 100  # both functions of ~74 steps ran under the guard


@cuda
@pytest.mark.parametrize("graphs", ["false", "true"])
def test_a_non_finite_loss_on_the_gpu_stops_the_run_naming_the_step(tmp_path, graphs):
    recipe = tmp_path / "zoo.toml"
    recipe.write_text(ZOO)
    r = run_cli(recipe, "stages.0.lr=1e30", "stages.0.grad_clip=0.0", "stages.0.warmup_steps=0", f"run.cuda_graphs={graphs}",
                "--out", str(tmp_path / "out"), "--quiet")
    assert r.returncode != 0
    assert "stage 'train' step " in r.stderr and ("loss is nan" in r.stderr or "loss is inf" in r.stderr), r.stderr
    (run_dir,) = run_dirs(tmp_path / "out")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "nonfinite"
    assert not (run_dir / "checkpoints" / "last.pt").exists()  # no checkpoint of NaN weights


@cuda
def test_graphed_run_needs_a_capturable_optimiser(tmp_path):
    recipe = tmp_path / "zoo.toml"
    recipe.write_text(ZOO)
    r = run_cli(recipe, "run.cuda_graphs=true", 'stages.0.optimizer="sgd"', "--out", str(tmp_path / "out"), "--quiet")
    assert r.returncode == 2
    assert "run.cuda_graphs needs an optimiser whose step can be captured" in r.stderr
    assert "Traceback" not in r.stderr


@cuda
def test_graphs_auto_runs_a_stage_it_cannot_capture_eagerly(tmp_path):
    recipe = tmp_path / "zoo.toml"
    recipe.write_text(ZOO)
    r = run_cli(recipe, 'run.cuda_graphs="auto"', 'stages.0.optimizer="sgd"', "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "stage train: eager steps (run.cuda_graphs = \"auto\": it needs an optimiser whose step can be captured" in r.stdout + r.stderr


def _losses_of(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


@cuda
@pytest.mark.parametrize("mode", [["run.cuda_graphs=true", 'stages.0.optimizer_impl="fused"'],
                                  ["run.compile=true", "run.cuda_graphs=true", 'stages.0.optimizer_impl="fused"']])
def test_a_graphed_run_killed_after_a_checkpoint_resumes_on_its_schedule(tmp_path, mode):
    """A run stopped mid-stage (a device session's deadline) and resumed from its checkpoint
    follows the uninterrupted run: the captured step reads the learning rate the schedule
    sets after the resume too (the optimiser's rate a device tensor again, not the
    checkpoint's CPU copy that a replayed graph would read once)."""
    import signal
    import subprocess
    import sys
    import time

    recipe = tmp_path / "zoo.toml"
    recipe.write_text(ZOO)
    args = ["stages.0.steps=1200", "stages.0.checkpoint_every=400", "stages.0.log_every=20", *mode]
    ref_out = tmp_path / "ref"
    assert run_cli(recipe, *args, "--out", str(ref_out), "--quiet").returncode == 0
    (ref_dir,) = run_dirs(ref_out)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "engram_core.run", str(recipe), *args, "--out", str(out), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(out.glob("*/*/checkpoints/last.pt")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run_dir,) = run_dirs(out)
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
    assert not state["stage_done"] and state["stage_step"] < 1200, "the run ended before it could be stopped"
    r = run_cli("--resume", str(run_dir), "--quiet")
    assert r.returncode == 0, r.stderr
    ref, resumed = _losses_of(ref_dir), _losses_of(run_dir)
    after = [s for s in sorted(ref) if s > state["stage_step"]]
    assert after and all(s in resumed for s in after)
    print("resumed at", state["stage_step"], [(s, round(ref[s], 5), round(resumed[s], 5)) for s in after[-5:]])
    for s in after:
        assert abs(ref[s] - resumed[s]) <= 10 * TOLERANCE * max(abs(ref[s]), 1.0), (s, ref[s], resumed[s])
