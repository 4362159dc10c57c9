"""Running a recipe (one run or a sweep grid) and resuming either from its directory."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from rich.console import Console

from .engine import Engine
from .errors import EngramError, NonFiniteLossError, RecipeError
from .recipe import Recipe, load_recipe, point_recipe, sweep_points, value_label
from .rundir import atomic_write_json, atomic_write_text, new_run_dir

SWEEP_FILE = "sweep.json"


def run_recipe(recipe: Recipe, console: Console, quiet: bool = False) -> int:
    if recipe.sweep:
        return run_sweep(recipe, console, quiet)
    run_dir = new_run_dir(recipe.run.out_dir, recipe.name, create=False)  # made once the build succeeded
    return _run_one(recipe, run_dir, console, quiet, resume=False)


def _run_one(recipe: Recipe, run_dir: Path, console: Console, quiet: bool, resume: bool, hparams: dict | None = None, device: str | None = None) -> int:
    from .cli import print_summary

    engine = Engine(recipe, run_dir, console=console, show_progress=not quiet, hparams=hparams, device=device)
    engine.build()
    run_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]{recipe.name}[/] → {run_dir}  (device {engine.device})")
    try:
        summary = engine.run(resume=resume)
    except NonFiniteLossError:
        print_summary(console, engine.summary(), run_dir)
        raise
    except KeyboardInterrupt:
        console.print(f"\ninterrupted; resume with: engram-run --resume {run_dir}")
        raise
    print_summary(console, summary, run_dir)
    return 0


def run_sweep(recipe: Recipe, console: Console, quiet: bool) -> int:
    points = sweep_points(recipe)
    resolved = [(label, point, point_recipe(recipe, point)) for label, point in points]  # all valid first
    sweep_dir = new_run_dir(recipe.run.out_dir, recipe.name, suffix="-sweep")
    atomic_write_text(sweep_dir / "recipe.toml", recipe.to_toml(include_sweep=True))
    plan = [{"index": i, "label": label, "point": point, "dir": f"{i:03d}"} for i, (label, point, _) in enumerate(resolved)]
    atomic_write_json(sweep_dir / SWEEP_FILE, {"name": recipe.name, "points": plan})
    return _sweep_loop(recipe, sweep_dir, plan, console, quiet, device=None)


def _sweep_loop(recipe: Recipe, sweep_dir: Path, plan: list[dict], console: Console, quiet: bool, device: str | None) -> int:
    failures = 0
    for entry in plan:
        point_dir = sweep_dir / entry["dir"]
        summary_path = point_dir / "summary.json"
        if summary_path.exists() and json.loads(summary_path.read_text()).get("status") == "completed":
            continue
        resume = (point_dir / "checkpoints" / "last.pt").exists()
        point_dir.mkdir(exist_ok=True)
        sub = point_recipe(recipe, entry["point"])
        console.rule(f"sweep point {entry['index'] + 1}/{len(plan)}: {entry['label']}")
        hp = {k: value_label(v) if isinstance(v, dict) else v for k, v in entry["point"].items()}
        try:
            _run_one(sub, point_dir, console, quiet, resume=resume, hparams=hp, device=device)
        except NonFiniteLossError as exc:
            console.print(f"[red]point {entry['label']}: {exc}[/]")
            failures += 1
        write_sweep_tables(sweep_dir, plan)
    table = write_sweep_tables(sweep_dir, plan)
    console.print(table, markup=False)
    console.print(f"sweep directory: {sweep_dir}")
    console.print(f"review it:       tensorboard --logdir {sweep_dir}")
    return 1 if failures else 0


def write_sweep_tables(sweep_dir: Path, plan: list[dict]) -> str:
    """sweep.csv and sweep.md: one row per point, swept values then final metrics."""
    rows = []
    metric_cols: list[str] = []
    for entry in plan:
        sp = sweep_dir / entry["dir"] / "summary.json"
        summary = json.loads(sp.read_text()) if sp.exists() else {"status": "not run", "final": {}}
        values = _columns(summary)
        for k in values:
            if k not in metric_cols:
                metric_cols.append(k)
        rows.append((entry, values | {"status": summary.get("status", "?")}))
    keys = list(plan[0]["point"]) if plan else []
    header = ["point", *keys, "status", *metric_cols]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry, values in rows:
        vals = [entry["dir"], *[value_label(entry["point"][k]) for k in keys], values["status"]]
        mvals = [values.get(c) for c in metric_cols]
        w.writerow(vals + ["" if v is None else v for v in mvals])
        md.append("| " + " | ".join(vals + ["-" if v is None else f"{v:.4g}" for v in mvals]) + " |")
    atomic_write_text(sweep_dir / "sweep.csv", buf.getvalue())
    text = "\n".join(md) + "\n"
    atomic_write_text(sweep_dir / "sweep.md", text)
    return text


def _columns(summary: dict) -> dict[str, float]:
    """Final metrics, then every earlier stage's as `<stage>:<tag>` (pre vs post in one row)."""
    out = dict(summary.get("final", {}))
    stages = {k: v for k, v in summary.get("stages", {}).items() if v}
    last = list(stages)[-1] if stages else None
    for name, res in stages.items():
        if name != last:
            out.update({f"{name}:{tag}": v for tag, v in res.items()})
    return out


def resume_any(run_dir: Path, console: Console, device: str | None = None, quiet: bool = False) -> int:
    if not run_dir.is_dir():
        raise RecipeError([("", f"--resume: no such run directory: {run_dir}")])
    recipe_file = run_dir / "recipe.toml"
    if not recipe_file.exists():
        raise RecipeError([("", f"--resume: {run_dir} has no recipe.toml (is it a run directory?)")])
    if (run_dir / SWEEP_FILE).exists():
        recipe = load_recipe(recipe_file)
        plan = json.loads((run_dir / SWEEP_FILE).read_text())["points"]
        return _sweep_loop(recipe, run_dir, plan, console, quiet, device)
    summary = run_dir / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("status") == "completed":
        from .cli import print_summary

        console.print(f"{run_dir} already completed")
        print_summary(console, json.loads(summary.read_text()), run_dir)
        return 0
    recipe = load_recipe(recipe_file)
    return _run_one(recipe, run_dir, console, quiet, resume=True, device=device)


__all__ = ["run_recipe", "resume_any", "EngramError"]
