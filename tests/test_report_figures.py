"""What `engram report` draws: curves per stage and objective, no constant or pre/post-only
panels, the evaluation stages side by side, TensorBoard's images, and sweep axes that a
reader can trust (from 0 for shares, chance lines, no costs as outcomes, string axes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engram_core.run.metric_info import MetricInfo
from engram_core.tools.report import (
    curve_panels,
    draw_lines,
    line_series,
    outcome_metrics,
    plot_sweep,
    plot_sweep_lines,
    save_images,
    stage_comparison,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _run(scalars: dict, records: list[dict], stages: list[dict], summary_stages: dict) -> dict:
    recipe = {"stages": [{"name": "one_step", "objective": {"type": "one_step_nll"}, "steps": 100},
                         {"name": "rollout", "objective": {"type": "rollout_nll"}, "steps": 50}]}
    return {"name": "r", "recipe": recipe, "scalars": scalars, "records": records, "stages": stages,
            "summary": {"stages": summary_stages, "final": {}}, "dir": Path(".")}


STAGES = [{"name": "one_step", "kind": "train", "start": 0, "end": 100}, {"name": "rollout", "kind": "train", "start": 100, "end": 150}]


def test_curves_are_per_stage_without_constant_or_closing_only_series():
    scalars = {
        "train/loss": [(s, 10.0 - s / 10) for s in range(10, 151, 10)],  # both stages: two panels, two axes
        "train/clip_rate": [(s, 0.0) for s in range(10, 151, 10)],  # always zero: no panel
    }
    records = [{"stage": "one_step", "step": 100, "metrics": {"eval/nll": 1.0}},  # one closing evaluation per stage
               {"stage": "rollout", "step": 150, "metrics": {"eval/nll": 0.5}}]
    panels = curve_panels(_run(scalars, records, STAGES, {}))
    assert [(stage, tag) for stage, tag, _ in panels] == [("one_step", "train/loss"), ("rollout", "train/loss")]
    assert [s for s, _ in panels[1][2]] == [110, 120, 130, 140, 150]  # the rollout stage's points only


def test_stage_comparison_keeps_directional_metrics_that_changed():
    info = MetricInfo([{"directions": {"generate/spectral_distance": "lower", "generate/clip_rate": "lower", "eval/params": "lower"},
                        "groups": {"eval/params": "cost"}}])
    stages = {"pre": {"generate/spectral_distance": 1.68, "generate/clip_rate": 0.0, "eval/params": 10.0, "vmf/kappa": 3.0},
              "post": {"generate/spectral_distance": 4.23, "generate/clip_rate": 0.0, "eval/params": 12.0, "vmf/kappa": 2.0}}
    groups = stage_comparison(_run({}, [], STAGES, stages), info)
    assert groups == [("generate", [("generate/spectral_distance", [("pre", 1.68), ("post", 4.23)])])]


def test_images_of_the_event_files_are_saved_as_pngs(tmp_path):
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    w = SummaryWriter(str(run))
    w.add_image("generate/post/trajectories", np.random.default_rng(0).random((3, 20, 30)), 5)
    w.close()
    saved = save_images(run, tmp_path)
    assert [(tag, p.name) for tag, p in saved] == [("generate/post/trajectories", "image-generate-post-trajectories.png")]
    assert saved[0][1].read_bytes()[:8] == PNG


def _fake_sweep(tmp_path: Path, memories: list, accs: list[list[float]]) -> dict:
    plan, summaries = [], []
    for i, (m, vs) in enumerate([(m, v) for m, v in zip(memories, accs)]):
        for seed, acc in enumerate(vs):
            d = f"{len(plan):03d}"
            plan.append({"index": len(plan), "dir": d, "point": {"memory": m, "run.seed": seed}, "label": d})
            (tmp_path / d).mkdir()
            (tmp_path / d / "recipe.toml").write_text('[data]\ntype = "mqar"\nvocab_size = 64\n\n[[metrics]]\ntype = "completion_accuracy"\n')
            final = {"eval/acc": acc, "eval/params": 1000.0 + i, "eval/tokens_per_s": 5e4 + seed}
            s = {"status": "completed", "final": final, "stages": {"final": final}}
            summaries.append(s)
            (tmp_path / d / "summary.json").write_text(json.dumps(s))
    return {"dir": tmp_path, "name": "zoo", "keys": ["memory", "run.seed"], "plan": plan, "summaries": summaries}


def test_sweep_outcomes_leave_out_costs(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_PLUGINS", "")
    from engram_core import registry

    monkeypatch.setattr(registry, "_cached", None)
    sweep = _fake_sweep(tmp_path, ["none", {"type": "hrr", "dim": 64}], [[0.04, 0.045], [0.6, 0.7]])
    from engram_core.tools.report import sweep_info

    info = sweep_info(sweep)
    assert outcome_metrics(sweep, info) == ["eval/acc"]  # params and tokens_per_s are costs
    assert info.of("eval/acc").levels({}) == {"chance": pytest.approx(1 / 32)}


def test_sweep_accuracy_axis_starts_at_zero_with_the_chance_line(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    monkeypatch.setenv("ENGRAM_PLUGINS", "")
    from engram_core import registry

    monkeypatch.setattr(registry, "_cached", None)
    sweep = _fake_sweep(tmp_path, ["none", "other"], [[0.039, 0.047], [0.041, 0.043]])
    figures = []
    monkeypatch.setattr(plt.Figure, "savefig", lambda self, path, **kw: figures.append(self) or Path(path).write_bytes(PNG))
    assert plot_sweep(sweep, tmp_path / "sweep.png") is not None
    ax = figures[-1].axes[0]
    assert ax.get_ylim()[0] == 0  # not zoomed to 0.039-0.047
    assert any(abs(line.get_ydata()[0] - 1 / 32) < 1e-9 for line in ax.get_lines())  # the chance line
    assert "↑" in ax.get_title()


def test_a_string_x_axis_is_categorical(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_PLUGINS", "")
    from engram_core import registry

    monkeypatch.setattr(registry, "_cached", None)
    sweep = _fake_sweep(tmp_path, ["none", {"type": "hrr", "dim": 64}, "engram_hash"], [[0.04], [0.6], [0.9]])
    out = plot_sweep_lines(sweep, tmp_path / "lines.png", "memory", [], "eval/acc")  # was: could not convert string to float
    assert out is not None and out.read_bytes()[:8] == PNG
    lines = line_series([(p["point"], {"mean": s["final"]["eval/acc"], "sd": 0.0, "n": 1, "values": [1]})
                         for p, s in zip(sweep["plan"], sweep["summaries"])], "memory", [])
    assert [x for x, _ in lines["all"]] == ["none", "hrr", "engram_hash"]  # the sweep's order, as labels


def test_draw_lines_on_numbers_stays_numeric():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    agg = {"mean": 0.5, "sd": 0.1, "n": 2, "values": [0.4, 0.6]}
    draw_lines(ax, {"a": [(4.0, agg), (8.0, agg)]}, "data.n_pairs", "eval/acc")
    assert list(ax.get_lines()[0].get_xdata()) == [4.0, 8.0]
    plt.close(fig)
