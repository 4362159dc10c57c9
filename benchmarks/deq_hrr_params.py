"""Parameter counts of the deq-hrr needle models and of the transformer baseline without memory.

For each model, built from the shipped recipe through the engine (`needle_len256.toml`; the
counts do not depend on the length, positions being off), prints and saves
  * trainable: parameters with requires_grad;
  * used: those a backward pass of the task loss reaches (a trunk other than the DEQ leaves
    the DEQ's own state map and convolution unused).
Writes benchmarks/results/deq_hrr_params.json.

    OMP_NUM_THREADS=1 python benchmarks/deq_hrr_params.py        (a few seconds on one core)
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from engram_core.recipe import load_recipe
from engram_core.train.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.n_train=64", "data.n_eval=32", "data.eval_lengths=[]"]  # the counts do not depend on the data's size
MODELS = {
    "DEQ + HRR trace (needle recipes)": [],
    "DEQ, no memory (memory=none)": ["memory=none"],
    "transformer, no memory (head.trunk=transformer memory=none)": ["head.trunk=transformer", "memory=none"],
}


def count(overrides: list[str], work: Path) -> dict:
    recipe = load_recipe(ROOT / "recipes" / "needle_len256.toml", [*SMALL, *overrides, "run.device=cpu"])
    engine = Engine(recipe, work, show_progress=False)
    engine.build()
    model = engine.model
    params = [p for p in model.parameters() if p.requires_grad]
    batch = engine.dataset.sample("train", 4, torch.Generator().manual_seed(0))
    out = model.head.forward_detailed(batch)
    F.cross_entropy(out["logits"], batch["label"]).backward()
    return {"trainable": sum(p.numel() for p in params),
            "used": sum(p.numel() for p in params if p.grad is not None)}


def main() -> None:
    torch.set_num_threads(1)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, overrides) in enumerate(MODELS.items()):
            results[name] = {"overrides": overrides, **count(overrides, Path(tmp) / f"run{i}")}
            print(f"{name:62s} trainable {results[name]['trainable']:>7d}   used {results[name]['used']:>7d}")
    out = ROOT / "benchmarks" / "results" / "deq_hrr_params.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
