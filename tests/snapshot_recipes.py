"""Write the resolved form of shipped recipes into tests/resolved_recipes/<stem>.toml.

    python tests/snapshot_recipes.py recipes/needle_len256.toml recipes/needle_len512.toml

Run it on the recipes as they are BEFORE rewriting them with `extends`; then rewrite them,
and tests/test_recipe_snapshots.py checks each still resolves to exactly its snapshot.
"""

import sys
from pathlib import Path

from engram_core.recipe import load_recipe

OUT = Path(__file__).resolve().parent / "resolved_recipes"


def main(paths: list[str]) -> int:
    OUT.mkdir(exist_ok=True)
    for p in paths:
        target = OUT / f"{Path(p).stem}.toml"
        target.write_text(load_recipe(p).to_toml(include_sweep=True))
        print(f"{p} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
