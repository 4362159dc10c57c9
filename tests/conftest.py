from pathlib import Path

import pytest

from engram_core.testing.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = ROOT / "recipes" / "minimal.toml"


@pytest.fixture
def minimal_recipe():
    return MINIMAL


@pytest.fixture
def small_recipe(tmp_path):
    """minimal.toml made quicker: 60 steps, eval/checkpoint every 20."""
    text = MINIMAL.read_text()
    text = text.replace("steps = 600", "steps = 60").replace("eval_every = 200", "eval_every = 20")
    text = text.replace("checkpoint_every = 200", "checkpoint_every = 20").replace("warmup_steps = 50", "warmup_steps = 5")
    p = tmp_path / "small.toml"
    p.write_text(text)
    return p


__all__ = ["run_cli", "MINIMAL"]
