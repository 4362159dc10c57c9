"""The results pipeline: every number on a results page is made by this file from the repository.

A results page is two files under `docs/results/`:

- `<page>.toml`, the page's spec: which recipes run, with which overrides and seeds (`[[rows]]`),
  and which tables and figures show them (`[[tables]]`, `[[figures]]`);
- `<page>.md`, hand-written prose with generated blocks between markers
  `<!-- results:table ID -->` … `<!-- results:end -->` (and `results:figure ID`).

The commands (`engram results …`, or `python -m engram_core.tools.results …`):

    run PAGE [--rows ID ...] [--jobs N]   run the page's rows from an EMPTY cache (a new
                                          ENGRAM_CACHE folder), write one JSON per row
                                          under docs/results/data/<page>/
    run PAGE --rows ID --complete         add the missing seeds of [select] rows whose sweep
                                          chose before a deadline stopped them
    render PAGE                           fill the page's tables and figures from its JSON
    check [PAGE ...]                      every generated block equals what its JSON renders,
                                          every JSON names a recipe that exists and validates,
                                          and resolves to the recipe its runs ran
    stale [PAGE ...] [--json]             rows whose code path changed since their commit
                                          (engram_core.tools.stale)
    list                                  the pages and their rows

A row's JSON holds the recipe, overrides, sweep point, seeds, commit, device, torch and
transformers versions, wall times, every final metric of every seed, the aggregate
(mean, sd, n, values), each seed's eval curves and the resolved recipe the seeds ran
(engram_core.tools.row_recipe). Tables show mean ± sd over seeds; the single
values stay in the JSON (and in the table with `values = true`).

A row whose recipe has a `[sweep]` expands into one row per grid point, `<id>.<NN>`; a sweep
over `run.seed` becomes the rows' seeds instead.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as futures
import fnmatch
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import attrs

from ..errors import EngramError, RecipeError
from . import row_recipe
from .report import aggregate_seeds, final_metrics, load_scalars, stage_spans

CHECKOUT_ENV = "ENGRAM_CHECKOUT"


def checkout() -> Path:
    """The engram checkout whose docs/results/ the pipeline reads and writes: $ENGRAM_CHECKOUT,
    else the current folder or the nearest one above it that has docs/results/ (the installed
    package is not tied to a checkout)."""
    named = os.environ.get(CHECKOUT_ENV)
    if named:
        return Path(named).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "docs" / "results").is_dir():
            return folder
    raise EngramError(f"engram results works inside an engram checkout: no docs/results/ in {here} or above it "
                      f"(cd into the repository, or set {CHECKOUT_ENV}=PATH)")


def results_folder() -> Path:
    return checkout() / "docs" / "results"
SEED_KEY = "run.seed"


# ---- the page spec ------------------------------------------------------------------------


@attrs.frozen
class Row:
    id: str
    recipe: str
    overrides: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2)
    label: str = ""
    timeout_s: int = 0  # 0 = none
    point_labels: tuple[str, ...] = ()  # names of a sweep row's points, in grid order


@attrs.frozen
class Page:
    name: str
    spec_file: Path
    md_file: Path
    data_dir: Path
    rows: tuple[Row, ...]
    tables: tuple[dict, ...]
    figures: tuple[dict, ...]


def load_page(name_or_path: str | Path, results_dir: Path | None = None) -> Page:
    p = Path(name_or_path)
    results_dir = results_dir or results_folder()
    spec = p if p.suffix == ".toml" else results_dir / f"{p.name.removesuffix('.md')}.toml"
    if not spec.is_file():
        raise RecipeError([("", f"no results page spec {spec}; pages: {', '.join(list_pages(results_dir)) or 'none'}")])
    raw = tomllib.loads(spec.read_text())
    name = spec.stem
    allowed = {"rows", "tables", "figures", "description"}
    extra = set(raw) - allowed
    if extra:
        raise RecipeError([(", ".join(sorted(extra)), f"unknown key(s) in {spec}; expected {', '.join(sorted(allowed))}")])
    rows = []
    for i, r in enumerate(raw.get("rows", [])):
        try:
            rows.append(Row(id=r["id"], recipe=r["recipe"], overrides=tuple(r.get("overrides", ())),
                            seeds=tuple(r.get("seeds", (0, 1, 2))), label=r.get("label", ""),
                            timeout_s=int(r.get("timeout_s", 0)), point_labels=tuple(r.get("point_labels", ()))))
        except (KeyError, TypeError) as exc:
            raise RecipeError([(f"rows.{i}", f"a row needs id and recipe (and optional overrides, seeds, label): {exc}")]) from None
    return Page(name, spec, spec.with_suffix(".md"), spec.parent / "data" / name, tuple(rows),
                tuple(raw.get("tables", ())), tuple(raw.get("figures", ())))


def list_pages(results_dir: Path | None = None) -> list[str]:
    return sorted(p.stem for p in (results_dir or results_folder()).glob("*.toml"))


# ---- expanding rows into jobs -----------------------------------------------------------------


@attrs.frozen
class Job:
    row_id: str  # expanded id: `<row>` or `<row>.<NN>` for sweep point NN
    row: Row
    point: dict | None
    point_label: str
    seed: int
    completes: bool = False  # a missing seed of a [select] row whose sweep has chosen (--complete)


def expand(row: Row) -> list[tuple[str, dict | None, str, tuple[int, ...]]]:
    """(expanded id, sweep point or None, point label, seeds) for a row; validates the recipe."""
    from ..recipe import load_recipe, point_recipe, sweep_points, value_label

    recipe = load_recipe(checkout() / row.recipe, list(row.overrides))
    if recipe.select is not None:  # one job: the whole sweep, which chooses on its metric and re-runs the winner's seeds
        for _, point in sweep_points(recipe):
            point_recipe(recipe, point)
        return [(row.id, None, "", (recipe.run.seed,))]
    if not recipe.sweep:
        return [(row.id, None, "", row.seeds)]
    groups: dict[str, tuple[dict, list[int]]] = {}
    for _, point in sweep_points(recipe):
        rest = {k: v for k, v in point.items() if k != SEED_KEY}
        key = json.dumps(rest, sort_keys=True, default=str)
        groups.setdefault(key, (rest, []))
        if SEED_KEY in point:
            groups[key][1].append(int(point[SEED_KEY]))
    out = []
    for i, (rest, seeds) in enumerate(groups.values()):
        point_recipe(recipe, rest)  # every point must validate before anything runs
        out.append((f"{row.id}.{i:02d}", rest, ",".join(f"{k}={value_label(v)}" for k, v in rest.items()),
                    tuple(seeds) or row.seeds))
    return out


def jobs_of(page: Page, only: list[str] | None = None) -> list[Job]:
    jobs = []
    for row in page.rows:
        if only and not any(fnmatch.fnmatch(row.id, pat) for pat in only):
            continue
        for rid, point, label, seeds in expand(row):
            jobs += [Job(rid, row, point, label, s) for s in seeds]
    return jobs


# ---- running --------------------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=checkout(), capture_output=True, text=True, check=True).stdout.rstrip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def source_commit() -> tuple[str, list[str]]:
    """(commit, files changed against it outside docs/results/).

    A copy of the work tree on another machine (the GPU box) may carry a stale `.git` or none:
    the command that copied it names the commit in ENGRAM_RESULTS_COMMIT, which then wins, and
    the check for changes is left to the machine that made the copy."""
    named = os.environ.get("ENGRAM_RESULTS_COMMIT", "")
    if named:
        return named, []
    commit = _git("rev-parse", "HEAD").strip()
    status = _git("-c", "core.fileMode=false", "status", "--porcelain")
    changed = [line[3:] for line in status.splitlines() if not line[3:].startswith("docs/results/")]
    return commit, changed


def _job_env(cache: Path, on_cuda: bool, jobs: int) -> dict[str, str]:
    """A run's environment. With several runs at once, a GPU run gets its share of the CPU
    threads (cores // jobs, rebalanced as runs end: engram_core.run.threads); a CPU run keeps one
    thread, as every published CPU row was made: the thread count changes the last bits of
    CPU float sums, so another count would not reproduce those rows bit for bit."""
    from ..run import threads

    env = dict(os.environ, ENGRAM_CACHE=str(cache), PYTHONUNBUFFERED="1")
    if jobs <= 1:
        return env
    if on_cuda:
        return threads.child_env(jobs, env)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop(threads.AUTO_ENV, None)
    return env


def _on_cuda(device: str) -> bool:
    import torch

    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def _run_job(job: Job, work: Path, cache: Path, device: str | None, jobs: int, deadline: float | None,
             sweep_jobs: int = 1, resume: bool = False, checkpoint_every: int | None = None) -> dict:
    from ..recipe import load_recipe, point_recipe
    from ..run.rundir import atomic_write_text  # torch: only when writing

    jdir = work / job.row_id / f"seed{job.seed}"
    jdir.mkdir(parents=True, exist_ok=True)
    recipe_file = checkout() / job.row.recipe
    overrides = list(job.row.overrides)
    recipe = load_recipe(recipe_file, overrides)
    cadence = checkpoint_overrides(recipe, checkpoint_every)
    if recipe.select is not None and not job.completes:
        return _run_select_job(job, jdir, recipe_file, [*overrides, *cadence], cache, device, jobs, deadline, recipe, sweep_jobs,
                               resume)
    finished = [p.parent for p in sorted((jdir / "runs").glob("*/*/summary.json"))
                if json.loads(p.read_text()).get("status") == "completed"] if resume else []
    if finished:  # made by an earlier call of this page run
        return _run_record(finished[-1], job.seed)
    if job.point is not None:  # the grid point as a recipe of its own, written by the recipe code itself
        recipe = point_recipe(recipe, job.point)
        recipe_file = jdir / "point.toml"
        atomic_write_text(recipe_file, recipe.to_toml())
        overrides = []
    stopped = _resumable_runs(jdir / "runs") if resume else []
    if stopped:  # an earlier call's deadline stopped it after a checkpoint: it goes on from there
        cmd = [sys.executable, "-m", "engram_core.run", "--resume", str(stopped[-1]), "--quiet"]
    else:
        cmd = [sys.executable, "-m", "engram_core.run", str(recipe_file), *overrides, *cadence, f"run.seed={job.seed}",
               "--out", str(jdir / "runs"), "--quiet"]
    if device:
        cmd += ["--device", device]
    t0 = time.perf_counter()
    rc = _launch(cmd, jdir, _job_env(cache, _on_cuda(device or recipe.run.device), jobs), job, deadline)
    wall = time.perf_counter() - t0
    run_dirs = sorted((jdir / "runs").glob("*/*/summary.json"))
    if rc != 0 or not run_dirs:
        tail = (jdir / "log.txt").read_text()[-1500:]
        started = sorted((jdir / "runs").glob("*/*/recipe.toml"))  # a run that failed after it began
        return {"seed": job.seed, "status": "timeout" if rc is None else "failed", "returncode": rc,
                "wall_time_s": round(wall, 1), "log_tail": tail,
                "resolved_recipe": row_recipe.from_run_dir(started[-1].parent) if started else None}
    return _run_record(run_dirs[-1].parent, job.seed, round(wall, 1))


def checkpoint_overrides(recipe, every: int | None) -> list[str]:
    """`stages.N.checkpoint_every=EVERY` for each train stage of `recipe` (`--checkpoint-every`):
    a run the page's deadline stops then goes on from its last checkpoint when the page run
    resumes, instead of from its first step. The cadence does not change what a run computes
    (a resumed run ends as the uninterrupted one: tests/test_engine.py), so it is not part of
    a row's recorded recipe (row_recipe.CADENCE_KEYS)."""
    from ..recipe.schema import TrainStage

    if not every:
        return []
    return [f"stages.{i}.checkpoint_every={every}" for i, st in enumerate(recipe.stages) if isinstance(st, TrainStage)]


def _resumable_runs(runs: Path) -> list[Path]:
    """Run directories under `runs` that stopped before completing and hold a checkpoint (a
    missing or torn summary.json is a run that did not complete)."""
    from ..run.rundir import read_summary

    dirs = [ckpt.parents[1] for ckpt in sorted(runs.glob("*/*/checkpoints/last.pt"))]
    return [rd for rd in dirs if (rd / "recipe.toml").is_file() and (read_summary(rd / "summary.json") or {}).get("status") != "completed"]


def _launch(cmd: list[str], jdir: Path, env: dict[str, str], job: Job, deadline: float | None) -> int | None:
    """Run `cmd` in the checkout, its output in jdir/log.txt; its exit status, None when it ran
    past the row's `timeout_s` or the page's deadline (then it is killed)."""
    limits = [t for t in (job.row.timeout_s or None, None if deadline is None else deadline - time.time()) if t is not None]
    with open(jdir / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=checkout(), env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=max(1.0, min(limits)) if limits else None)
        except subprocess.TimeoutExpired:
            _stop(proc)
            return None


def _stop(proc: subprocess.Popen) -> None:
    """Stop a run past its time: SIGTERM first, which a sweep passes on to its points (each in
    its own process group, so a SIGKILL of the sweep alone left them running as orphans) and
    which gives them the sweep's grace to record `interrupted`; SIGKILL after that."""
    from ..sweep import STOP_GRACE_S

    proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE_S + 10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _run_record(rd: Path, seed: int | None, wall: float | None = None, unfinished: str = "failed") -> dict:
    """What a row's JSON keeps of one run directory; a run with no summary gets status
    `unfinished` ("timeout" when the page's deadline stopped it)."""
    summary = json.loads((rd / "summary.json").read_text()) if (rd / "summary.json").exists() else {"status": unfinished}
    env_json = json.loads((rd / "env.json").read_text()) if (rd / "env.json").exists() else {}
    curves = _curves(rd / "metrics.jsonl") if (rd / "metrics.jsonl").exists() else {}
    return {
        "seed": seed,
        "status": summary.get("status"),
        "wall_time_s": summary.get("wall_time_s", wall),
        "device": env_json.get("device_name") or env_json.get("device"),
        "torch_threads": env_json.get("torch_threads"),
        # a run stopped before it started has no recipe.toml yet
        "metrics": final_metrics(summary) | (_last_train_values(rd) if (rd / "recipe.toml").exists() else {}) | _curve_minima(curves),
        "curves": curves,
        "resolved_recipe": row_recipe.from_run_dir(rd) if (rd / "recipe.toml").exists() else None,
    }


def _run_select_job(job: Job, jdir: Path, recipe_file: Path, overrides: list[str], cache: Path, device: str | None, jobs: int,
                    deadline: float | None, recipe, sweep_jobs: int = 1, resume: bool = False) -> dict:
    """A row whose recipe has `[select]`: the sweep runs whole (grid, choice on its metric, the
    winner again with `then`), `sweep_jobs` points at a time (`engram-run --jobs`, which writes
    what a sequential sweep writes); the row's runs are the winner's (its grid run and the
    `then` runs), and `selection` records every point's value and which won. With `resume`, a
    sweep an earlier call of the page run began is resumed (`engram-run --resume`: its finished
    points are kept, the others run)."""
    begun = sorted((jdir / "runs").glob("*/*-sweep/sweep.json")) if resume else []
    if begun:
        cmd = [sys.executable, "-m", "engram_core.run", "--resume", str(begun[-1].parent), "--quiet"]
    else:
        cmd = [sys.executable, "-m", "engram_core.run", str(recipe_file), *overrides, "--out", str(jdir / "runs"), "--quiet"]
    if sweep_jobs > 1:
        cmd += ["--jobs", str(sweep_jobs)]
    if device:
        cmd += ["--device", device]
    t0 = time.perf_counter()
    rc = _launch(cmd, jdir, _job_env(cache, _on_cuda(device or recipe.run.device), jobs), job, deadline)
    sweeps = sorted((jdir / "runs").glob("*/*-sweep/selection.json"))
    if not sweeps:
        return {"seed": job.seed, "status": "timeout" if rc is None else "failed", "returncode": rc,
                "wall_time_s": round(time.perf_counter() - t0, 1), "log_tail": (jdir / "log.txt").read_text()[-1500:],
                "points_reached": sweep_reached(jdir / "runs")}
    selection = json.loads(sweeps[-1].read_text())
    runs = winner_runs(sweeps[-1].parent, selection, unfinished="timeout" if rc is None else "failed")
    return {"seed": job.seed, "status": "completed" if rc == 0 else "timeout" if rc is None else "failed", "wall_time_s": round(time.perf_counter() - t0, 1),
            "select_runs": runs, "selection": selection}


def winner_runs(sweep_dir: Path, selection: dict, unfinished: str) -> list[dict]:
    """The records of a chosen sweep's winner (`selection`: its selection.json): its grid run
    and the `then` runs (other seeds). A `then` run the deadline stopped before it wrote
    recipe.toml takes its seed from the sweep's plan, so the row still knows which seed is
    missing."""
    plan = json.loads((sweep_dir / "sweep.json").read_text())["points"]
    winners = [(selection["chosen"]["dir"], None), *((e["dir"], e["point"].get("run.seed")) for e in plan if e.get("selected"))]
    runs = []
    for d, planned_seed in winners:
        rd = sweep_dir / d
        seed = tomllib.loads((rd / "recipe.toml").read_text())["run"]["seed"] if (rd / "recipe.toml").exists() else planned_seed
        runs.append(_run_record(rd, seed, unfinished=unfinished))
    return runs


# ---- completing a row a deadline stopped after its choice -------------------------------------


def completion_jobs(page: Page, only: list[str] | None, device: str | None) -> tuple[list[Job], dict[str, dict]]:
    """`--complete`: the jobs that add the missing seeds of the page's [select] rows whose sweep
    has chosen, and those rows' JSON. A device session's deadline often stops a row in its
    `then` seeds, after the choice, and the kept work folder with the seeds' checkpoints may go
    with the machine; the row's JSON still holds the choice, every point's validation value and
    the seeds that finished. The chosen point's missing seeds are what the sweep would run next
    (its point recipe with `run.seed`), so running them alone gives the row an uninterrupted
    page run writes, but for the later seeds' commit: allowed only while `engram results stale`
    counts the row current (the code on its path unchanged since its commit, or changed only by
    commits declared results-neutral, and its recipe resolving as it did) and the device is the
    one it was made on. A row that cannot be completed is refused in one line before anything
    runs; a row with nothing to add (all its seeds done, no JSON, a sweep that has not chosen)
    is passed over with a line saying what makes it."""
    from ..recipe import load_recipe, then_points
    from . import stale

    root = checkout()
    git = stale.Git(root)
    neutral = stale.neutral_declarations(root, git)
    jobs: list[Job] = []
    rows: dict[str, dict] = {}
    for row in page.rows:
        if only and not any(fnmatch.fnmatch(row.id, pat) for pat in only):
            continue
        recipe = load_recipe(root / row.recipe, list(row.overrides))
        remake = f"engram results run {page.name} --rows {row.id}"
        if recipe.select is None:
            if only and row.id in only:  # named, not only matched by a glob: the user meant this row
                raise EngramError(f"{page.spec_file}: row {row.id} has no [select]: --complete adds the missing seeds of a row "
                                  f"whose sweep has chosen (run it: {remake})")
            print(f"  {row.id}: no [select], nothing to complete (run it: {remake})", flush=True)
            continue
        if set(recipe.select.then) - {SEED_KEY}:
            raise EngramError(f"{page.spec_file}: row {row.id}'s [select] then varies {', '.join(sorted(set(recipe.select.then) - {SEED_KEY}))}: "
                              f"--complete adds seeds only (run it whole: {remake})")
        path = page.data_dir / f"{row.id}.json"
        d = json.loads(path.read_text()) if path.is_file() else None
        chosen = ((d or {}).get("selection") or {}).get("chosen")
        if chosen is None:
            print(f"  {row.id}: {'no JSON yet' if d is None else 'its sweep has not chosen'}, nothing to complete (make it: {remake})",
                  flush=True)
            continue
        if (d["recipe"], list(d["overrides"])) != (row.recipe, list(row.overrides)):
            raise EngramError(f"{path}: made from {d['recipe']} with other overrides than the page's row {row.id} has now: "
                              f"it cannot be completed (re-make it whole: {remake})")
        if d.get("forced_device") != device:
            made_on = f"--device {d['forced_device']}" if d.get("forced_device") else "no --device"
            raise EngramError(f"{path}: made with {made_on}, not {f'--device {device}' if device else 'none'}: complete it as it "
                              f"was made ({made_on})")
        report = stale.stale_row(root, git, page.name, row.id, d, neutral)
        if report["reasons"]:
            raise EngramError(f"{path}: row {row.id} (made at {str(d.get('commit'))[:9]}) cannot be completed: "
                              f"{'; '.join(report['reasons'])} (re-make it whole: {remake})")
        point = chosen["point"]
        # the seeds the row has when whole: the chosen grid run's, then those `then` asks for
        seeds = [int(p.get(SEED_KEY, recipe.run.seed)) for p in (point, *(p for _, p in then_points(recipe, point)))]
        wanted = list(dict.fromkeys(seeds))
        done = {r["seed"] for r in d["runs"] if r.get("status") == "completed"}
        missing = [s for s in wanted if s not in done]
        if not missing:
            print(f"  {row.id}: all {len(wanted)} seeds completed, nothing to add", flush=True)
            continue
        rows[row.id] = d
        jobs += [Job(row.id, row, {k: v for k, v in point.items() if k != SEED_KEY}, "", s, completes=True) for s in missing]
    return jobs, rows


def _write_completed_row(page: Page, d: dict, new_runs: list[dict], context: dict) -> Path | None:
    """The row's JSON with what `--complete` made: a completed new run takes its seed's place
    (the record of the run a deadline stopped goes), one that did not complete leaves the row
    as it was (None when none completed: the JSON is not touched); `completed` lists each
    completing call's commit, seeds, machine and versions, and each new run names its commit."""
    from ..run.rundir import atomic_write_json  # torch: only when writing

    done = sorted((r for r in new_runs if r["status"] == "completed"), key=lambda r: r["seed"])
    if not done:
        return None
    for r in done:  # as _row_resolved_recipe: a run keeps its own record only where it differs from the row's
        text = r.pop("resolved_recipe", None)
        if text is not None and text != d.get("resolved_recipe"):
            r["resolved_recipe"] = text
        r["commit"] = context["commit"]
    added = {r["seed"] for r in done}
    runs = sorted([r for r in d["runs"] if r["seed"] not in added] + done, key=lambda r: r["seed"])
    entry = {"commit": context["commit"], "dirty": context["dirty"], "seeds": sorted(added), "forced_device": context["forced_device"],
             "versions": context["versions"], "host": context["host"], "made": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "command": f"python -m engram_core.tools.results run {page.name} --rows {d['row']} --complete",
             **{k: context[k] for k in ("page_run_calls", "checkpoint_every") if k in context}}
    data = {k: v for k, v in d.items() if k not in ("runs", "completed")}
    data |= {"seeds": [r["seed"] for r in runs], **_over_runs(runs), "completed": [*d.get("completed", []), entry], "runs": runs}
    path = page.data_dir / f"{d['row']}.json"
    atomic_write_json(path, data)
    return path


def sweep_reached(runs: Path) -> list[dict]:
    """How far each started point of a sweep got, for a sweep stopped before its choice (a
    device session's deadline): the point's label, the last step it logged, its steps/s
    and its eval curves so far. The next session can size its deadline from it, and a
    point that had already learned shows in its curve."""
    plans = sorted(runs.glob("*/*-sweep/sweep.json"))
    if not plans:
        return []
    sweep_dir = plans[-1].parent
    reached = []
    for entry in json.loads(plans[-1].read_text())["points"]:
        rd = sweep_dir / entry["dir"]
        if not (rd / "recipe.toml").exists():
            continue  # not started
        scalars = load_scalars(rd)
        steps = [step for points in scalars.values() for step, _ in points]
        speed = scalars.get("throughput/steps_per_s", [])
        reached.append({"label": entry["label"], "step": max(steps, default=0),
                        "steps_per_s": speed[-1][1] if speed else None, "curves": _curves(rd / "metrics.jsonl")})
    return reached


def _reached_text(reached: list[dict]) -> str:
    """One line for the console: each started point's last step and speed."""
    return "; ".join(f"{p['label']} at step {p['step']}"
                     + (f" ({p['steps_per_s']:.1f} steps/s)" if p["steps_per_s"] is not None else "") for p in reached)


def _last_train_values(run_dir: Path) -> dict[str, float]:
    """The last logged value of each `train/` and `throughput/` tag within each train stage, as
    `<stage>:last:train/<term>` (what a run trained to, e.g. overfit-one's train accuracy) and
    `<stage>:last:throughput/steps_per_s` (its compute per step)."""
    scalars = load_scalars(run_dir)
    spans = stage_spans(tomllib.loads((run_dir / "recipe.toml").read_text()))
    out = {}
    for sp in spans:
        if sp["kind"] != "train":
            continue
        for tag, points in scalars.items():
            inside = [v for step, v in points if sp["start"] < step <= sp["end"]]
            if tag.startswith(("train/", "throughput/")) and inside:
                out[f"{sp['name']}:last:{tag}"] = inside[-1]
    return out


def _curve_minima(curves: dict[str, list[list[float]]]) -> dict[str, float]:
    """For each eval curve of more than one point, its lowest value as `<stage>:min:<tag>` and
    the step it was reached at as `<stage>:argmin:<tag>`: early stopping read off a val curve
    (a sweep's table can then say which steps each point would keep)."""
    out = {}
    for key, points in curves.items():
        finite = [(v, s) for s, v in points if math.isfinite(v)]
        if len(points) > 1 and finite:
            stage, _, tag = key.partition(":")
            v, s = min(finite)
            out[f"{stage}:min:{tag}"], out[f"{stage}:argmin:{tag}"] = v, s
    return out


def _curves(path: Path) -> dict[str, list[list[float]]]:
    """Eval metrics against the global step, `<stage>:<tag>` → [[step, value], ...]."""
    out: dict[str, list[list[float]]] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        for k, v in rec.get("metrics", {}).items():
            if isinstance(v, (int, float)):
                out.setdefault(f"{rec.get('stage')}:{k}", []).append([rec["step"], v])
    return out


def aggregate(per_seed: list[dict[str, float]]) -> dict[str, dict]:
    """{metric: {mean, sd, n, values}} over the seeds' final metrics (the report's aggregation;
    sd is None for a single value)."""
    return {k: {"mean": m, "sd": None if n < 2 else sd, "n": n, "values": vs}
            for k, (m, sd, n, vs) in aggregate_seeds(per_seed).items()}


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in ("torch", "transformers", "peft"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _host() -> dict:
    import platform

    import torch

    return {"cpus": os.cpu_count(), "machine": platform.machine(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def run_page(page: Page, only: list[str] | None = None, jobs: int = 1, device: str | None = None,
             allow_dirty: bool = False, keep: Path | None = None, deadline_s: float | None = None,
             resume: bool = False, checkpoint_every: int | None = None, complete: bool = False) -> list[Path]:
    """Run the page's rows from an empty cache and write each row's JSON as soon as its seeds are
    done. Runs still going at `deadline_s` are stopped and recorded as "timeout". With `resume`,
    go on with the page run kept in `keep` (same page and commit): finished runs and sweep
    points are kept, the rest run (a grid larger than one device session, made in parts). With
    `checkpoint_every`, train stages save a checkpoint that often, and a run stopped by an
    earlier call's deadline goes on from its last one. With `complete`, only the missing seeds
    of [select] rows whose sweep has chosen run, and are added to the rows' JSON
    (`completion_jobs`)."""
    commit, dirty = source_commit()
    if dirty and not allow_dirty:
        raise EngramError(f"the work tree has uncommitted changes outside docs/results/ ({', '.join(dirty[:5])}): results "
                          "come from a commit (commit first, or --allow-dirty for a trial run whose JSON lists them)")
    all_jobs, completing = completion_jobs(page, only, device) if complete else (jobs_of(page, only), {})
    if not all_jobs:
        raise RecipeError([("rows", f"no row of {page.spec_file} matches {only}" if not complete else
                            f"no row of {page.spec_file} matching {only} has seeds to complete")])
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix=f"engram-results-{page.name}-"))
    calls = _open_work(page, work, commit, resume)
    cache = work / "cache"  # empty at the page run's start: nothing made by other code can be picked up
    cache.mkdir(parents=True, exist_ok=True)
    if calls == 1 and any(cache.iterdir()):
        raise EngramError(f"{cache} is not empty: the pipeline runs from an empty cache")
    deadline = time.time() + deadline_s if deadline_s else None
    # slots the page's own jobs leave free go to [select] rows' sweeps: one row of four rates
    # with --jobs 4 runs its four points at once
    sweep_jobs = max(1, jobs // len(all_jobs))
    print(f"{page.name}: {len(all_jobs)} runs, {jobs} at a time"
          f"{f' ([select] sweeps {sweep_jobs} points at a time)' if sweep_jobs > 1 else ''}, cache {cache}", flush=True)
    context = {"commit": commit, "dirty": dirty, "forced_device": device, "versions": _versions(), "host": _host(),
               **({"page_run_calls": calls} if calls > 1 else {}), **({"checkpoint_every": checkpoint_every} if checkpoint_every else {})}
    expected = {}
    for j in all_jobs:
        expected[j.row_id] = expected.get(j.row_id, 0) + 1
    results: dict[str, list[dict]] = {}
    written = []
    t0 = time.perf_counter()
    with futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        todo = {pool.submit(_run_job, j, work, cache, device, jobs, deadline, sweep_jobs, calls > 1, checkpoint_every): j
                for j in all_jobs}
        for fut in futures.as_completed(todo):
            j = todo[fut]
            res = fut.result()
            if "select_runs" in res:  # a [select] row: one job, the winner's runs
                print(f"  {j.row_id}: chose {res['selection']['chosen']['label']} on {res['selection']['metric']}; "
                      f"{len(res['select_runs'])} runs of it ({time.perf_counter() - t0:.0f} s elapsed)", flush=True)
                chosen = attrs.evolve(j, point=res["selection"]["chosen"]["point"])  # the row's recipe is the winner's
                written.append(_write_row(page, chosen, res["select_runs"], {**context, "selection": res["selection"]}))
                continue
            results.setdefault(j.row_id, []).append(res)
            reached = f"; reached {_reached_text(res['points_reached'])}" if res.get("points_reached") else ""
            print(f"  {j.row_id} seed {j.seed}: {res['status']} in {res['wall_time_s']} s "
                  f"({time.perf_counter() - t0:.0f} s elapsed){reached}", flush=True)
            if len(results[j.row_id]) < expected[j.row_id]:
                continue
            if not j.completes:
                written.append(_write_row(page, j, results[j.row_id], context))
            elif path := _write_completed_row(page, completing[j.row_id], results[j.row_id], context):
                written.append(path)
            else:
                print(f"  {j.row_id}: no added seed completed; its JSON is as it was", flush=True)
    print(f"{page.name}: wrote {len(written)} JSON files in {time.perf_counter() - t0:.0f} s")
    return written


PAGE_RUN_FILE = "page_run.json"


def _open_work(page: Page, work: Path, commit: str, resume: bool) -> int:
    """Which call of its page run this is (1: a new one). A new run marks its work folder with
    the page and commit; `resume` goes on only in a folder so marked, at the same page and
    commit (rows are products of one commit)."""
    from ..run.rundir import atomic_write_json  # torch: only when writing

    marker = work / PAGE_RUN_FILE
    calls = 1
    if resume:
        if not marker.is_file():
            raise EngramError(f"--resume: {work} has no {PAGE_RUN_FILE}: it is not a page run's folder kept with --keep; "
                              f"nothing was changed (start one: engram results run {page.name} --keep {work})")
        began = json.loads(marker.read_text())
        if (began.get("page"), began.get("commit")) != (page.name, commit):
            raise EngramError(f"--resume: {work} holds a run of page {began.get('page')} at commit {str(began.get('commit'))[:10]}, "
                              f"not {page.name} at {commit[:10]}: a page run goes on only at the commit it began "
                              "(check that commit out, or start a new run in a new --keep folder)")
        calls = int(began.get("calls", 1)) + 1
    elif marker.exists():
        raise EngramError(f"--keep: {work} already holds a page run ({PAGE_RUN_FILE}); nothing was changed "
                          f"(go on with it: --keep {work} --resume, or give a new folder)")
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, {"page": page.name, "commit": commit, "calls": calls})
    return calls


def _write_row(page: Page, j: Job, runs: list[dict], context: dict) -> Path:
    from ..run.rundir import atomic_write_json  # torch: only when writing

    runs.sort(key=lambda r: r["seed"])
    resolved = _row_resolved_recipe(runs)
    label = j.row.label + (f" ({j.point_label})" if j.point_label and j.row.label else j.point_label)
    data = {
        "page": page.name,
        "row": j.row_id,
        "label": label,
        "recipe": j.row.recipe,
        "overrides": list(j.row.overrides),
        "point": j.point,
        "seeds": [r["seed"] for r in runs],
        **context,
        "cache": "empty at the start of the page run (a new ENGRAM_CACHE folder)"
                 + (f"; the page run made in {context['page_run_calls']} calls (--resume)" if "page_run_calls" in context else ""),
        "made": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": f"python -m engram_core.tools.results run {page.name} --rows {j.row.id}",
        **_over_runs(runs),
        "resolved_recipe": resolved,
        "runs": runs,
    }
    page.data_dir.mkdir(parents=True, exist_ok=True)
    path = page.data_dir / f"{j.row_id}.json"
    atomic_write_json(path, data)
    return path


def _over_runs(runs: list[dict]) -> dict:
    """What a row's JSON derives from its runs (sorted by seed): devices, wall times, statuses
    and the metrics aggregated over the completed ones."""
    return {
        "device": sorted({r.get("device") or "?" for r in runs}),
        "wall_time_s": [r["wall_time_s"] for r in runs],
        "status": [r["status"] for r in runs],
        "metrics": dict(sorted(aggregate([r["metrics"] for r in runs if r["status"] == "completed"]).items())),
    }


def _row_resolved_recipe(runs: list[dict]) -> str | None:
    """The row's resolved recipe (engram_core.tools.row_recipe): the one its seeds ran, the
    completed ones first. The seeds' records are equal by construction (only run.seed and
    run.out_dir differ, and neither is recorded); a run whose record differs all the same keeps
    its own under `runs[i].resolved_recipe`, so nothing is hidden."""
    texts = [r.pop("resolved_recipe", None) for r in runs]
    order = sorted(range(len(runs)), key=lambda i: runs[i]["status"] != "completed")
    resolved = next((texts[i] for i in order if texts[i] is not None), None)
    for r, text in zip(runs, texts):
        if text is not None and text != resolved:
            r["resolved_recipe"] = text
    return resolved


# ---- rendering ---------------------------------------------------------------------------------


def load_data(page: Page) -> dict[str, dict]:
    """The page's rows, each with `wall_time_s` (of the completed seeds) as a metric too."""
    out = {}
    for path in sorted(page.data_dir.glob("*.json")) if page.data_dir.is_dir() else []:
        d = json.loads(path.read_text())
        done = [r["wall_time_s"] for r in d["runs"] if r.get("status") == "completed"]
        if done:
            d["metrics"]["wall_time_s"] = aggregate([{"wall_time_s": w} for w in done])["wall_time_s"]
        out[path.stem] = d
    return out


def fmt_cell(agg: dict | None, fmt: str, values: bool = False) -> str:
    if not agg or not agg["n"]:
        return "—"
    mean, sd, n = agg["mean"], agg["sd"], agg["n"]
    text = format(mean, fmt) if n == 1 else f"{format(mean, fmt)} ± {format(sd, fmt)}"
    if values and n > 1:
        text += " (" + ", ".join(format(v, fmt) for v in agg["values"]) + ")"
    return text


def _rows_matching(data: dict[str, dict], patterns: list[str]) -> list[str]:
    out = []
    for pat in patterns:
        hits = [rid for rid in data if fnmatch.fnmatch(rid, pat)]
        out += [h for h in sorted(hits) if h not in out]
    return out


def _resolve(ref: str, data: dict[str, dict]) -> dict | None:
    rid, _, key = ref.partition(":")
    return data.get(rid, {}).get("metrics", {}).get(key)


def _cell(c, data: dict[str, dict], fmt: str, values: bool) -> str:
    """A literal, or `@<row>:<metric key>` with an optional `|<format>` (`@r:eval/acc|.3f`)."""
    if not (isinstance(c, str) and c.startswith("@")):
        return str(c)
    ref, _, own = c[1:].partition("|")
    return fmt_cell(_resolve(ref, data), own or fmt, values)


def row_label(rid: str, d: dict, labels: dict[str, str]) -> str:
    """The spec's label of the row (the page's current wording), with the sweep point after it."""
    from ..recipe import value_label

    if rid in labels and d.get("point"):  # the spec names this grid point
        return labels[rid]
    base = labels.get(rid.rsplit(".", 1)[0] if d.get("point") else rid, "")
    point = ",".join(f"{k}={value_label(v)}" for k, v in (d.get("point") or {}).items())
    if base:
        return f"{base} ({point})" if point else base
    return d.get("label") or point or rid


def render_table(spec: dict, data: dict[str, dict], labels: dict[str, str] | None = None) -> str:
    """A Markdown table. Two forms:
    - `rows` (row ids or globs) × `columns` ({key, label, fmt}): one table row per JSON row;
    - `cells`: an explicit grid, each cell a literal or `@<row>:<metric key>`."""
    fmt = spec.get("fmt", ".3f")
    values = bool(spec.get("values", False))
    if "cells" in spec:
        header = spec["header"]
        body = [[_cell(c, data, fmt, values) for c in line] for line in spec["cells"]]
    else:
        cols = spec["columns"]
        header = [spec.get("row_header", "run")] + [c.get("label", c["key"]) for c in cols] + (["seeds"] if spec.get("seeds", True) else [])
        body = []
        for rid in _rows_matching(data, spec["rows"]):
            d = data[rid]
            line = [row_label(rid, d, labels or {})]
            line += [_column_cell(d, c, fmt, values) for c in cols]
            if spec.get("seeds", True):
                line.append(str(len([s for s in d["status"] if s == "completed"])))
            body.append(line)
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(out)


def _column_cell(d: dict, column: dict, fmt: str, values: bool) -> str:
    """One cell of a `rows` × `columns` table: a swept key's value (`point:`), a grid point's
    selection value (`selection:`) or a metric aggregated over the row's seeds."""
    key, fmt = column["key"], column.get("fmt", fmt)
    if key.startswith("point:"):
        return _point_cell(d, key)
    if key.startswith("selection:"):
        return _selection_cell(d, key, fmt)
    return fmt_cell(d["metrics"].get(key), fmt, values)


def _point_cell(d: dict, key: str) -> str:
    """`point:<recipe key>`: the row's value of a sweep key, e.g. the rate a [select] row chose."""
    value = (d.get("point") or {}).get(key.removeprefix("point:"))
    return "—" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _selection_cell(d: dict, key: str, fmt: str) -> str:
    """`selection:<point label>`: what a [select] row's grid point scored on the selection
    metric (one run each, on validation), marked when it is the point the row chose."""
    selection = d.get("selection") or {}
    label = key.removeprefix("selection:")
    value = (selection.get("values") or {}).get(label)
    if value is None:
        return "—"
    chosen = (selection.get("chosen") or {}).get("label") == label
    return f"**{format(value, fmt)}** (chosen)" if chosen else format(value, fmt)


def figure_png(page: Page, spec: dict) -> Path:
    return page.md_file.parent / "figures" / f"{page.name}-{spec['id']}.png"


def figure_link(page: Page, spec: dict) -> str:
    rel = os.path.relpath(figure_png(page, spec), page.md_file.parent)
    return f"![{spec.get('title', spec['id'])}]({Path(rel).as_posix()})"


def render_figure(spec: dict, data: dict[str, dict], out_png: Path, labels: dict[str, str] | None = None) -> None:
    """`kind = "bars"`: one metric per row, mean ± sd with the single seeds as dots;
    `kind = "curves"`: an eval curve per row (mean over seeds against the step);
    `kind = "lines"`: `key` against the sweep-point key `x`, one line per value of the
    `series` point keys (mean ± sd over seeds); `kind = "scatter"`: one point per row, `key`
    against the metric `x` (mean ± sd over seeds), `logx` for a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows_matching(data, spec["rows"])
    labels = labels or {}
    notes = []  # the scatter's point labels, placed once the layout is final
    fig, ax = plt.subplots(figsize=(spec.get("width", 7.0), spec.get("height", 3.6)), dpi=110)
    kind = spec.get("kind", "bars")
    if kind == "lines":
        from .report import draw_lines, line_series

        # each line is named by its row's label (two rows may sweep the same points) and the series keys
        pts = [({"row": labels.get(r.rsplit(".", 1)[0], r.rsplit(".", 1)[0]), **(data[r].get("point") or {})}, data[r]["metrics"].get(spec["key"]))
               for r in rows]
        draw_lines(ax, line_series(pts, spec["x"], ["row", *spec.get("series", [])]), spec.get("xlabel", spec["x"]), spec.get("ylabel", spec["key"]))
    elif kind == "scatter":
        notes = _draw_scatter(ax, spec, data, rows, labels)
    elif kind == "bars":
        _draw_bars(ax, spec, data, rows, labels)
    else:
        _draw_curves(ax, spec, data, rows, labels)
    # reference levels, e.g. chance: `hline` (+ `hline_label`), or `hlines = [[y, "label"], ...]`
    levels = [(spec["hline"], spec.get("hline_label"))] if "hline" in spec else []
    levels += [(level[0], level[1] if len(level) > 1 else None) for level in spec.get("hlines", [])]
    for (y, label), ls in zip(levels, ["--", ":", "-.", (0, (1, 3))] * 4):
        ax.axhline(y, color="grey", ls=ls, lw=1, label=label)
    if any(label for _, label in levels):
        ax.legend(fontsize=7)
    if spec.get("title"):
        ax.set_title(spec["title"], fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    place_labels(notes, fig.canvas.get_renderer())  # after the layout: the labels' extents are the drawn ones
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, metadata={"Software": None})  # no timestamp/version: same data, same file
    plt.close(fig)


def _draw_scatter(ax, spec: dict, data: dict[str, dict], rows: list[str], labels: dict[str, str]) -> list:
    """One point per row: `key` (mean ± sd over seeds) against the metric `x` (Zoology's
    accuracy against state size), labelled by the row; `logx = true` for sizes. A row made in
    part (fewer completed seeds than it runs) is drawn hollow and says so, so a single seed is
    not read as the table's mean of three. Returns the labels, to be placed after the layout."""
    import matplotlib.ticker

    notes = []
    for rid in rows:
        y, x = data[rid]["metrics"].get(spec["key"]), data[rid]["metrics"].get(spec["x"])
        if not y or not y["n"] or not x or not x["n"]:
            continue
        planned = len(data[rid].get("seeds") or [])
        partial = y["n"] < planned
        ax.errorbar(x["mean"], y["mean"], yerr=y["sd"] if y["n"] > 1 else None, fmt="o", ms=5, capsize=3,
                    **({"mfc": "none"} if partial else {}))
        label = row_label(rid, data[rid], labels) + (f", {y['n']} of {planned} seeds" if partial else "")
        notes.append(ax.annotate(label, (x["mean"], y["mean"]), fontsize=7, xytext=(4, 3), textcoords="offset points"))
    if spec.get("logx"):
        ax.set_xscale("log")
        # over less than about a decade and a half matplotlib labels the minor ticks too,
        # and "3 × 10³" runs into "4 × 10³": the powers of ten alone
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel(spec.get("xlabel", spec["x"]))
    ax.set_ylabel(spec.get("ylabel", spec["key"]))
    return notes


def _draw_bars(ax, spec: dict, data: dict[str, dict], rows: list[str], labels: dict[str, str]) -> None:
    """One bar per row: `key`'s mean ± sd over seeds, the single seeds as dots."""
    key = spec["key"]
    for i, rid in enumerate(rows):
        agg = data[rid]["metrics"].get(key)
        if not agg or not agg["n"]:
            continue
        ax.bar(i, agg["mean"], yerr=agg["sd"] if agg["n"] > 1 else None, color="#8fb3d9", capsize=4)
        ax.scatter([i] * agg["n"], agg["values"], color="#1f3b5c", s=12, zorder=3)
    ax.set_xticks(range(len(rows)), [row_label(r, data[r], labels) for r in rows], rotation=spec.get("rotation", 20), ha="right", fontsize=8)
    ax.set_ylabel(spec.get("ylabel", key))


def _draw_curves(ax, spec: dict, data: dict[str, dict], rows: list[str], labels: dict[str, str]) -> None:
    """An eval curve per row, the mean over its completed seeds against the step; `key` may
    list several curve names, the first one a row has is drawn."""
    keys = [spec["key"]] if isinstance(spec["key"], str) else list(spec["key"])
    for rid in rows:
        runs = [r for r in data[rid]["runs"] if r.get("status") == "completed"]
        key = next((k for k in keys if runs and k in runs[0]["curves"]), keys[0])
        per_seed = [r["curves"].get(key, []) for r in runs]
        if not per_seed or not per_seed[0]:
            continue
        steps = [s for s, _ in per_seed[0]]
        n = min(len(c) for c in per_seed)
        mean = [sum(c[i][1] for c in per_seed) / len(per_seed) for i in range(n)]
        ax.plot(steps[:n], mean, marker="o", ms=3, label=row_label(rid, data[rid], labels))
    ax.set_xlabel("step")
    ax.set_ylabel(spec.get("ylabel", keys[0]))
    ax.legend(fontsize=7)


def place_labels(notes: list, renderer, step: float = 9.0, tries: int = 12) -> None:
    """Move point labels (matplotlib annotations, offsets in points) up or down, a line at a
    time, until no two labels' drawn boxes overlap: rows at nearby points (members of one
    family at similar state sizes) stay readable. A label that finds no free place within
    `tries` lines keeps its first offset."""
    placed = []
    for note in notes:
        dx, dy = note.xyann
        for k in [0, *[s * i for i in range(1, tries + 1) for s in (-1, 1)]]:
            note.xyann = (dx, dy + k * step)
            box = note.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed):
                break
        else:
            note.xyann = (dx, dy)
            box = note.get_window_extent(renderer)
        placed.append(box)


BLOCK = re.compile(r"(<!-- results:(table|figure) ([\w.-]+) -->\n)(.*?)(<!-- results:end -->)", re.S)


def page_labels(page: Page) -> dict[str, str]:
    """Row id → the spec's label, and `<id>.<NN>` → the spec's name for grid point NN."""
    out = {r.id: r.label for r in page.rows}
    for r in page.rows:
        out.update({f"{r.id}.{i:02d}": name for i, name in enumerate(r.point_labels)})
    return out


def _blocks(page: Page, data: dict[str, dict], draw: bool) -> dict[tuple[str, str], str]:
    out = {}
    for t in page.tables:
        labels = page_labels(page)
        patterns = t.get("rows") or _cell_rows(t)
        out[("table", t["id"])] = render_table(t, data, labels) + "\n" + _provenance(patterns, data, t.get("pending"), _unmade(page, patterns, data))
    for f in page.figures:
        if draw and data:
            render_figure(f, data, figure_png(page, f), page_labels(page))
        out[("figure", f["id"])] = figure_link(page, f)
    return out


def _cell_rows(spec: dict) -> list[str]:
    return sorted({c[1:].partition(":")[0] for line in spec.get("cells", []) for c in line if isinstance(c, str) and c.startswith("@")})


def _unmade(page: Page, patterns: list[str], data: dict[str, dict]) -> list[str]:
    """The page's rows a table's patterns name that have no JSON yet (a grid made in parts)."""
    named = [r.id for r in page.rows if any(fnmatch.fnmatch(r.id, pat) for pat in patterns)]
    return [rid for rid in named if not any(d == rid or d.startswith(rid + ".") for d in data)]


def _provenance(patterns: list[str], data: dict[str, dict], pending: str | None = None, unmade: list[str] = ()) -> str:
    rows = _rows_matching(data, patterns)
    if not rows and pending:  # a table whose rows are defined but not made yet, and why (the page says so)
        return f"\n*(not made yet: {pending})*\n"
    if not rows:
        return "\n*(no data yet: `python -m engram_core.tools.results run` writes it)*\n"
    completed = collections.Counter(sum(s == "completed" for s in data[r]["status"]) for r in rows)

    def plural(n: int, noun: str) -> str:
        return f"{n} {noun}{'' if n == 1 else 's'}"

    if len(completed) == 1:
        k = next(iter(completed))
        seeds = f"{plural(len(rows), 'row')}, {plural(k, 'completed seed')}{' each' if len(rows) > 1 else ''}"
    else:  # a grid made in parts: how many rows have how many seeds, most first
        (k, n), *fewer = sorted(completed.items(), reverse=True)
        counts = [f"{n} with {plural(k, 'completed seed')}", *(f"{n} with {k}" for k, n in fewer)]
        seeds = f"{len(rows)} rows: {', '.join(counts)}"
    devices = sorted({d for r in rows for d in data[r]["device"] if d != "?"})
    # a row completed later (--complete) was made at more than one commit
    commits = sorted({c[:10] for r in rows for c in (data[r]["commit"], *(e["commit"] for e in data[r].get("completed", ())))})
    # a run the page's deadline stopped has no wall time
    wall = sum(w for r in rows for w in data[r]["wall_time_s"] if w is not None)
    later = f"; not made yet: {', '.join(unmade)}{f' ({pending})' if pending else ''}" if unmade else ""
    # a row every run of which a deadline stopped (a sweep that has not chosen): its JSON says how far it got
    unfinished = [f"{r} ({s})" for r in rows if (s := row_recipe.unfinished_statuses(data[r]))]
    stopped = f"; no run finished yet: {', '.join(unfinished)}, how far each got in its JSON's `points_reached`" if unfinished else ""
    return (f"\n<sub>{seeds} (mean ± sd over seeds); "
            f"device {', '.join(devices)}; commit {', '.join(commits)}; {wall / 60:.1f} min of runs; "
            f"data: `docs/results/data/{data[rows[0]]['page']}/`{stopped}{later}</sub>\n")


def render_page(page: Page, draw: bool = True, data: dict[str, dict] | None = None) -> str:
    data = load_data(page) if data is None else data
    blocks = _blocks(page, data, draw)
    text = page.md_file.read_text() if page.md_file.exists() else f"# {page.name}\n"
    seen = set()

    def sub(m: re.Match) -> str:
        key = (m.group(2), m.group(3))
        seen.add(key)
        if key not in blocks:
            raise EngramError(f"{page.md_file}: block {key[0]} {key[1]} is not in {page.spec_file}")
        return m.group(1) + blocks[key] + "\n" + m.group(5)

    text = BLOCK.sub(sub, text)
    missing = [f"{k} {i}" for (k, i) in blocks if (k, i) not in seen]
    if missing:  # a table the spec defines but the page forgot: append it, visibly
        text += "".join(f"\n<!-- results:{k} -->\n{blocks[tuple(k.split(' ', 1))]}\n<!-- results:end -->\n" for k in missing)
    return text


def check_page(page: Page) -> list[str]:
    """Problems, one line each: a generated block that differs from its JSON, JSON whose recipe is
    missing or does not validate, a table cell that names a row with no JSON, a row whose
    recorded resolved recipe is not what its recipe resolves to today (engram_core.tools.row_recipe)."""
    problems = []
    if not page.md_file.exists():
        return [f"{page.md_file}: missing"]
    data = load_data(page)  # read once: the render and the recipe checks below share it
    current = page.md_file.read_text()
    expected = render_page(page, draw=False, data=data)
    if current != expected:
        for (a, b) in zip(BLOCK.finditer(current), BLOCK.finditer(expected)):
            if a.group(0) != b.group(0):
                problems.append(f"{page.md_file}: block {a.group(2)} {a.group(3)} differs from what its JSON renders "
                                f"(hand-edited? run: python -m engram_core.tools.results render {page.name})")
        if not problems:
            problems.append(f"{page.md_file}: generated blocks differ from the spec (run: python -m engram_core.tools.results render {page.name})")
    for f in page.figures:
        png = figure_png(page, f)
        if data and not png.exists():
            problems.append(f"{png}: missing (run: python -m engram_core.tools.results render {page.name})")
    for rid, d in data.items():
        recipe = checkout() / d["recipe"]
        if not recipe.is_file():
            problems.append(f"{page.data_dir / (rid + '.json')}: recipe {d['recipe']} does not exist")
            continue
        try:
            r = row_recipe.resolve_today(recipe, list(d["overrides"]), d.get("point"), d.get("forced_device"))
        except EngramError as exc:
            problems.append(f"{page.data_dir / (rid + '.json')}: {d['recipe']} with {d['overrides']} does not validate: {exc}")
            continue
        recorded = d.get("resolved_recipe")
        if recorded:  # rows made before resolved recipes were recorded: `engram results stale` lists them
            diffs = row_recipe.differences(recorded, row_recipe.text_today(r), r)
            if diffs:
                problems.append(f"{page.data_dir / (rid + '.json')}: row {rid} was made by another recipe than "
                                f"{d['recipe']} resolves to today ({row_recipe.describe(diffs)}); re-make it: "
                                f"engram results run {page.name} --rows {row_recipe.spec_row_id(rid, d)}")
    return problems


# ---- command line -----------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of steps >= 1, got {text!r}")
    return value


def configure(p: argparse.ArgumentParser):
    """`engram results`' arguments on `p`; returns the handler `handler(args, console) -> int`."""
    sub = p.add_subparsers(dest="results_cmd", required=True)
    r = sub.add_parser("run", help="run a page's rows from an empty cache and write their JSON")
    r.add_argument("page")
    r.add_argument("--rows", nargs="*", help="row ids or globs (default: all)")
    r.add_argument("--jobs", type=int, default=1, help="runs at a time; when > 1 a GPU run gets cores // N CPU threads, a CPU run one (as the published CPU rows)")
    r.add_argument("--device", help="force run.device (cpu, cuda)")
    r.add_argument("--allow-dirty", action="store_true", help="run from uncommitted code (the JSON says so)")
    r.add_argument("--keep", metavar="DIR", help="work folder to keep run directories and logs in (must be new, unless --resume)")
    r.add_argument("--resume", action="store_true", help="go on with the page run kept in --keep DIR (same commit): finished runs and sweep points are kept")
    r.add_argument("--deadline", type=float, metavar="SECONDS", help="stop runs still going after this long (recorded as timeout)")
    r.add_argument("--checkpoint-every", type=_positive_int, metavar="STEPS",
                   help="train stages checkpoint every STEPS steps, so a run a deadline stopped goes on from its last checkpoint on --resume")
    r.add_argument("--complete", action="store_true",
                   help="run only the missing seeds of [select] rows whose sweep has chosen (a deadline stopped the rest) and add them "
                        "to the rows' JSON; refused for a row `engram results stale` lists")
    r.add_argument("--no-render", action="store_true")
    d = sub.add_parser("render", help="fill a page's tables and figures from its JSON")
    d.add_argument("pages", nargs="*")
    c = sub.add_parser("check", help="generated blocks equal their JSON; JSON recipes validate")
    c.add_argument("pages", nargs="*")
    s = sub.add_parser("stale", help="rows whose code path changed since their commit, or made before resolved recipes were recorded")
    s.add_argument("pages", nargs="*")
    s.add_argument("--json", action="store_true", help="the report as JSON (each row's path, changed files and reasons)")
    sub.add_parser("list", help="the pages and their rows")
    return _handle


def _handle(args, console=None) -> int:
    from ..run.rundir import atomic_write_text  # torch: only when writing

    if args.results_cmd == "run":
        page = load_page(args.page)
        if args.resume and not args.keep:
            raise EngramError("--resume goes on with a page run kept by --keep DIR; give that folder: "
                              f"engram results run {args.page} --keep DIR --resume")
        run_page(page, args.rows, args.jobs, args.device, args.allow_dirty, Path(args.keep) if args.keep else None, args.deadline,
                 args.resume, args.checkpoint_every, args.complete)
        if not args.no_render:
            atomic_write_text(page.md_file, render_page(page))
        return 0
    if args.results_cmd == "render":
        for name in args.pages or list_pages():
            page = load_page(name)
            atomic_write_text(page.md_file, render_page(page))
            print(f"rendered {page.md_file}")
        return 0
    if args.results_cmd == "check":
        problems = [line for name in (args.pages or list_pages()) for line in check_page(load_page(name))]
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        return 1 if problems else 0
    if args.results_cmd == "stale":
        from .stale import format_report, stale_rows

        report = stale_rows(checkout(), {name: load_data(load_page(name)) for name in (args.pages or list_pages())})
        print(json.dumps(report, indent=2) if args.json else "\n".join(format_report(report)))
        return 0  # a report: stale rows are for the author to re-make, not an error
    for name in list_pages():
        page = load_page(name)
        print(f"{name}: " + ", ".join(f"{r.id} ({r.recipe}, {len(r.seeds)} seeds)" for r in page.rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m engram_core.tools.results ...`: the same as `engram results ...`."""
    p = argparse.ArgumentParser(prog="engram results", description="Run, render and check the results pages (docs/results/).")
    handler = configure(p)
    args = p.parse_args(argv)
    try:
        return handler(args)
    except EngramError as exc:
        lines = exc.lines() if isinstance(exc, RecipeError) else [str(exc)]
        for line in lines:
            print(f"error: {line}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)


if __name__ == "__main__":
    sys.exit(main())

