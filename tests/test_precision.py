"""run.precision and run.compile: bad input is one line; on CUDA each setting trains (skipped without CUDA)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engram_core.run.accel import CompileError, check_compilable, grad_scaler
from engram_core.testing.cli import run_cli
from engram_core.testing.dist import run_dirs

MINIMAL = Path(__file__).resolve().parents[1] / "recipes" / "minimal.toml"
SHORT = ["stages.0.steps=60", "stages.0.warmup_steps=5", "stages.0.eval_every=0", "stages.0.checkpoint_every=0", "--quiet"]


def test_an_unknown_precision_is_one_line_with_the_choices(tmp_path):
    r = run_cli(MINIMAL, 'run.precision="fp64"', "--dry-run")
    assert r.returncode == 2
    assert "run.precision: must be one of 'fp32', 'bf16', 'fp16', got 'fp64'" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_component_that_cannot_compile_says_so_in_one_line():
    class Stateful(torch.nn.Linear):
        compilable = False
        compile_note = "its forward reads a Python dict that changes every call"

    with pytest.raises(CompileError, match=r"^run.compile: the memory \(Stateful\) cannot be compiled: its forward reads"):
        check_compilable({"head": None, "memory": Stateful(2, 2)})


def test_precision_is_fp32_on_the_cpu():
    assert grad_scaler("fp16", torch.device("cpu")) is None


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("setting", [['run.precision="bf16"'], ['run.precision="fp16"'], ["run.compile=true"], ['run.precision="bf16"', "run.compile=true"]])
def test_each_setting_trains_on_cuda(tmp_path, setting):
    r = run_cli(MINIMAL, *SHORT, *setting, "--device", "cuda", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    (run_dir,) = run_dirs(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    loss = summary["final"]["eval/loss"]
    assert loss == loss and loss < 0  # finite, and learnt: these 60 steps reach -2.59 in fp32 on the CPU


def test_an_optimizer_without_the_asked_implementation_is_one_line():
    r = run_cli(MINIMAL, 'stages.0.optimizer="sparse_adam"', 'stages.0.optimizer_impl="fused"', "--dry-run")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "stages.0.optimizer_impl: optimizer 'sparse_adam' (stages.0.optimizer) has no 'fused' implementation" in r.stderr


@pytest.mark.parametrize("impl", ["fused", "foreach", "for-loop"])
def test_each_optimizer_implementation_trains_the_same(tmp_path, impl):
    """torch's three AdamW implementations are the same algorithm: the run's loss agrees with
    'auto' to float rounding (the CPU has all three)."""
    finals = {}
    for which in ("auto", impl):
        out = tmp_path / which
        r = run_cli(MINIMAL, *SHORT, "stages.0.steps=20", f'stages.0.optimizer_impl="{which}"', "--device", "cpu", "--out", str(out))
        assert r.returncode == 0, r.stderr
        (run_dir,) = run_dirs(out)
        finals[which] = json.loads((run_dir / "summary.json").read_text())["final"]["eval/loss"]
    assert finals[impl] == pytest.approx(finals["auto"], rel=1e-4, abs=1e-5)


def test_matmul_precision_is_left_alone_on_the_cpu():
    from engram_core.run.accel import set_matmul_precision

    before = torch.get_float32_matmul_precision()
    set_matmul_precision("medium", torch.device("cpu"))
    assert torch.get_float32_matmul_precision() == before


@cuda
def test_tf32_matmuls_train_on_cuda(tmp_path):
    r = run_cli(MINIMAL, *SHORT, 'run.matmul_precision="high"', "--device", "cuda", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    (run_dir,) = run_dirs(tmp_path)
    loss = json.loads((run_dir / "summary.json").read_text())["final"]["eval/loss"]
    assert loss == loss and loss < 0
