"""Shipped recipes rewritten with `extends` resolve to exactly what they resolved to before.

tests/resolved_recipes/<stem>.toml is the resolved recipe (`to_toml`) written from main
before the rewrite (tests/snapshot_recipes.py). To rewrite another recipe: snapshot it
first, rewrite it, add its stem here. Both sides are loaded by today's code, so a default
added to a config later changes both alike. A change meant to change what a recipe does
updates its snapshot in the same commit, by those keys only (the deq-hrr recipes' validation
split: `data.n_val`, the stages' `eval_split`).
"""

from pathlib import Path

import pytest

from engram_core.recipe import load_recipe, read_toml
from engram_core.registry import load_registry

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOTS = ROOT / "tests" / "resolved_recipes"
REWRITTEN = sorted(p.stem for p in SNAPSHOTS.glob("*.toml"))


def _needs_missing_plugin(name: str) -> str | None:
    """The data set / head / memory type a snapshot names that no installed plugin registers
    (`tox -e core` has the core only)."""
    raw, reg = read_toml(SNAPSHOTS / f"{name}.toml"), load_registry()
    for table, kind in (("data", "datasets"), ("head", "heads"), ("memory", "memories")):
        t = raw.get(table, {}).get("type")
        if t and not any(c.name == t or c.qualified == t for c in reg.components[kind].values()):
            return t
    return None


@pytest.mark.parametrize("name", REWRITTEN)
def test_rewritten_recipe_resolves_as_before(name):
    if missing := _needs_missing_plugin(name):
        pytest.skip(f"the plugin registering '{missing}' is not installed")
    before = load_recipe(SNAPSHOTS / f"{name}.toml").to_dict()
    after = load_recipe(ROOT / "recipes" / f"{name}.toml").to_dict()
    assert after == before


@pytest.mark.parametrize("name", REWRITTEN)
def test_rewritten_recipe_uses_a_base(name):
    text = (ROOT / "recipes" / f"{name}.toml").read_text()
    assert "extends" in text


def test_the_written_recipe_runs_again_as_it_is(tmp_path):
    """recipe.toml in a run directory has no `extends`: it loads on its own, elsewhere."""
    if missing := _needs_missing_plugin("contrastive"):
        pytest.skip(f"the plugin registering '{missing}' is not installed")
    recipe = load_recipe(ROOT / "recipes" / "contrastive.toml")
    copy = tmp_path / "recipe.toml"
    copy.write_text(recipe.to_toml())
    assert "extends" not in copy.read_text()
    assert load_recipe(copy).to_dict() == recipe.to_dict()
