"""Shipped recipes rewritten with `extends` resolve to exactly what they resolved to before.

tests/resolved_recipes/<stem>.toml is the resolved recipe (`to_toml`) written from main
before the rewrite (tests/snapshot_recipes.py). To rewrite another recipe: snapshot it
first, rewrite it, add its stem here. Both sides are loaded by today's code, so a default
added to a config later changes both alike.
"""

from pathlib import Path

import pytest

from engram_core.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOTS = ROOT / "tests" / "resolved_recipes"
REWRITTEN = sorted(p.stem for p in SNAPSHOTS.glob("*.toml"))


@pytest.mark.parametrize("name", REWRITTEN)
def test_rewritten_recipe_resolves_as_before(name):
    before = load_recipe(SNAPSHOTS / f"{name}.toml").to_dict()
    after = load_recipe(ROOT / "recipes" / f"{name}.toml").to_dict()
    assert after == before


@pytest.mark.parametrize("name", REWRITTEN)
def test_rewritten_recipe_uses_a_base(name):
    text = (ROOT / "recipes" / f"{name}.toml").read_text()
    assert "extends" in text


def test_the_written_recipe_runs_again_as_it_is(tmp_path):
    """recipe.toml in a run directory has no `extends`: it loads on its own, elsewhere."""
    recipe = load_recipe(ROOT / "recipes" / "contrastive.toml")
    copy = tmp_path / "recipe.toml"
    copy.write_text(recipe.to_toml())
    assert "extends" not in copy.read_text()
    assert load_recipe(copy).to_dict() == recipe.to_dict()
