"""benchmarks/stacked_zoo.py trains K stacked members (torch.func) as K models alone would
be trained: its correctness check, on the CPU at a tiny setting (the timings are the GPU's)."""

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
