"""Every recipe of this plugin runs end to end (shrunk by overrides), and bad input exits 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from engram_core.recipe.extends import load_tree
from engram_core.testing.cli import run_cli

RECIPES = Path(__file__).resolve().parents[3] / "recipes"
NAMES = [
    "rollout_vmf",
    "phase4_memory",
    "rollout_finetune",
    "horizon_sweep",
    "mixed_objective",
    "archetypes",
    "memory_basis",
    "linear_baseline",
    "stable_generation",
    "d512_fit",
    "d512_sweep",
    "d512_linear_mlp",
    "d512_linear_mlp_sweep",
    "stable_linear",
]
TINY_DATA = ["data.synthetic={ dim = 12, speakers = 5, utterances = 2, frames = 70 }"]


def engram_run(tmp_path, *args) -> tuple[int, str]:
    """engram-run in-process with only this plugin and a private data cache."""
    r = run_cli(*args, "--quiet", "--out", str(tmp_path / "runs"), plugins="audio-mimi",
                env={"ENGRAM_CACHE": str(tmp_path / "cache")})
    return r.returncode, r.stdout + r.stderr


def shrink(name: str) -> list[str]:
    recipe, _ = load_tree(RECIPES / f"{name}.toml")  # `extends` merged: the stages and metrics the run uses
    over = list(TINY_DATA)
    for i, st in enumerate(recipe["stages"]):
        if "steps" in st:
            over.append(f"stages.{i}.steps=2")
        if st.get("kind") == "fit" and st.get("target", "memory") == "memory":
            over.append(f"stages.{i}.options={{ iters = 2, max_items = 400 }}")
    sweep = recipe.get("sweep", {})
    if "memory" in sweep:
        over.append('sweep.memory=[{ type = "kmeans", k = 16 }, { type = "gated_residual", k = 16, topk = 2 }]')
    elif sweep:  # two points of each swept value are enough to prove the sweep runs
        over.append(
            "sweep={ "
            + ", ".join(
                f'"{k}" = {json.dumps(v[:2]) if not isinstance(v[0], dict) else _inline([_few_steps(t) for t in v[:2]])}'
                for k, v in sweep.items()
            )
            + " }"
        )
    for i, m in enumerate(recipe["metrics"]):
        if m["type"] == "rollout":
            over.append(f"metrics.{i}.segments=16")
        if m["type"] == "archetypes":
            over.append(f"metrics.{i}.max_items=300")
        if m["type"] == "generate":
            over.append(f"metrics.{i}.sequences=3")
    return over


def _few_steps(table: dict) -> dict:
    return {**table, "steps": 2} if "steps" in table else table


def _inline(tables: list[dict]) -> str:
    def one(t):
        return "{ " + ", ".join(f"{k} = {one(v) if isinstance(v, dict) else json.dumps(v)}" for k, v in t.items()) + " }"

    return "[" + ", ".join(one(t) for t in tables) + "]"


@pytest.mark.parametrize("name", NAMES)
def test_recipe_runs(tmp_path, name):
    rc, out = engram_run(tmp_path, str(RECIPES / f"{name}.toml"), *shrink(name))
    assert rc == 0, out
    summaries = list((tmp_path / "runs").rglob("summary.json"))
    assert summaries
    for s in summaries:
        data = json.loads(s.read_text())
        assert data["status"] == "completed"
        final = data["final"]
        assert "eval/dnll" in final and np.isfinite(final["eval/dnll"])
    assert "tensorboard --logdir" in out
    if name == "rollout_vmf":  # the headline: teacher-forced and rollout metrics side by side
        for stage in ("pre", "post"):
            for tag in ("eval/dnll", "eval/direction_cos", "rollout/dnll", "rollout/max_norm", "vmf/kappa_mean",
                        "generate/nonfinite", "generate/max_norm", "generate/step_ratio", "generate/dnll",
                        "generate/spectral_distance", "generate_mean/max_norm"):
                assert tag in data["stages"][stage]
        # TensorBoard got the same values under the same tags
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(summaries[0].parent), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in ("eval/dnll", "rollout/dnll", "rollout/max_norm", "rollout/nonfinite", "vmf/kappa_median"):
            assert tag in acc.Tags()["scalars"], acc.Tags()["scalars"]
        last = acc.Scalars("rollout/dnll")[-1].value
        assert last == pytest.approx(data["stages"]["post"]["rollout/dnll"], rel=1e-5)


# ---- bad input: one line, exit 2 ---------------------------------------------------------


def one_line_error(out: str) -> str:
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, out
    return lines[0]


def test_k_longer_than_shortest_utterance(tmp_path):
    rc, out = engram_run(tmp_path, str(RECIPES / "rollout_vmf.toml"), *TINY_DATA, "stages.2.objective.horizon=90")
    assert rc == 2
    line = one_line_error(out)
    assert "stages" in line and "horizon" in line and "longer than every" in line


def test_head_dimension_mismatch(tmp_path):
    rc, out = engram_run(tmp_path, str(RECIPES / "rollout_vmf.toml"), *TINY_DATA, "head.dim=32")
    assert rc == 2
    assert "head.dim" in one_line_error(out) and "D = 12" in out


def test_store_without_expected_arrays(tmp_path):
    bad = tmp_path / "bad.zarr"
    zarr.open_group(str(bad), mode="w").create_array("z", data=np.zeros((4, 3), dtype=np.float32))
    rc, out = engram_run(tmp_path, str(RECIPES / "rollout_vmf.toml"), f"data.path={bad}")
    assert rc == 2
    assert "data.path" in one_line_error(out) and "utterances" in out


def test_split_with_a_speaker_on_both_sides(tmp_path):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["spk000", "spk001"], "eval": ["spk001"]}))
    rc, out = engram_run(tmp_path, str(RECIPES / "rollout_vmf.toml"), *TINY_DATA, f"data.split_file={split}")
    assert rc == 2
    assert "data.split_file" in one_line_error(out) and "spk001" in out
