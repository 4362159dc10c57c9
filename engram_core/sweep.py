"""Running a recipe (one run or a sweep grid) and resuming either from its directory."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from .errors import EngramError, NonFiniteLossError, RecipeError
from .recipe import Recipe, load_recipe, point_recipe, sweep_points, then_points, value_label
from .run import distributed, threads
from .run.rundir import (
    atomic_write_json,
    atomic_write_text,
    check_resumable_dir,
    make_run_dir,
    new_run_dir,
    read_json,
    read_summary,
    remove_stale_temporaries,
)
from .run.summary import SEED_KEY, aggregate_seeds, config_groups, final_metrics, seed_table_md
from .train.checkpoint import check_checkpoint_fits, check_resumable, resume_recipe
from .train.engine import Engine

SWEEP_FILE = "sweep.json"


def run_recipe(recipe: Recipe, console: Console, quiet: bool = False, jobs: int = 1) -> int:
    _check_run_device(recipe)
    if recipe.sweep:
        return run_sweep(recipe, console, quiet, jobs)
    _note_jobs_unused(jobs)
    dist = distributed.current()
    try:  # the name and --out are checked now; the directory is made once the build succeeded
        run_dir = new_run_dir(recipe.run.out_dir, recipe.name, create=False)
    except RecipeError as exc:
        raise exc.with_file(recipe.file) from None
    run_dir = dist.broadcast_object(run_dir)  # one run directory, rank 0's name, for all ranks
    return _run_one(recipe, run_dir, console, quiet, resume=False)


def _note_jobs_unused(jobs: int) -> None:
    if jobs > 1 and distributed.current().is_main:  # a launcher may pass --jobs to every recipe: a note, not an error
        print(f"note: --jobs {jobs} runs the points of a sweep at once; this is one run, so it runs alone", file=sys.stderr)


def _check_run_device(recipe: Recipe, device: str | None = None) -> None:
    """The device check `engram validate` makes (mps on a machine without it, cuda:N past the last)."""
    from .train.validate import check_device

    problems = check_device(device or recipe.run.device)
    if problems:
        raise RecipeError(problems, recipe.file)


def _run_one(recipe: Recipe, run_dir: Path, console: Console, quiet: bool, resume: bool, hparams: dict | None = None,
             device: str | None = None, resumed_recipe_text: str | None = None) -> int:
    with threads.shared(recipe.run.threads):  # from before the build: generating data uses the threads too
        return _run_engine(recipe, run_dir, console, quiet, resume, hparams, device, resumed_recipe_text)


def _run_engine(recipe: Recipe, run_dir: Path, console: Console, quiet: bool, resume: bool, hparams: dict | None, device: str | None,
                resumed_recipe_text: str | None) -> int:
    """Build, then make (or reuse) the run directory and run. On resume nothing in the
    directory changes until the engine has built and the checkpoint fits what it built;
    `resumed_recipe_text` (recipe.toml with the overrides) is written only then."""
    from .run.console import print_summary

    _check_run_device(recipe, device)
    engine = Engine(recipe, run_dir, console=console, show_progress=not quiet, hparams=hparams, device=device)
    engine.build()
    if resume:
        check_checkpoint_fits(run_dir, engine, recipe)
    if engine.dist.is_main:
        try:
            make_run_dir(run_dir)
        except RecipeError as exc:
            raise exc.with_file(recipe.file) from None
        remove_stale_temporaries(run_dir)  # what a killed run of this directory left behind
        if resumed_recipe_text is not None:
            atomic_write_text(run_dir / "recipe.toml", resumed_recipe_text)
    engine.dist.barrier()
    console.print(f"[bold]{recipe.name}[/] → {run_dir}  (device {engine.device})", soft_wrap=True)
    try:
        summary = engine.run(resume=resume)
    except NonFiniteLossError:
        print_summary(console, engine.summary(), run_dir)
        raise
    except KeyboardInterrupt:
        from .run.commands import runnable

        console.print("\ninterrupted; resume with:", markup=False)
        console.print(f"{runnable('engram-run')} --resume {run_dir}", markup=False, highlight=False, soft_wrap=True)
        raise
    print_summary(console, summary, run_dir)
    _warn_nonfinite(summary, run_dir)
    return 0


def _warn_nonfinite(summary: dict, run_dir: Path) -> None:
    """A finished run whose final metrics hold NaN or inf says so (summary.json has null there)."""
    bad = [k for k, v in (summary.get("final") or {}).items() if isinstance(v, float) and not math.isfinite(v)]
    if bad and distributed.current().is_main:
        print(f"warning: {run_dir}: final {', '.join(bad[:4])} {'is' if len(bad) == 1 else 'are'} not finite "
              f"({summary['final'][bad[0]]}; null in summary.json): the model's outputs or the eval data hold NaN/inf",
              file=sys.stderr)


def run_sweep(recipe: Recipe, console: Console, quiet: bool, jobs: int = 1) -> int:
    points = sweep_points(recipe)
    resolved = [(label, point, point_recipe(recipe, point)) for label, point in points]  # all valid first
    dist = distributed.current()
    try:
        sweep_dir = new_run_dir(recipe.run.out_dir, recipe.name, suffix="-sweep", create=dist.is_main)
    except RecipeError as exc:
        raise exc.with_file(recipe.file) from None
    sweep_dir = dist.broadcast_object(sweep_dir)
    plan = [{"index": i, "label": label, "point": point, "dir": f"{i:03d}"} for i, (label, point, _) in enumerate(resolved)]
    if dist.is_main:
        atomic_write_text(sweep_dir / "recipe.toml", recipe.to_toml(include_sweep=True))
        atomic_write_json(sweep_dir / SWEEP_FILE, {"name": recipe.name, "points": plan})
    dist.barrier()
    return _sweep_loop(recipe, sweep_dir, plan, console, quiet, device=None, jobs=jobs)


def _sweep_loop(recipe: Recipe, sweep_dir: Path, plan: list[dict], console: Console, quiet: bool, device: str | None, jobs: int = 1) -> int:
    dist = distributed.current()
    failures = _run_plan(recipe, sweep_dir, plan, console, quiet, device, jobs)
    unselected = False  # a failure of the sweep, not of a point: _select said it in its own line
    if recipe.select is not None and not any(e.get("selected") for e in plan):
        chosen = _select(recipe, sweep_dir, plan, console)  # on rank 0, then every rank's
        if chosen is None:
            unselected = True
        elif chosen:
            plan.extend(chosen)
            if dist.is_main:
                atomic_write_json(sweep_dir / SWEEP_FILE, {"name": recipe.name, "points": plan})
            dist.barrier()
            failures += _run_plan(recipe, sweep_dir, plan, console, quiet, device, jobs)
    dist.barrier()
    table = sweep_tables(sweep_dir, plan)[1]
    if dist.is_main:
        write_sweep_tables(sweep_dir, plan)
    from .run.commands import runnable
    from .run.console import print_markdown_tables

    print_markdown_tables(console, table)
    console.print(f"sweep directory: {sweep_dir}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"review it:       {runnable('tensorboard')} --logdir {sweep_dir}", markup=False, highlight=False, soft_wrap=True)
    if failures:
        console.print(f"{failures} of {len(plan)} points failed (status and error in sweep.csv)", markup=False)
    return 1 if failures or unselected else 0


def _run_plan(recipe: Recipe, sweep_dir: Path, plan: list[dict], console: Console, quiet: bool, device: str | None, jobs: int) -> int:
    """Run every point of `plan` not done yet (one at a time, or `jobs` at once); the number that failed."""
    dist = distributed.current()
    if jobs > 1 and not dist.enabled:
        return _run_points_at_once(recipe, sweep_dir, plan, console, device, jobs)
    failures = 0
    for entry in plan:
        try:
            failures += _run_point(recipe, sweep_dir, entry, len(plan), console, quiet, device) == "failed"
        except KeyboardInterrupt:
            write_sweep_tables(sweep_dir, plan)
            raise
        if dist.is_main:
            write_sweep_tables(sweep_dir, plan)
    return failures


SELECTION_FILE = "selection.json"


def _select(recipe: Recipe, sweep_dir: Path, plan: list[dict], console: Console) -> list[dict] | None:
    """`[select]`: the grid point with the best `metric` (completed points only; the first of a
    tie), recorded in selection.json; returns the entries of its `then` runs ([] when `then`
    asks for none), or None when no completed point has the metric (said in one line)."""
    sel = recipe.select
    dist = distributed.current()
    values = {}
    for entry in plan:
        summary = read_summary(sweep_dir / entry["dir"] / "summary.json") or {}
        v = final_metrics(summary).get(sel.metric) if summary.get("status") == "completed" else None
        values[entry["label"]] = v if isinstance(v, (int, float)) and math.isfinite(v) else None
    scored = [(v, i) for i, v in enumerate(values.values()) if v is not None]
    if not scored:
        console.print(f"select: no completed point has the metric {sel.metric!r} (see sweep.md for the metrics each point has)",
                      markup=False, soft_wrap=True)
        return None
    best = max(scored, key=lambda t: (t[0] if sel.mode == "max" else -t[0], -t[1]))[1]
    chosen = plan[best]
    same = point_recipe(recipe, chosen["point"]).to_toml(include_sweep=False)
    entries = []
    for label, point in then_points(recipe, chosen["point"]):
        if point_recipe(recipe, point).to_toml(include_sweep=False) == same:
            continue  # the chosen grid point itself (e.g. the seed it ran with): already run
        index = len(plan) + len(entries)
        entries.append({"index": index, "label": label, "point": point, "dir": f"{index:03d}", "selected": True})
    record = {"metric": sel.metric, "mode": sel.mode, "values": values,
              "chosen": {"label": chosen["label"], "point": chosen["point"], "dir": chosen["dir"], "value": values[chosen["label"]]},
              "then": [e["label"] for e in entries]}
    if dist.is_main:
        atomic_write_json(sweep_dir / SELECTION_FILE, record)
    console.print(f"select: {chosen['label']} has the {'highest' if sel.mode == 'max' else 'lowest'} {sel.metric} "
                  f"({values[chosen['label']]:.4g} of {len(scored)} completed points)"
                  + (f"; running it again: {', '.join(e['label'] for e in entries)}" if entries else ""), markup=False, soft_wrap=True)
    return entries


def point_done(point_dir: Path) -> bool:
    return (read_summary(point_dir / "summary.json") or {}).get("status") == "completed"  # a damaged summary: not done


def _run_point(recipe: Recipe, sweep_dir: Path, entry: dict, n_points: int, console: Console, quiet: bool, device: str | None) -> str:
    """One point of a sweep into `sweep_dir/<dir>` (resumed from its checkpoint if it has one):
    "done" (it had finished before), "completed" or "failed" (its row says why); Ctrl-C goes up."""
    dist = distributed.current()
    point_dir = sweep_dir / entry["dir"]
    done = point_done(point_dir)
    resume = (point_dir / "checkpoints" / "last.pt").exists()
    done, resume = dist.broadcast_object((done, resume))  # every rank takes rank 0's view
    if done:
        return "done"
    if dist.is_main:
        point_dir.mkdir(exist_ok=True)
    sub = point_recipe(recipe, entry["point"])
    console.rule(f"sweep point {entry['index'] + 1}/{n_points}: {entry['label']}")
    hp = _point_hparams(entry)
    try:
        _run_one(sub, point_dir, console, quiet, resume=resume, hparams=hp, device=device)
    except Exception as exc:  # one point failing does not stop the others; its row says so
        line = str(exc).splitlines()[0] if isinstance(exc, EngramError) else f"{type(exc).__name__}: {exc}"
        console.print(_failed_line(entry["label"], line), markup=False, soft_wrap=True)
        record_failed_point(point_dir, sub, hp, exc, line)
        return "failed"
    return "completed"


def _point_hparams(entry: dict) -> dict:
    return {k: value_label(v) if isinstance(v, dict) else v for k, v in entry["point"].items()}


def _failed_line(label: str, line: str) -> str:
    return f"point {label} failed: {line}"


# ---- several points at once (`engram-run --jobs N`) ---------------------------------------------

POINT_FLAG = "--sweep-point"  # `python -m engram_core.run --sweep-point SWEEP_DIR INDEX`: one point, internal
STOP_GRACE_S = 30.0  # after Ctrl-C, how long interrupted points get to write their summary before SIGKILL


def point_command(sweep_dir: Path, index: int, device: str | None, recipe_file: str) -> list[str]:
    """The point's process. It is given the recipe's file and this command line too, so its
    errors name the file the user wrote and its env.json the command the user typed, as a
    point of a sequential sweep does."""
    return [sys.executable, "-m", "engram_core.run", POINT_FLAG, str(sweep_dir), str(index),
            *(["--device", device] if device else []), "--file", recipe_file, "--argv", json.dumps(sys.argv)]


def point_main(argv: list[str]) -> int:
    """The process of one point of `engram-run --jobs N`: the sweep directory's recipe and plan,
    the point run as the sequential loop runs it (same directory, hparams, failure record);
    exit 0 completed (or done before), 1 failed (recorded), 2 bad input, 130 interrupted."""
    import argparse

    from .run.console import fail

    p = argparse.ArgumentParser(prog=f"python -m engram_core.run {POINT_FLAG}")
    p.add_argument("sweep_dir")
    p.add_argument("index", type=int)
    p.add_argument("--device")
    p.add_argument("--file", help="the recipe file the sweep was started from (what errors name)")
    p.add_argument("--argv", help="the launching command line, as JSON (what env.json records)")
    args = p.parse_args(argv)
    # SIGINT is how the sweep stops its points (_interrupt): a sweep started as a background
    # job, whose children inherit SIGINT ignored, must still be able to stop them
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.argv:
        sys.argv = json.loads(args.argv)
    sweep_dir = Path(args.sweep_dir)
    console = Console(highlight=False)
    try:
        recipe = load_recipe(sweep_dir / "recipe.toml")
        recipe.file = args.file or recipe.file
        plan = json.loads((sweep_dir / SWEEP_FILE).read_text())["points"]
        status = _run_point(recipe, sweep_dir, plan[args.index], len(plan), console, True, args.device)
    except EngramError as exc:
        return fail(exc)
    except KeyboardInterrupt:
        return 130
    finally:
        distributed.teardown()
    return 1 if status == "failed" else 0


def _run_points_at_once(recipe: Recipe, sweep_dir: Path, plan: list[dict], console: Console, device: str | None, jobs: int) -> int:
    """Run the unfinished points `jobs` at a time, each in its own process with its share of the
    CPU threads; one line per point as it ends; the tables rewritten after each. Returns the
    number of failed points. Ctrl-C (or SIGTERM / SIGHUP) interrupts every running point."""
    queue = [e for e in plan if not point_done(sweep_dir / e["dir"])]
    at_once, total = max(1, min(jobs, len(queue))), len(queue)
    env = threads.child_env(at_once)  # the threads are shared between the points that run together
    console.print(f"{total} of {len(plan)} points to run, {at_once} at a time ({_threads_note(recipe, env)})", markup=False)
    running: dict[subprocess.Popen, tuple[dict, Any, float]] = {}
    failures = finished = 0
    with _signals_interrupt():
        try:
            while queue or running:
                while queue and len(running) < at_once:
                    entry = queue.pop(0)
                    log = tempfile.TemporaryFile()  # the point's console output, shown only if it crashed
                    proc = subprocess.Popen(point_command(sweep_dir, entry["index"], device, str(recipe.file)), env=env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **_own_process_group())
                    running[proc] = (entry, log, time.monotonic())
                time.sleep(0.05)
                for proc in [p for p in running if p.poll() is not None]:
                    entry, log, t0 = running.pop(proc)
                    finished += 1
                    ok = _report_point(recipe, sweep_dir, entry, proc.returncode, _read_log(log), time.monotonic() - t0,
                                       f"{finished}/{total}", console)
                    failures += not ok
                    write_sweep_tables(sweep_dir, plan)
        except KeyboardInterrupt:
            _interrupt(running)
            write_sweep_tables(sweep_dir, plan)
            console.print("\ninterrupted; resume with:", markup=False)
            console.print(f"engram-run --resume {sweep_dir} --jobs {jobs}", markup=False, highlight=False, soft_wrap=True)
            raise
    return failures


def _threads_note(recipe: Recipe, env: dict[str, str]) -> str:
    if recipe.run.threads > 0:
        return f"run.threads = {recipe.run.threads} each"
    if env.get(threads.AUTO_ENV) != "1":
        return f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} each, as set"
    n = int(env["OMP_NUM_THREADS"])
    return f"{n} CPU thread{'s' if n != 1 else ''} each"


def _report_point(recipe: Recipe, sweep_dir: Path, entry: dict, returncode: int, output: str, seconds: float, count: str, console: Console) -> bool:
    """The line of a point that ended (a failure as the sequential loop words it); a process that
    died without recording its failure gets its row written here. True when it completed."""
    point_dir = sweep_dir / entry["dir"]
    if returncode == 0:
        console.print(f"point {entry['label']} completed in {seconds:.0f} s ({count} ended)", markup=False, soft_wrap=True)
        return True
    prefix = _failed_line(entry["label"], "")
    said = [line for line in output.splitlines() if line.startswith(prefix)]
    if said:  # the point recorded its failure and printed the sequential loop's line
        console.print(said[-1], markup=False, soft_wrap=True)
        return False
    errors = [line[len("error: "):] for line in output.splitlines() if line.startswith("error: ")]
    how = f"was killed by {signal.Signals(-returncode).name}" if returncode < 0 else f"exited with status {returncode}"
    line = errors[-1] if errors else f"its process {how}"
    console.print(f"{prefix}{line}", markup=False, soft_wrap=True)
    if not errors:  # a crash: its last words, since nothing else kept them
        tail = output.rstrip().splitlines()[-10:]
        console.print("\n".join(f"  | {t}" for t in tail), markup=False, highlight=False, soft_wrap=True)
    point_dir.mkdir(exist_ok=True)
    record_failed_point(point_dir, point_recipe(recipe, entry["point"]), _point_hparams(entry), RuntimeError(line), line)
    return False


def _read_log(log) -> str:
    log.seek(0)
    text = log.read().decode("utf-8", errors="replace")
    log.close()
    return text


def _own_process_group() -> dict:
    """Points run in their own process group: Ctrl-C reaches only the sweep, which passes one
    SIGINT to each point (a second one could cut short the summary it writes on the first)."""
    return {"process_group": 0} if os.name == "posix" else {}


def _interrupt(running: dict) -> None:
    """SIGINT to every running point, which finishes its step, checkpoints it and records
    `interrupted` (engram_core.train.stopping); halfway through STOP_GRACE_S a second SIGINT to
    those still running (in a long step: compiling, evaluating), which stops them at once;
    SIGKILL what is still there at the end."""
    try:
        for _ in range(2):
            for proc in running:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + STOP_GRACE_S / 2
            for proc in running:
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
    except KeyboardInterrupt:  # a second Ctrl-C: stop waiting
        pass
    finally:
        for proc, (_, log, _) in running.items():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


class _signals_interrupt:
    """SIGTERM and SIGHUP end the sweep as Ctrl-C does (children interrupted, tables written),
    where this is the main thread (only it may set handlers)."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))

    def __enter__(self):
        self.saved = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.saved[sig] = signal.signal(sig, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        return False


def record_failed_point(point_dir: Path, recipe: Recipe, hparams: dict, exc: BaseException, line: str) -> None:
    """A point that failed before its engine wrote anything still leaves summary.json and hparams."""
    summary_path = point_dir / "summary.json"
    if (read_summary(summary_path) or {}).get("status") not in (None, "running"):
        return  # the engine recorded the failure itself
    make_run_dir(point_dir)
    status = "nonfinite" if isinstance(exc, NonFiniteLossError) else "failed"
    atomic_write_json(summary_path, {"name": recipe.name, "status": status, "run_dir": str(point_dir), "steps": 0,
                                     "wall_time_s": 0.0, "device": None, "final": {}, "stages": {}, "error": line})
    from .run.tb import RunLogger

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
        summary = read_summary(sp) or {"status": "damaged summary.json" if sp.exists() else "not run", "final": {}}
        summaries.append(summary)
        for k in final_metrics(summary):
            if k not in metric_cols:
                metric_cols.append(k)
    keys = list(dict.fromkeys(k for entry in plan for k in entry["point"]))  # [select] then-runs may add keys
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
        vals = [entry["dir"], *[value_label(entry["point"][k]) if k in entry["point"] else "-" for k in keys], summary.get("status", "?")]
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


def resume_any(run_dir: Path, console: Console, device: str | None = None, quiet: bool = False, overrides: list[str] | None = None,
               jobs: int = 1) -> int:
    """Resume a run or sweep directory. Every check (the marker, the files, the overrides,
    the build, the checkpoint against the model) comes before anything in it is written."""
    check_resumable_dir(run_dir)
    recipe_file = run_dir / "recipe.toml"
    if not recipe_file.exists():
        raise RecipeError([("", f"--resume: {run_dir} has no recipe.toml; it cannot be resumed (start a new run from the recipe)")])
    if (run_dir / SWEEP_FILE).exists():
        if overrides:
            raise RecipeError([("", f"--resume of a sweep takes no overrides; resume one point's directory with them "
                                    f"(engram-run --resume {run_dir}/000 {overrides[0]})")])
        recipe = load_recipe(recipe_file)
        plan = read_json(run_dir / SWEEP_FILE, SWEEP_FILE).get("points")
        if not isinstance(plan, list) or not all(isinstance(e, dict) and {"index", "label", "point", "dir"} <= set(e) for e in plan):
            raise RecipeError([("", f"--resume: {run_dir / SWEEP_FILE} has no valid list of points; it was not changed")])
        if distributed.current().is_main:
            remove_stale_temporaries(run_dir)  # sweep.csv / sweep.md halves a killed sweep left
        return _sweep_loop(recipe, run_dir, plan, console, quiet, device, jobs)
    check_resumable(run_dir, overrides or [])
    summary = read_summary(run_dir / "summary.json")  # a damaged one is rewritten when the run ends
    if summary is not None and summary.get("status") == "completed":
        from .run.console import print_summary

        if overrides:
            raise RecipeError([("", f"--resume: {run_dir} already completed; overrides apply to unfinished runs "
                                    "(start a new run with them instead)")])

        console.print(f"{run_dir} already completed")
        print_summary(console, summary, run_dir)
        return 0
    recipe, text = resume_recipe(run_dir, overrides or [])
    _note_jobs_unused(jobs)
    return _run_one(recipe, run_dir, console, quiet, resume=True, device=device, resumed_recipe_text=text)


__all__ = ["run_recipe", "resume_any", "EngramError"]
