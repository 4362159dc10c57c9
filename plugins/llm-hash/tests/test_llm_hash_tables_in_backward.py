"""Through the engine: a recipe's table on a row-wise optimiser is updated inside the
backward by default on CUDA (`engram_core.tables.rowwise`, fused_backward "auto"). The CUDA
policy is forced on the CPU here and the run compared with today's CPU path (dense
gradient, update at step())."""

import json
from pathlib import Path

import pytest
import tomli_w
import torch

from engram_core.recipe.extends import load_tree
from engram_core.tables import rowwise

RECIPES = Path(__file__).resolve().parents[3] / "recipes"


def _recipe(tmp_path: Path, name: str, then_adam: bool = False) -> Path:
    raw, _ = load_tree(RECIPES / "kv_memorisation.toml")
    raw.pop("sweep")
    raw["run"] = {"out_dir": str(tmp_path / "runs"), "name": name}
    raw["data"]["n_synthetic"] = 40
    raw["head"].update(dim=32, n_layers=2, n_heads=2)
    raw["memory"].update(memory_size=4099, heads_per_order=2)
    for st in raw["stages"]:
        if "steps" in st:
            st.update(steps=8 if st["name"] == "train_engram" else 3, batch_size=8)
            st.pop("eval_every", None)
            st.pop("warmup_steps", None)
    raw["stages"][2]["param_groups"][0]["optimizer"] = "rowwise_adam"
    if then_adam:  # a later stage trains the table with plain Adam (a dense gradient)
        later = {k: v for k, v in raw["stages"][2].items() if k not in ("eval_every", "warmup_steps")}
        later.update(name="more_with_adam", steps=3, metrics=[], param_groups=[{**raw["stages"][2]["param_groups"][0], "optimizer": "adam"}])
        raw["stages"].append(later)
    raw.pop("metrics", None)
    path = tmp_path / f"{name}.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def _final_model(tmp_path: Path, name: str) -> dict:
    (run,) = (tmp_path / "runs" / name).iterdir()
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")["model"]


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_recipe_tables_in_backward_equal_the_dense_path(tmp_path, monkeypatch, grad_accum):
    from engram_core.cli import run_main

    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    made = []
    real = rowwise.RowwiseAdam.__init__

    def recording(self, *args, **kwargs):  # which optimisers the engine made, to check where they updated
        real(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(rowwise.RowwiseAdam, "__init__", recording)
    finals = {}
    overrides = ["stages.2.grad_clip=0.0", f"stages.2.grad_accum={grad_accum}", "run.threads=1", "--quiet"]
    for name in ("dense", "in_backward"):
        if name == "in_backward":
            monkeypatch.setattr(rowwise, "in_backward_by_default", lambda device: True)  # as on CUDA
        made.clear()
        assert run_main([str(_recipe(tmp_path, name)), *overrides]) == 0
        (opt,) = made
        assert opt.updates_in_backward == (name == "in_backward")
        if name == "in_backward":
            assert opt._mode == ("backward" if grad_accum == 1 else "accumulate")
        finals[name] = _final_model(tmp_path, name)
    tables = [k for k in finals["dense"] if k.endswith("table.weight")]
    assert tables and finals["dense"].keys() == finals["in_backward"].keys()
    for k in finals["dense"]:
        # the sparse gradient sums a row's reads in another order than the dense one
        torch.testing.assert_close(finals["in_backward"][k], finals["dense"][k], rtol=1e-4, atol=1e-5)


def test_a_later_stage_with_adam_gets_the_tables_dense_gradient_back(tmp_path, monkeypatch):
    """Stage 2 updates the table in backward (rowwise_adam, the CUDA policy forced); a later
    stage trains it with plain Adam: its optimiser gets a dense gradient (Adam takes no
    sparse one) and no earlier hook updates the table, so the run equals the dense one."""
    from engram_core.cli import run_main

    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    finals = {}
    overrides = ["stages.2.grad_clip=0.0", "stages.5.grad_clip=0.0", "run.threads=1", "--quiet"]
    for name in ("dense", "in_backward"):
        if name == "in_backward":
            monkeypatch.setattr(rowwise, "in_backward_by_default", lambda device: True)  # as on CUDA
        assert run_main([str(_recipe(tmp_path, name, then_adam=True)), *overrides]) == 0
        finals[name] = _final_model(tmp_path, name)
    # plain Adam divides each element by its own tiny second moment, which carries the
    # summation-order rounding further (2 of 64,992 table values 1.9e-5 apart); a stale
    # row-wise update in the Adam stage would move every row read by ~lr (1e-2)
    for k in finals["dense"]:
        torch.testing.assert_close(finals["in_backward"][k], finals["dense"][k], rtol=1e-3, atol=1e-4)
