"""No host reads in the steady-state training step (what a GPU and a CUDA graph need), checked
on the CPU under the accelerator policy (engram_core.testing.host_reads): the zoo backbone on
mqar, full attention and windowed, and a negative control that reads its loss."""

from __future__ import annotations

import inspect
import types
from pathlib import Path

import pytest
import torch

from engram_core.builtin.lm import TokenLMConfig, TokenLMObjective
from engram_core.hookspecs import hookimpl
from engram_core.registry import load_registry
from engram_core.run import accel
from engram_core.testing.host_reads import HostReads, as_on_an_accelerator, host_reads_in_training

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "recipes" / "bases" / "zoo.toml"
SHORT = ["data.n_train=256", "data.n_eval=32", "stages.0.steps=5", "stages.0.batch_size=8", "stages.0.warmup_steps=1"]


@pytest.mark.parametrize("window", [0, 2])
def test_the_zoo_backbone_step_reads_nothing_on_the_host(window):
    assert host_reads_in_training(ZOO, [*SHORT, f"head.window={window}"]) == []


class ReadsItsLoss(TokenLMObjective):
    """token_lm that looks at its loss on the host every step (what a GPU step must not do)."""

    def forward(self, model, batch):
        loss, terms = super().forward(model, batch)
        if loss.item() > 1e9:
            raise RuntimeError("diverged")
        return loss, terms


def test_a_read_in_the_step_is_found_with_its_line(monkeypatch):
    monkeypatch.setenv("ENGRAM_PLUGINS", "")
    @hookimpl
    def engram_objectives(register):
        register("reads_its_loss", ReadsItsLoss, TokenLMConfig, requires=("causal_lm",))

    registry = load_registry(extra={"reader": types.SimpleNamespace(__name__="reader", engram_objectives=engram_objectives)})
    found = host_reads_in_training(ZOO, [*SHORT, 'stages.0.objective={ type = "reads_its_loss" }'], registry=registry)
    lines, first = inspect.getsourcelines(ReadsItsLoss.forward)
    line = first + next(i for i, text in enumerate(lines) if "loss.item()" in text)
    assert found == [f"item at {__file__}:{line}"] * 3, found  # steps 3, 4 and 5 of 5


def test_the_policy_and_the_counter():
    x = torch.arange(4.0)
    assert accel.host_reads_free(x.device)
    with as_on_an_accelerator():
        assert not accel.host_reads_free(x.device)
    assert accel.host_reads_free(x.device)
    with HostReads() as reads:
        x[x > 1]
        x[1:3]
        int(x.argmax())
        torch.nonzero(x)
        x.sum()
    assert [f.split(" at ")[0] for f in reads.found] == ["__getitem__", "__int__", "nonzero"]
