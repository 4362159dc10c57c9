"""`engram validate`'s dry forward: a memory that builds but whose forward fails on the
recipe's shapes is caught before training (engram_core.train.dry_forward)."""

from __future__ import annotations

import types
from pathlib import Path

import attrs
import pytest
from torch import nn

from engram_core import Memory, hookimpl
from engram_core.points import LayerPoint
from engram_core.recipe import load_recipe
from engram_core.registry import load_registry
from engram_core.train.dry_forward import MAX_PARAMS, dry_forward
from engram_core.train.validate import ComponentError, check_recipe

ROOT = Path(__file__).resolve().parents[1]


@attrs.frozen
class FixedWidthConfig:
    width: int = 16  # wrong for a head of width 64: shows only when hidden states flow


class FixedWidthMemory(Memory, LayerPoint):
    """A layer memory that projects with a matrix of its own fixed width."""

    def __init__(self, cfg: FixedWidthConfig, build):
        super().__init__()
        self.proj = nn.Linear(cfg.width, cfg.width)

    def layer_indices(self):
        return (0,)

    def apply_layer(self, index, hidden, ids):
        return hidden + self.proj(hidden)


@hookimpl
def engram_memories(register):
    register("fixed_width", FixedWidthMemory, FixedWidthConfig, points=("layer",))


def _zoo_recipe(tmp_path: Path, memory: str | None) -> Path:
    p = tmp_path / "zoo_probe.toml"
    text = f'extends = "{ROOT / "recipes" / "bases" / "zoo.toml"}"\n\n[data]\nn_train = 64\nn_eval = 16\n'
    p.write_text(text + (f'\n[memory]\ntype = "{memory}"\n' if memory else ""))
    return p


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setenv("ENGRAM_PLUGINS", "")
    return load_registry(extra={"probe": types.SimpleNamespace(engram_memories=engram_memories, __name__="probe")})


def test_a_forward_that_fails_on_the_recipes_shapes_is_caught(tmp_path, registry):
    recipe = load_recipe(_zoo_recipe(tmp_path, "fixed_width"), registry=registry)
    built = check_recipe(recipe)  # the meta build passes: nothing runs a forward there
    with pytest.raises(ComponentError) as exc:
        dry_forward(recipe, built)
    line = str(exc.value)
    assert "dry forward of stages.0 ('train', objective 'token_lm') on a batch of 2 from split 'train'" in line
    assert "RuntimeError" in line and "\n" not in line


def test_a_working_recipe_passes_and_says_what_it_ran(tmp_path, registry):
    recipe = load_recipe(_zoo_recipe(tmp_path, None), registry=registry)
    assert dry_forward(recipe, check_recipe(recipe)) == "dry forward ok: stages.0 ('train', objective 'token_lm'), batch of 2"


def test_a_large_model_is_skipped_not_allocated(tmp_path, registry, monkeypatch):
    import engram_core.train.dry_forward as df

    monkeypatch.setattr(df, "MAX_PARAMS", 10)
    recipe = load_recipe(_zoo_recipe(tmp_path, None), registry=registry)
    assert dry_forward(recipe, check_recipe(recipe)).startswith("dry forward skipped: ")
    assert MAX_PARAMS >= 1_000_000


def test_validate_cli_reports_it_in_one_line_and_no_forward_skips(tmp_path):
    from .conftest import run_cli

    recipe = _zoo_recipe(tmp_path, None)
    r = run_cli("validate", recipe, tool="engram")
    assert r.returncode == 0, r.stderr
    assert "dry forward ok" in r.stdout
    r = run_cli("validate", recipe, "--no-forward", tool="engram")
    assert r.returncode == 0 and "dry forward skipped (--no-forward)" in r.stdout


class GpuOnlyMemory(FixedWidthMemory):
    cpu_forward = False  # its forward would fail on the CPU (here: the wrong width, as above)


def test_a_memory_without_a_cpu_forward_is_skipped_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_PLUGINS", "")

    @hookimpl
    def engram_memories(register):
        register("gpu_only", GpuOnlyMemory, FixedWidthConfig, points=("layer",))

    registry = load_registry(extra={"probe": types.SimpleNamespace(engram_memories=engram_memories, __name__="probe")})
    recipe = load_recipe(_zoo_recipe(tmp_path, "gpu_only"), registry=registry)
    note = dry_forward(recipe, check_recipe(recipe))
    assert note == "dry forward skipped: the memory 'gpu_only' has no CPU forward (it declares cpu_forward = False)"
