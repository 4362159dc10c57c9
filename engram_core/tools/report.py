"""`engram report`: one run or one sweep as Markdown plus PNG figures.

Read it top to bottom: load (`load_run`, `load_sweep`) → aggregate (`final_metrics`,
`config_groups`, `aggregate_seeds`) → plot (`plot_curves`, `plot_sweep`) → write
(`write_report`). Every function is usable on its own (the results pipeline imports them);
`sweep.py` uses the same aggregation for the across-seeds table of `sweep.md`.

Where the numbers come from: `train/*` curves only exist in the TensorBoard event files
(metrics.jsonl has one line per *evaluation*), so they are read with EventAccumulator;
evaluation curves come from metrics.jsonl (the same values TensorBoard has, and present
even without event files); final metrics from summary.json.

matplotlib is imported inside the plotting functions (Agg backend), so loading and
aggregating — and `engram-run`, which writes sweep.md — never import it.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

from ..errors import EngramError
from ..run.summary import (
    SEED_KEY,
    aggregate_seeds,
    config_groups,
    final_metrics,
    fmt,
    seed_table,
    seed_table_md,
)

CURVE_PREFIXES = ("train/", "eval/", "rollout/")


REPORT_DIR = "report"


class ReportError(EngramError):
    """The directory is not a run or sweep directory (one line on stderr, exit 2)."""


# ---- load ---------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / "sweep.json").is_file()


def is_run_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "summary.json").is_file() or (p / "metrics.jsonl").is_file()


def load_records(run_dir: str | Path) -> list[dict]:
    """metrics.jsonl: one dict per evaluation (stage, step, split, stage_end, time_s, metrics)."""
    path = Path(run_dir) / "metrics.jsonl"
    out = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    break  # a torn last line from a kill
    return out


def load_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the run's TensorBoard event files: {tag: [(step, value), ...]}."""
    run_dir = Path(run_dir)
    if not any(run_dir.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def stage_spans(recipe: dict) -> list[dict]:
    """Each stage's global step range from the resolved recipe: {name, kind, start, end}.

    Train stages advance the global step by their `steps`; fit and eval stages take none
    (start == end), as in the engine.
    """
    spans, step = [], 0
    for i, st in enumerate(recipe.get("stages", [])):
        kind = st.get("kind", "train")
        n = int(st.get("steps", 0)) if kind == "train" else 0
        spans.append({"name": st.get("name", f"stage{i}"), "kind": kind, "start": step, "end": step + n})
        step += n
    return spans


def load_run(run_dir: str | Path) -> dict:
    """Everything a report needs about one run directory.

    Returns {"dir", "name", "recipe" (the resolved recipe.toml as a dict), "env", "summary",
    "records" (metrics.jsonl), "scalars" ({tag: [(step, value)]} from TensorBoard),
    "stages" (`stage_spans`)}. Missing files give empty values; a directory with neither
    summary.json nor metrics.jsonl raises ReportError.
    """
    d = Path(run_dir)
    if not d.is_dir():
        raise ReportError(f"no such directory: {d}")
    if not is_run_dir(d):
        raise ReportError(f"{d} is not a run directory (no summary.json or metrics.jsonl)")
    recipe = {}
    if (d / "recipe.toml").exists():
        try:
            recipe = tomllib.loads((d / "recipe.toml").read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ReportError(f"{d / 'recipe.toml'}: not valid TOML ({exc})") from None
    summary = _read_json(d / "summary.json") if (d / "summary.json").exists() else {}
    env = _read_json(d / "env.json") if (d / "env.json").exists() else {}
    name = summary.get("name") or recipe.get("run", {}).get("name") or d.name
    return {
        "dir": d,
        "name": name,
        "recipe": recipe,
        "env": env,
        "summary": summary,
        "records": load_records(d),
        "scalars": load_scalars(d),
        "stages": stage_spans(recipe),
    }


def load_sweep(sweep_dir: str | Path) -> dict:
    """A sweep directory: {"dir", "name", "keys", "plan" (sweep.json's points), "summaries"
    (one summary.json dict per point, {"status": "not run"} where there is none)}."""
    d = Path(sweep_dir)
    if not d.is_dir():
        raise ReportError(f"no such directory: {d}")
    if not is_sweep_dir(d):
        raise ReportError(f"{d} is not a sweep directory (no sweep.json)")
    meta = _read_json(d / "sweep.json")
    plan = meta.get("points", [])
    summaries = []
    for entry in plan:
        sp = d / entry["dir"] / "summary.json"
        summaries.append(_read_json(sp) if sp.exists() else {"status": "not run", "final": {}, "stages": {}})
    return {"dir": d, "name": meta.get("name", d.name), "keys": list(plan[0]["point"]) if plan else [], "plan": plan, "summaries": summaries}


# ---- plot -----------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def curve_series(run: dict, prefixes: tuple[str, ...] = CURVE_PREFIXES) -> dict[str, list[tuple[int, float, str]]]:
    """{tag: [(step, value, stage), ...]} for the tags a learning-curve figure shows.

    Training tags come from TensorBoard; evaluation tags from metrics.jsonl (TensorBoard
    for a tag that metrics.jsonl lacks). The stage of a TensorBoard point is the train
    stage whose step range holds it.
    """
    spans = [s for s in run["stages"] if s["kind"] == "train"]

    def stage_of(step: int) -> str:
        for s in spans:
            if s["start"] < step <= s["end"]:
                return s["name"]
        return spans[-1]["name"] if spans else ""

    series: dict[str, list[tuple[int, float, str]]] = {}
    for rec in run["records"]:
        for tag, v in rec["metrics"].items():
            if tag.startswith(prefixes):
                series.setdefault(tag, []).append((rec["step"], v, rec["stage"]))
    for tag, points in run["scalars"].items():
        if tag.startswith(prefixes) and tag not in series:
            series[tag] = [(step, v, stage_of(step)) for step, v in points]
    return dict(sorted(series.items(), key=lambda kv: (not kv[0].startswith("train/"), kv[0])))


def _informative(values: list[float]) -> bool:
    """A series worth a panel: finite values that are not all the same (an always-zero
    `rollout/clip_rate` says nothing a table cannot)."""
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return len(finite) >= 2 and max(finite) - min(finite) > 1e-12 * max(1.0, abs(max(finite)))


def _objective_label(run: dict, stage: str) -> str:
    for st in run["recipe"].get("stages", []):
        if st.get("name") == stage:
            obj = st.get("objective")
            kind = obj.get("type") if isinstance(obj, dict) else obj
            return f"{stage} ({kind})" if kind else stage
    return stage


def curve_panels(run: dict, prefixes: tuple[str, ...] = CURVE_PREFIXES) -> list[tuple[str, str, list[tuple[int, float]]]]:
    """The learning-curve panels: [(stage, tag, [(step, value)])], one per train stage and tag.

    A stage's curves are its own: stages train different objectives (a one-step NLL, then a
    rollout NLL), so `train/loss` of two stages never shares an axis. Evaluations are drawn
    where a stage evaluated more than once (eval_every); a stage's single closing evaluation
    is a number of the stage table, not a curve. Constant series are left out."""
    panels = []
    train_stages = [s["name"] for s in run["stages"] if s["kind"] == "train"]
    series = curve_series(run, prefixes)
    for stage in train_stages or sorted({p[2] for pts in series.values() for p in pts}):
        for tag, points in series.items():
            pts = [(step, v) for step, v, st in points if st == stage]
            if len({step for step, _ in pts}) >= 2 and _informative([v for _, v in pts]):
                panels.append((stage, tag, pts))
    return panels


def _arrow(info, tag: str) -> str:
    a = info.of(tag).arrow if info is not None else ""
    return f" {a}" if a else ""


def plot_curves(run: dict, path: str | Path, prefixes: tuple[str, ...] = CURVE_PREFIXES, info=None) -> Path | None:
    """Learning curves of a `load_run` dict: one row of panels per train stage (titled with
    its objective), one panel per tag that changes during the stage; ↑/↓ where the metric
    declares which way is better. Writes a PNG; returns its path (None: nothing to plot)."""
    panels = curve_panels(run, prefixes)
    if not panels:
        return None
    plt = _pyplot()
    stages = list(dict.fromkeys(st for st, _, _ in panels))
    cols = min(4, max(sum(1 for st, _, _ in panels if st == s) for s in stages))
    layout = []  # (row, col) per panel: each stage starts a new row
    row = 0
    for s in stages:
        mine = [p for p in panels if p[0] == s]
        for i, p in enumerate(mine):
            layout.append((row + i // cols, i % cols, p))
        row += math.ceil(len(mine) / cols)
    fig, axes = plt.subplots(row, cols, figsize=(3.6 * cols, 2.6 * row), squeeze=False, layout="constrained")
    used = set()
    for r, c, (stage, tag, pts) in layout:
        ax = axes[r][c]
        used.add((r, c))
        xs, ys = zip(*sorted(pts))
        train_tag = tag.startswith("train/")
        ax.plot(xs, ys, color="C0" if train_tag else "C1", linewidth=1.1, marker=None if len(xs) > 30 else "o", markersize=3)
        ax.set_title(f"{_objective_label(run, stage)}\n{tag}{_arrow(info, tag)}", fontsize=8)
        ax.set_xlabel("global step", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if min(ys) > 0 and max(ys) / min(ys) > 100:
            ax.set_yscale("log")
    for r in range(row):
        for c in range(cols):
            if (r, c) not in used:
                axes[r][c].axis("off")
    fig.suptitle(f"{run['name']}: learning curves per stage (↑/↓: which way is better)", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def stage_comparison(run: dict, info) -> list[tuple[str, list[tuple[str, list[tuple[str, float]]]]]]:
    """The evaluation stages side by side, for the metrics that say which way is better and
    changed: [(group, [(tag, [(stage, value)])])]. Always-constant values are left out (the
    stage table has them)."""
    results = {k: v for k, v in (run["summary"].get("stages") or {}).items() if v}
    if len(results) < 2:
        return []
    groups: dict[str, list] = {}
    tags = list(dict.fromkeys(t for res in results.values() for t in res))
    for tag in tags:
        ti = info.of(tag)
        values = [(st, res[tag]) for st, res in results.items() if isinstance(res.get(tag), (int, float))]
        if ti.direction == "unknown" or ti.is_cost or not _informative([v for _, v in values]):
            continue
        groups.setdefault(tag.split("/")[0], []).append((tag, values))
    return list(groups.items())


def plot_stage_comparison(run: dict, path: str | Path, info) -> Path | None:
    """Each evaluation stage's value of every directional metric that changed, one small bar
    panel per metric, grouped by its prefix (eval, rollout, generate, ...); a bar that moved
    against the metric's direction since the previous stage is red. Returns None when
    fewer than two stages evaluated."""
    from ..run.metric_info import got_worse

    groups = stage_comparison(run, info)
    if not groups:
        return None
    plt = _pyplot()
    cols = min(5, max(len(tags) for _, tags in groups))
    nrows = sum(math.ceil(len(tags) / cols) for _, tags in groups)
    fig, axes = plt.subplots(nrows, cols, figsize=(2.5 * cols, 2.3 * nrows), squeeze=False, layout="constrained")
    r = 0
    used = set()
    for _group, tags in groups:  # a new row of panels per group
        for i, (tag, values) in enumerate(tags):
            ax = axes[r + i // cols][i % cols]
            used.add((r + i // cols, i % cols))
            ti = info.of(tag)
            names = [st for st, _ in values]
            ys = [v if math.isfinite(v) else float("nan") for _, v in values]
            colours = ["C0"] + ["C3" if got_worse(ti, values[j - 1][1], values[j][1]) else "C2" for j in range(1, len(values))]
            ax.bar(range(len(ys)), ys, color=colours, width=0.6)
            for j, v in enumerate(ys):
                ax.annotate(fmt(v), (j, v), ha="center", va="bottom" if v >= 0 else "top", fontsize=6)
            for label, level in ti.levels(run["summary"].get("final", {})).items():
                ax.axhline(level, color="grey", linestyle=":", linewidth=0.9)
                ax.annotate(label, (len(ys) - 0.5, level), fontsize=6, color="grey", ha="right", va="bottom")
            ax.set_xticks(range(len(ys)), names, fontsize=7)
            ax.set_title(f"{tag} {ti.arrow}", fontsize=8)
            ax.tick_params(axis="y", labelsize=6)
            ax.grid(alpha=0.3, axis="y")
            ax.margins(y=0.18)
        r += math.ceil(len(tags) / cols)
    for rr in range(nrows):
        for c in range(cols):
            if (rr, c) not in used:
                axes[rr][c].axis("off")
    fig.suptitle(f"{run['name']}: evaluation stages (green: better than the stage before, red: worse; ↑/↓: which way is better)", fontsize=9)
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def load_images(run_dir: str | Path) -> dict[str, list[tuple[int, bytes]]]:
    """Every image of the run's TensorBoard event files: {tag: [(step, PNG bytes)]} (the
    generation metric's trajectories / norms / spectrum figure, for one)."""
    run_dir = Path(run_dir)
    if not any(run_dir.glob("events.out.tfevents.*")):
        return {}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 1, "histograms": 1, "tensors": 1})
    acc.Reload()
    return {tag: [(e.step, e.encoded_image_string) for e in acc.Images(tag)] for tag in acc.Tags().get("images", [])}


def save_images(run_dir: str | Path, out: str | Path) -> list[tuple[str, Path]]:
    """The last image of every TensorBoard image tag as a PNG in `out`: [(tag, path)]."""
    saved = []
    for tag, images in load_images(run_dir).items():
        if not images:
            continue
        step, data = images[-1]
        if data[:8] != b"\x89PNG\r\n\x1a\n":
            continue  # TensorBoard stores what the writer gave; the report embeds PNGs only
        path = Path(out) / ("image-" + "-".join(part for part in tag.replace("\\", "/").split("/") if part) + ".png")
        path.write_bytes(data)
        saved.append((tag, path))
    return saved


def _config_label(config: dict) -> str:
    from ..recipe import value_label

    return "\n".join(f"{k}={value_label(v)}" for k, v in config.items()) or "all points"


def sweep_info(sweep: dict, indices: list[int] | None = None):
    """The metric declarations of a sweep's points (engram_core.run.metric_info), from the first
    point among `indices` (default: all) that has a run directory; None when none has."""
    from ..run.metric_info import for_run

    for i in indices if indices is not None else range(len(sweep["plan"])):
        d = Path(sweep["dir"]) / sweep["plan"][i]["dir"]
        if (d / "recipe.toml").exists():
            return for_run(d)
    return None


def outcome_metrics(sweep: dict, info) -> list[str]:
    """The final metrics worth a panel: not a cost (parameters, speed), not a reference
    value (chance, a data norm), and not the same at every point."""
    metrics: list[str] = []
    for s in sweep["summaries"]:
        if s.get("status") == "completed":
            metrics += [m for m in s.get("final", {}) if m not in metrics]
    out = []
    for m in metrics:
        ti = info.of(m) if info is not None else None
        if ti is not None and (ti.is_cost or ti.group == "reference"):
            continue
        values = [s["final"][m] for s in sweep["summaries"] if s.get("status") == "completed" and m in s.get("final", {})]
        if _informative(values):
            out.append(m)
    # outcomes are what a metric says is better one way; a memory's own diagnostics (a gate's
    # mean) only when nothing declares a direction
    directional = [m for m in out if info is not None and info.of(m).direction != "unknown"]
    return directional or out


def _anchor_axis(ax, info, metric: str, values: list[float], levels: list[dict[str, float]], xs: list[float]) -> None:
    """A share (accuracy-like: declared higher-is-better, values in [0, 1]) gets an axis from
    0, so a gap of 0.04 is not drawn as a cliff; reference levels (chance, floor) are dotted
    lines, per configuration where they differ."""
    ti = info.of(metric) if info is not None else None
    finite = [v for v in values if math.isfinite(v)]
    if ti is not None and ti.direction == "higher" and finite and min(finite) >= 0 and max(finite) <= 1:
        top = ax.get_ylim()[1]  # autoscaled to the points and error bars
        ax.set_ylim(0, min(max(top, 0.05), 1.05))
    labels = sorted({k for lv in levels for k in lv})
    for label in labels:
        per_x = [(x, lv[label]) for x, lv in zip(xs, levels) if label in lv]
        if not per_x:
            continue
        if len({v for _, v in per_x}) == 1:
            ax.axhline(per_x[0][1], color="grey", linestyle=":", linewidth=1.0, label=f"{label} {fmt(per_x[0][1])}")
        else:
            for k, (x, v) in enumerate(per_x):
                ax.hlines(v, x - 0.4, x + 0.4, color="grey", linestyle=":", linewidth=1.0, label=label if k == 0 else None)


def plot_sweep(sweep: dict, path: str | Path, metrics: list[str] | None = None, seed_key: str = SEED_KEY) -> Path | None:
    """Final metrics of a `load_sweep` dict per configuration: mean with ±sd error bars
    across seeds, the single seeds as dots. One panel per metric (default: the outcome
    `final` metrics, see `outcome_metrics`); ↑/↓, an axis from 0 for shares, and the chance
    or floor level where the metric declares one. Writes a PNG; returns its path (None: no
    completed point)."""
    groups = config_groups(sweep["plan"], seed_key)
    aggs = [aggregate_seeds([sweep["summaries"][i] for i in idx]) for _, idx in groups]
    info = sweep_info(sweep)
    if metrics is None:
        metrics = outcome_metrics(sweep, info)
    metrics = [m for m in metrics if any(m in a for a in aggs)]
    if not metrics:
        return None
    plt = _pyplot()
    n = len(metrics)
    cols = min(2, n)
    rows = math.ceil(n / cols)
    width = max(5.5, 0.9 * len(groups) + 2)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 3.6 * rows), squeeze=False)
    varying = [k for k in sweep["keys"] if len({json.dumps(c.get(k), sort_keys=True, default=str) for c, _ in groups}) > 1]
    labels = [_config_label({k: v for k, v in c.items() if k in varying}) for c, _ in groups]  # what tells them apart
    xs = list(range(len(groups)))
    group_infos = [sweep_info(sweep, idx) for _, idx in groups]
    for ax, m in zip(axes.flat, metrics):
        drawn = []
        for x, agg in zip(xs, aggs):
            if m not in agg:
                continue
            mean, sd, k, values = agg[m]
            drawn += values
            ax.errorbar([x], [mean], yerr=[0.0 if math.isnan(sd) else sd], fmt="o", color="C0", capsize=5, markersize=6, zorder=3)
            ax.scatter([x + 0.12] * k, values, color="C1", s=12, alpha=0.8, zorder=2)
            ax.annotate(f"n={k}", (x, mean), textcoords="offset points", xytext=(8, -10), fontsize=7)
        levels = [gi.of(m).levels(_first_final(sweep, idx)) if gi is not None else {} for gi, (_, idx) in zip(group_infos, groups)]
        _anchor_axis(ax, info, m, drawn, levels, xs)
        ax.set_xticks(xs)
        long = max(map(len, (line for label in labels for line in label.split("\n"))), default=0) > 12
        ax.set_xticklabels(labels, fontsize=7, rotation=25 if long else 0, ha="right" if long else "center")
        ax.set_xlim(-0.5, len(groups) - 0.5)
        ax.set_title(m + _arrow(info, m), fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(alpha=0.3, axis="y")
        if any(levels):
            ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"{sweep['name']}: final metrics\nmean ± sd across {seed_key} (dots: single runs; ↑/↓: which way is better)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _first_final(sweep: dict, idx: list[int]) -> dict:
    """The final metrics of a configuration's first completed point (for levels named by a tag)."""
    for i in idx:
        if sweep["summaries"][i].get("status") == "completed":
            return sweep["summaries"][i].get("final", {})
    return {}


def _x_value(v: Any) -> float | str:
    """A swept value on an x axis: a number, else its label (a categorical axis)."""
    from ..recipe import value_label

    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return value_label(v)


def line_series(points: list[tuple[dict, dict]], x: str, series: list[str]) -> dict[str, list[tuple[float | str, dict]]]:
    """Group (sweep point, {mean, sd, n, values}) pairs into lines: one per value of the
    `series` keys, ordered by the point's value of `x` (numbers ascending; labels of other
    values — a memory's table — in the order the sweep lists them: a categorical axis).
    Points without `x` are left out."""
    from ..recipe import value_label

    lines: dict[str, list[tuple[float | str, dict]]] = {}
    order: dict[float | str, int] = {}
    for point, agg in points:
        if x not in point or not agg or not agg.get("n"):
            continue
        name = ", ".join(f"{value_label(point[k])}" for k in series if k in point) or "all"
        xv = _x_value(point[x])
        order.setdefault(xv, len(order))
        lines.setdefault(name, []).append((xv, agg))
    numeric = all(isinstance(xv, float) for xv in order)
    key = (lambda p: p[0]) if numeric else (lambda p: order[p[0]])
    return {k: sorted(v, key=key) for k, v in lines.items()}


def draw_lines(ax, lines: dict[str, list[tuple[float | str, dict]]], x: str, metric: str) -> None:
    """Mean ± sd across seeds against `x`, one line per series; an x of labels (not numbers)
    is a categorical axis, its ticks in the sweep's order."""
    cats: list[str] = []
    if any(isinstance(p[0], str) for pts in lines.values() for p in pts):
        for pts in lines.values():
            cats += [str(p[0]) for p in pts if str(p[0]) not in cats]
    for i, (name, pts) in enumerate(lines.items()):
        xs = [cats.index(str(p[0])) if cats else p[0] for p in pts]
        means = [p[1]["mean"] for p in pts]
        sds = [0.0 if p[1]["n"] < 2 or math.isnan(p[1]["sd"]) else p[1]["sd"] for p in pts]
        style = "-" if i < 10 else "--"
        if cats:  # categories are not a continuum: markers side by side, no joining line
            offset = (i - (len(lines) - 1) / 2) * min(0.12, 0.8 / max(len(lines), 1))
            ax.errorbar([v + offset for v in xs], means, yerr=sds, fmt="o", ms=5, capsize=3, label=name, color=f"C{i % 10}")
        else:
            ax.errorbar(xs, means, yerr=sds, fmt="o" + style, ms=4, capsize=3, lw=1.2, label=name, color=f"C{i % 10}")
    if cats:
        ax.set_xticks(range(len(cats)), cats, rotation=20 if max(map(len, cats)) > 8 else 0, ha="right" if max(map(len, cats)) > 8 else "center", fontsize=7)
        ax.set_xlim(-0.5, len(cats) - 0.5)
    ax.set_xlabel(x)
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_sweep_lines(sweep: dict, path: str | Path, x: str, series: list[str], metric: str, seed_key: str = SEED_KEY) -> Path | None:
    """A metric (mean ± sd across seeds) against the swept key `x`, one line per value of the
    `series` keys (e.g. accuracy against `data.n_pairs` per `memory`). Writes a PNG."""
    if x not in sweep["keys"]:
        raise ReportError(f"--x {x}: not a swept key; swept: {', '.join(sweep['keys'])}")
    bad = [k for k in series if k not in sweep["keys"]]
    if bad:
        raise ReportError(f"--series {bad[0]}: not a swept key; swept: {', '.join(sweep['keys'])}")
    groups = config_groups(sweep["plan"], seed_key)
    points = []
    for config, idx in groups:
        agg = aggregate_seeds([sweep["summaries"][i] for i in idx]).get(metric)
        if agg is not None:
            mean, sd, n, values = agg
            points.append((config, {"mean": mean, "sd": sd, "n": n, "values": values}))
    lines = line_series(points, x, series)
    if not lines:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    draw_lines(ax, lines, x, metric)
    info = sweep_info(sweep)
    values = [v for pts in lines.values() for _, agg in pts for v in agg["values"]]
    levels = []
    for _, idx in groups:
        gi = sweep_info(sweep, idx)
        if gi is not None:
            levels.append(gi.of(metric).levels(_first_final(sweep, idx)))
    same = [lv for lv in levels if lv]
    if same and all(lv == same[0] for lv in same):  # one level for every point: one line
        _anchor_axis(ax, info, metric, values, [same[0]], [0.0])
    else:
        _anchor_axis(ax, info, metric, values, [], [])
    if same:
        ax.legend(fontsize=7)
    ax.set_title(f"{sweep['name']}: {metric}{_arrow(info, metric)} (mean ± sd across {seed_key})", fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- write ----------------------------------------------------------------------------------


def stage_table_md(run: dict, info=None) -> str:
    """Each stage's final metrics (summary.json's `stages`): one row per metric, a column per
    stage; with `info` (engram_core.run.metric_info) a column of ↑/↓ and "(worse)" after a value
    that moved against its direction since the previous stage."""
    from ..run.metric_info import got_worse

    spans = {s["name"]: s for s in run["stages"]}
    results = run["summary"].get("stages") or {}
    names = list(dict.fromkeys([*spans, *results]))
    md = ["| stage | kind | global steps | evaluated |", "|---|---|---|---|"]
    for name in names:
        s = spans.get(name, {})
        steps = f"{s['start']}–{s['end']}" if s.get("kind") == "train" else (str(s["end"]) if s else "-")
        md.append(f"| {name} | {s.get('kind', '?')} | {steps} | {'yes' if results.get(name) else 'no'} |")
    evaluated = [n for n in names if results.get(n)]
    if evaluated:
        tags = list(dict.fromkeys(t for n in evaluated for t in results[n]))
        md += ["", "| metric | better | " + " | ".join(evaluated) + " |", "|" + "---|" * (len(evaluated) + 2)]
        for t in tags:
            ti = info.of(t) if info is not None else None
            cells = []
            for i, n in enumerate(evaluated):
                cell = fmt(results[n].get(t))
                if ti is not None and i and got_worse(ti, results[evaluated[i - 1]].get(t), results[n].get(t)):
                    cell += " (worse)"
                cells.append(cell)
            md.append(f"| {t} | {ti.arrow if ti is not None else ''} | " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"


def run_report_md(run: dict, figure: str | None, stages_figure: str | None = None,
                  images: list[tuple[str, str]] | None = None, info=None) -> str:
    s, env = run["summary"], run["env"]
    lines = [f"# Run report: {run['name']}", ""]
    facts = [
        ("directory", f"`{run['dir']}`"),
        ("status", s.get("status", "?")),
        ("steps", s.get("steps", "?")),
        ("wall time", f"{s['wall_time_s']:.1f} s" if "wall_time_s" in s else "?"),
        ("device", env.get("device_name") or s.get("device", "?")),
        ("seed", run["recipe"].get("run", {}).get("seed", "?")),
        ("engram-core / torch", f"{env.get('engram_core', '?')} / {env.get('torch', '?')}"),
        ("git commit", env.get("git_commit") or "?"),
    ]
    lines += [f"- {k}: {v}" for k, v in facts]
    lines += ["", "## Learning curves", ""]
    lines += [f"![learning curves per stage]({figure})" if figure else "(no metric changed during a stage)", ""]
    if stages_figure:
        lines += ["## Evaluation stages", "", f"![evaluation stages side by side]({stages_figure})", ""]
    for tag, image in images or []:
        lines += [f"## {tag} (TensorBoard image)", "", f"![{tag}]({image})", ""]
    lines += ["## Stages", "", stage_table_md(run, info)]
    return "\n".join(lines)


def sweep_report_md(sweep: dict, figure: str | None, seed_key: str = SEED_KEY) -> str:
    from ..sweep import sweep_tables

    statuses: dict[str, int] = {}
    for s in sweep["summaries"]:
        statuses[s.get("status", "?")] = statuses.get(s.get("status", "?"), 0) + 1
    lines = [f"# Sweep report: {sweep['name']}", ""]
    lines += [f"- directory: `{sweep['dir']}`", f"- points: {len(sweep['plan'])} ({', '.join(f'{v} {k}' for k, v in statuses.items())})"]
    lines += [f"- swept: {', '.join(f'`{k}`' for k in sweep['keys'])}", ""]
    lines += ["## Final metrics per configuration", ""]
    lines += [f"![final metrics per configuration]({figure})" if figure else "(no completed point)", ""]
    _, md = sweep_tables(sweep["dir"], sweep["plan"])
    lines += ["## Sweep table", "", md]
    return "\n".join(lines)


def write_report(target: str | Path, out: str | Path | None = None, lines: tuple[str, list[str], str] | None = None) -> Path:
    """Report a run or sweep directory into `out` (default `<target>/report/`): report.md
    and its PNG figures. Returns the path of report.md. `lines` = (x, series keys, metric)
    adds, for a sweep, the metric against swept key x with one line per series."""
    target = Path(target)
    if not target.is_dir():
        raise ReportError(f"no such directory: {target}")
    if not (is_sweep_dir(target) or is_run_dir(target)):
        raise ReportError(f"{target} is neither a run directory (summary.json, metrics.jsonl) nor a sweep directory (sweep.json)")
    out = Path(out) if out is not None else target / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    if is_sweep_dir(target):
        sweep = load_sweep(target)
        fig = plot_sweep(sweep, out / "sweep.png")
        text = sweep_report_md(sweep, fig.name if fig else None)
        if lines is not None:
            x, series, metric = lines
            lfig = plot_sweep_lines(sweep, out / "lines.png", x, series, metric)
            text += f"\n## {metric} against {x}\n\n" + (f"![{metric} against {x}]({lfig.name})\n" if lfig else "(no completed point has it)\n")
    else:
        from ..run.metric_info import for_run

        run = load_run(target)
        info = for_run(target)
        fig = plot_curves(run, out / "curves.png", info=info)
        stages_fig = plot_stage_comparison(run, out / "stages.png", info)
        images = [(tag, p.name) for tag, p in save_images(target, out)]
        text = run_report_md(run, fig.name if fig else None, stages_fig.name if stages_fig else None, images, info)
    from ..run.rundir import atomic_write_text

    atomic_write_text(out / "report.md", text)
    return out / "report.md"


__all__ = [
    "ReportError", "load_run", "load_sweep", "load_records", "load_scalars", "stage_spans",
    "final_metrics", "config_groups", "aggregate_seeds", "seed_table", "seed_table_md",
    "curve_series", "curve_panels", "plot_curves", "plot_stage_comparison", "load_images", "save_images", "plot_sweep", "plot_sweep_lines", "line_series", "draw_lines", "stage_table_md", "write_report",
]
