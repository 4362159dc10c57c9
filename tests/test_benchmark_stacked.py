"""The benchmarks' own checks on the CPU at tiny sizes (their timings are the GPU's):
stacked_zoo.py trains K stacked members (torch.func) as K models alone would be trained, and
soft_topk.py times both retrieval formulations."""

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def stacked(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import stacked_zoo

    yield stacked_zoo
    sys.modules.pop("stacked_zoo", None)


def test_stacked_members_train_as_models_alone(stacked):
    import engine_gpu

    setting = dict(engine_gpu.SETTING, vocab=64, seq_len=16, n_pairs=2, batch=8, n_train=256)
    assert stacked.check(setting, "cpu", k=3, steps=3) < 1e-4


def test_each_member_is_clipped_by_its_own_norm(stacked):
    import torch

    stack = stacked.Stack.__new__(stacked.Stack)
    w = torch.zeros(2, 3, requires_grad=True)
    w.grad = torch.tensor([[3.0, 4.0, 0.0], [0.3, 0.4, 0.0]])  # norms 5 and 0.5
    stack.params = {"w": w}
    stack.clip_(1.0)
    torch.testing.assert_close(w.grad, torch.tensor([[0.6, 0.8, 0.0], [0.3, 0.4, 0.0]]), rtol=1e-5, atol=1e-6)


def test_the_timed_stack_trains_and_graphed_modes_ask_for_a_gpu(stacked, capsys):
    """The timing loop's eager path runs on the CPU (the graphed one records a CUDA graph:
    on a machine without a GPU it stops with one line and exit status 2)."""
    import engine_gpu
    import torch

    setting = dict(engine_gpu.SETTING, vocab=64, seq_len=16, n_pairs=2, batch=8, n_train=256)
    assert stacked.timed_run(2, "eager", setting, torch.device("cpu"), steps=4, fused=False) > 0
    if not torch.cuda.is_available():
        assert stacked.main(["--tiny", "--modes", "graphed", "--k", "1"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "need a CUDA GPU" in err


def test_the_soft_topk_benchmark_runs_and_writes_both_timings(tmp_path, monkeypatch):
    """benchmarks/soft_topk.py at a tiny size: both formulations timed, the ratio saved."""
    import json

    monkeypatch.syspath_prepend(str(BENCH))
    import soft_topk

    out = tmp_path / "s.json"
    assert soft_topk.main(["--batch", "2", "--seq", "8", "--rows", "64", "--iters", "1", "--repeats", "2", "--out", str(out)]) == 0
    info = json.loads(out.read_text())
    assert set(info["median_ms"]) == {"soft_topk", "dense"} and all(len(v) == 2 for v in info["ms_fwd_bwd"].values())
    sys.modules.pop("soft_topk", None)
