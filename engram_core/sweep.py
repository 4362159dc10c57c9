"""Running a recipe (one run or a sweep grid) and resuming either from its directory."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from rich.console import Console

from . import distributed
from .engine import Engine
from .errors import EngramError, NonFiniteLossError, RecipeError
from .recipe import Recipe, load_recipe, point_recipe, sweep_points, value_label
from .report import SEED_KEY, aggregate_seeds, config_groups, final_metrics, seed_table_md
from .resume import check_resumable, resume_recipe
from .rundir import atomic_write_json, atomic_write_text, new_run_dir

SWEEP_FILE = "sweep.json"


def run_recipe(recipe: Recipe, console: Console, quiet: bool = False) -> int:
    if recipe.sweep:
        return run_sweep(recipe, console, quiet)
    dist = distributed.current()
    run_dir = new_run_dir(recipe.run.out_dir, recipe.name, create=False)  # made once the build succeeded
    run_dir = dist.broadcast_object(run_dir)  # one run directory, rank 0's name, for all ranks
    return _run_one(recipe, run_dir, console, quiet, resume=False)


def _run_one(recipe: Recipe, run_dir: Path, console: Console, quiet: bool, resume: bool, hparams: dict | None = None, device: str | None = None) -> int:
    from .cli import print_summary

    engine = Engine(recipe, run_dir, console=console, show_progress=not quiet, hparams=hparams, device=device)
    engine.build()
    if engine.dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    engine.dist.barrier()
    console.print(f"[bold]{recipe.name}[/] → {run_dir}  (device {engine.device})", soft_wrap=True)
    try:
        summary = engine.run(resume=resume)
    except NonFiniteLossError:
        print_summary(console, engine.summary(), run_dir)
        raise
    except KeyboardInterrupt:
        from .cli import runnable

        console.print("\ninterrupted; resume with:", markup=False)
        console.print(f"{runnable('engram-run')} --resume {run_dir}", markup=False, highlight=False, soft_wrap=True)
        raise
    print_summary(console, summary, run_dir)
    return 0


def run_sweep(recipe: Recipe, console: Console, quiet: bool) -> int:
    points = sweep_points(recipe)
    resolved = [(label, point, point_recipe(recipe, point)) for label, point in points]  # all valid first
    dist = distributed.current()
    sweep_dir = new_run_dir(recipe.run.out_dir, recipe.name, suffix="-sweep", create=dist.is_main)
    sweep_dir = dist.broadcast_object(sweep_dir)
    plan = [{"index": i, "label": label, "point": point, "dir": f"{i:03d}"} for i, (label, point, _) in enumerate(resolved)]
    if dist.is_main:
        atomic_write_text(sweep_dir / "recipe.toml", recipe.to_toml(include_sweep=True))
        atomic_write_json(sweep_dir / SWEEP_FILE, {"name": recipe.name, "points": plan})
    dist.barrier()
    return _sweep_loop(recipe, sweep_dir, plan, console, quiet, device=None)


def _sweep_loop(recipe: Recipe, sweep_dir: Path, plan: list[dict], console: Console, quiet: bool, device: str | None) -> int:
    failures = 0
    dist = distributed.current()
    for entry in plan:
        point_dir = sweep_dir / entry["dir"]
        summary_path = point_dir / "summary.json"
        done = summary_path.exists() and json.loads(summary_path.read_text()).get("status") == "completed"
        resume = (point_dir / "checkpoints" / "last.pt").exists()
        done, resume = dist.broadcast_object((done, resume))  # every rank takes rank 0's view
        if done:
            continue
        if dist.is_main:
            point_dir.mkdir(exist_ok=True)
        sub = point_recipe(recipe, entry["point"])
        console.rule(f"sweep point {entry['index'] + 1}/{len(plan)}: {entry['label']}")
        hp = {k: value_label(v) if isinstance(v, dict) else v for k, v in entry["point"].items()}
        try:
            _run_one(sub, point_dir, console, quiet, resume=resume, hparams=hp, device=device)
        except KeyboardInterrupt:
            write_sweep_tables(sweep_dir, plan)
            raise
        except Exception as exc:  # one point failing does not stop the others; its row says so
            line = str(exc).splitlines()[0] if isinstance(exc, EngramError) else f"{type(exc).__name__}: {exc}"
            console.print(f"point {entry['label']} failed: {line}", markup=False, soft_wrap=True)
            record_failed_point(point_dir, sub, hp, exc, line)
            failures += 1
        if dist.is_main:
            write_sweep_tables(sweep_dir, plan)
    dist.barrier()
    table = sweep_tables(sweep_dir, plan)[1]
    if dist.is_main:
        write_sweep_tables(sweep_dir, plan)
    from .cli import print_markdown_tables, runnable

    print_markdown_tables(console, table)
    console.print(f"sweep directory: {sweep_dir}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"review it:       {runnable('tensorboard')} --logdir {sweep_dir}", markup=False, highlight=False, soft_wrap=True)
    if failures:
        console.print(f"{failures} of {len(plan)} points failed (status and error in sweep.csv)", markup=False)
    return 1 if failures else 0


def record_failed_point(point_dir: Path, recipe: Recipe, hparams: dict, exc: BaseException, line: str) -> None:
    """A point that failed before its engine wrote anything still leaves summary.json and hparams."""
    summary_path = point_dir / "summary.json"
    if summary_path.exists() and json.loads(summary_path.read_text()).get("status") not in (None, "running"):
        return  # the engine recorded the failure itself
    status = "nonfinite" if isinstance(exc, NonFiniteLossError) else "failed"
    atomic_write_json(summary_path, {"name": recipe.name, "status": status, "run_dir": str(point_dir), "steps": 0,
                                     "wall_time_s": 0.0, "device": None, "final": {}, "stages": {}, "error": line})
    from .tb import RunLogger

    logger = RunLogger(point_dir)
    logger.hparams(hparams, {})
    logger.close()


def write_sweep_tables(sweep_dir: Path, plan: list[dict]) -> str:
    """Write sweep.csv and sweep.md (see `sweep_tables`); returns the Markdown."""
    csv_text, md_text = sweep_tables(sweep_dir, plan)
    atomic_write_text(sweep_dir / "sweep.csv", csv_text)
    atomic_write_text(sweep_dir / "sweep.md", md_text)
    return md_text


def sweep_tables(sweep_dir: Path, plan: list[dict]) -> tuple[str, str]:
    """(sweep.csv, sweep.md) texts: one row per point, swept values then final metrics.

    When `run.seed` is swept, points that differ only in the seed are one configuration:
    sweep.md gets a second table, one row per configuration with each metric as
    `mean ± sd (n: values)`, and every CSV row gets its configuration's `<metric>_mean`,
    `<metric>_sd` and `<metric>_n` (the same `report.aggregate_seeds`).
    """
    summaries = []
    metric_cols: list[str] = []
    for entry in plan:
        sp = Path(sweep_dir) / entry["dir"] / "summary.json"
        summary = json.loads(sp.read_text()) if sp.exists() else {"status": "not run", "final": {}}
        summaries.append(summary)
        for k in final_metrics(summary):
            if k not in metric_cols:
                metric_cols.append(k)
    keys = list(plan[0]["point"]) if plan else []
    seeded = SEED_KEY in keys
    agg_of: dict[int, dict] = {}
    if seeded:
        for _, idx in config_groups(plan):
            agg = aggregate_seeds([summaries[i] for i in idx])
            agg_of.update({i: agg for i in idx})
    header = ["point", *keys, "status", *metric_cols, "error"]
    agg_header = [f"{m}_{s}" for m in metric_cols for s in ("mean", "sd", "n")] if seeded else []
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header + agg_header)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, (entry, summary) in enumerate(zip(plan, summaries)):
        values = final_metrics(summary)
        vals = [entry["dir"], *[value_label(entry["point"][k]) for k in keys], summary.get("status", "?")]
        mvals = [values.get(c) for c in metric_cols]
        extra = []
        for m in metric_cols if seeded else []:
            mean, sd, n, _ = agg_of[i].get(m, (None, None, 0, []))
            extra += ["" if mean is None else mean, "" if sd is None or math.isnan(sd) else sd, n]
        error = summary.get("error") or ""
        w.writerow(vals + ["" if v is None else v for v in mvals] + [error] + extra)
        md.append("| " + " | ".join(vals + ["-" if v is None else f"{v:.4g}" for v in mvals] + [error.replace("|", "\\|")]) + " |")
    text = "\n".join(md) + "\n"
    if seeded:
        text += f"\n## Across seeds\n\nPoints that differ only in `{SEED_KEY}` are one configuration: mean ± sd (sample, n-1) over its completed points, then n and the single values.\n\n"
        text += seed_table_md(plan, summaries)
    return buf.getvalue(), text


def resume_any(run_dir: Path, console: Console, device: str | None = None, quiet: bool = False, overrides: list[str] | None = None) -> int:
    if not run_dir.is_dir():
        raise RecipeError([("", f"--resume: no such run directory: {run_dir}")])
    recipe_file = run_dir / "recipe.toml"
    if not recipe_file.exists():
        raise RecipeError([("", f"--resume: {run_dir} has no recipe.toml (is it a run directory?)")])
    if (run_dir / SWEEP_FILE).exists():
        if overrides:
            raise RecipeError([("", f"--resume of a sweep takes no overrides; resume one point's directory with them "
                                    f"(engram-run --resume {run_dir}/000 {overrides[0]})")])
        recipe = load_recipe(recipe_file)
        plan = json.loads((run_dir / SWEEP_FILE).read_text())["points"]
        return _sweep_loop(recipe, run_dir, plan, console, quiet, device)
    summary = run_dir / "summary.json"
    check_resumable(run_dir, overrides or [])
    if summary.exists() and json.loads(summary.read_text()).get("status") == "completed":
        from .cli import print_summary

        if overrides:
            raise RecipeError([("", f"--resume: {run_dir} already completed; overrides apply to unfinished runs "
                                    "(start a new run with them instead)")])

        console.print(f"{run_dir} already completed")
        print_summary(console, json.loads(summary.read_text()), run_dir)
        return 0
    recipe = resume_recipe(run_dir, overrides or [])
    return _run_one(recipe, run_dir, console, quiet, resume=True, device=device)


__all__ = ["run_recipe", "resume_any", "EngramError"]
