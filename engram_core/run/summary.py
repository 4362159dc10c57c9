"""Reading a run's final metrics and a sweep's seeds back: what `engram-run` prints and writes in
sweep.md, and what the report and results tools build on."""

from __future__ import annotations

import json
import math

SEED_KEY = "run.seed"


# ---- aggregate ------------------------------------------------------------------------------


def final_metrics(summary: dict) -> dict[str, float]:
    """A summary's final metrics, then every earlier stage's as `<stage>:<tag>`.

    These are the metric columns of sweep.csv / sweep.md (pre vs post in one row).
    """
    out = dict(summary.get("final", {}))
    stages = {k: v for k, v in summary.get("stages", {}).items() if v}
    last = list(stages)[-1] if stages else None
    for name, res in stages.items():
        if name != last:
            out.update({f"{name}:{tag}": v for tag, v in res.items()})
    return out


def config_groups(plan: list[dict], seed_key: str = SEED_KEY) -> list[tuple[dict, list[int]]]:
    """Group sweep points that differ only in `seed_key`: [(configuration, [plan indices])].

    The configuration is the point without the seed key ({} when the seed is the only
    swept key); groups keep the order of their first point. Without the seed key among
    the swept keys every point is a group of one.
    """
    groups: dict[str, tuple[dict, list[int]]] = {}
    for i, entry in enumerate(plan):
        config = {k: v for k, v in entry["point"].items() if k != seed_key}
        key = json.dumps(config, sort_keys=True, default=str)
        groups.setdefault(key, (config, []))[1].append(i)
    return list(groups.values())


def aggregate_seeds(summaries: list[dict], completed_only: bool = True) -> dict[str, tuple[float, float, int, list[float]]]:
    """Mean, sample sd (n-1; NaN when n < 2), n and the single values of each metric.

    `summaries`: summary.json dicts (their `final_metrics` are used, so stage-prefixed
    columns aggregate too) or plain {metric: value} dicts. With `completed_only`, summaries
    whose status is not "completed" are left out (a dict without a status counts).
    Metrics are in order of first appearance; n may differ between metrics.
    """
    values: dict[str, list[float]] = {}
    for s in summaries:
        if "final" in s or "stages" in s or "status" in s:
            if completed_only and s.get("status", "completed") != "completed":
                continue
            metrics = final_metrics(s)
        else:
            metrics = s
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                values.setdefault(k, []).append(float(v))
    out = {}
    for k, vs in values.items():
        n = len(vs)
        mean = math.fsum(vs) / n
        sd = math.sqrt(math.fsum((v - mean) ** 2 for v in vs) / (n - 1)) if n > 1 else math.nan
        out[k] = (mean, sd, n, vs)
    return out


def fmt(v: float | None) -> str:
    """4 significant digits, '-' for a missing value (the sweep table's format)."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.4g}"


def fmt_agg(mean: float, sd: float, n: int, values: list[float]) -> str:
    """`mean ± sd (n=3: v1, v2, v3)`; `mean (n=1)` when there is one value."""
    singles = ", ".join(fmt(v) for v in values)
    if n < 2:
        return f"{fmt(mean)} (n={n})"
    return f"{fmt(mean)} ± {fmt(sd)} (n={n}: {singles})"


def seed_table(plan: list[dict], summaries: list[dict], seed_key: str = SEED_KEY) -> tuple[list[str], list[dict]]:
    """The across-seeds table: (metric names, rows); each row {"config", "points" (dirs),
    "seeds", "n" (completed points), "agg" (`aggregate_seeds` of the group)}."""
    from ..recipe import value_label

    rows, metrics = [], []
    for config, idx in config_groups(plan, seed_key):
        agg = aggregate_seeds([summaries[i] for i in idx])
        for m in agg:
            if m not in metrics:
                metrics.append(m)
        done = [i for i in idx if summaries[i].get("status") == "completed"]
        rows.append({
            "config": {k: value_label(v) for k, v in config.items()},
            "points": [plan[i]["dir"] for i in idx],
            "seeds": [value_label(plan[i]["point"].get(seed_key, "recipe")) for i in idx],  # "recipe": the recipe's run.seed
            "n": len(done),
            "agg": agg,
        })
    return metrics, rows


def seed_table_md(plan: list[dict], summaries: list[dict], seed_key: str = SEED_KEY) -> str:
    """Markdown of `seed_table`: one row per configuration, each metric `mean ± sd (n: values)`."""
    metrics, rows = seed_table(plan, summaries, seed_key)
    keys = [k for k in (plan[0]["point"] if plan else {}) if k != seed_key]
    header = [*keys, "points", seed_key, "n", *metrics]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["config"][k] for k in keys] + [", ".join(r["points"]), ", ".join(r["seeds"]), str(r["n"])]
        cells += [fmt_agg(*r["agg"][m]) if m in r["agg"] else "-" for m in metrics]
        md.append("| " + " | ".join(cells) + " |")
    return "\n".join(md) + "\n"
