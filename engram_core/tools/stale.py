"""`engram results stale`: the published rows whose code has changed since they were made.

A row's JSON names the commit it was made at (a row `engram results run --complete` added
seeds to also names, under `completed`, the commit of each; the row is compared from every one).
The code on the row's path is:

- the kernel and engram-core's optional parts that every run imports: everything under
  `engram_core/` except `engram_core/tools/` (the commands, the results pipeline itself:
  they read runs, they do not make them), `engram_core/testing/` (test helpers) and
  engram-core's own plugin packages that the kernel never imports (`engram_core/lm/`, the
  general LM: its entry point registers components and a command), which are on the path
  of a row that uses their components, as any plugin's folder is;
- the package folder of every plugin whose components, optimisers, loggers or row-table
  placements the row's recipe uses, found through the registry: the module of each
  component's factory (and of its plugin's entry point) → its top-level package → that
  folder in the checkout (e.g. `plugins/llm-hash/engram_llm_hash/`); a component of
  engram-core itself is already in the kernel;
- the row's recipe file and every file it `extends`, followed down the chain.

`git diff --name-only --no-renames ROW_COMMIT HEAD` lists what changed; a renamed file appears
under both its names, so a move counts as a change. Files the row was made with uncommitted
(the JSON's `dirty`) count as changed too when they are on its path.

A commit can be declared to leave every row's numbers alone in `docs/results-neutral.toml`
(`NEUTRAL_FILE`): its commit, the files of it the declaration covers, and why (the argument a
reviewer checks, e.g. "the changed lines run only when a CUDA-graphed stage resumes mid-way,
which no published row did"). A changed file then does not make a row stale when every commit
since the row's that touched it is declared for it; it is still reported (`neutral` in
`--json`, and the report's last line counts the rows that have such files). A declaration
names files one by one, so anything else the commit changed counts as usual.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs

from ..errors import EngramError, RecipeError
from . import row_recipe

KERNEL = "engram_core"
KERNEL_LEFT_OUT = ("engram_core/tools", "engram_core/testing")
# engram-core's own plugins (entry points in its pyproject) that no kernel module imports: a
# row's path holds one only when the row uses its components, like any plugin's folder
CORE_PLUGINS = ("engram_core/lm",)
SHOWN_FILES = 3
NEUTRAL_FILE = "docs/results-neutral.toml"
NOT_RECORDED = "made before resolved recipes were recorded"
NOT_FINISHED = "no run of it finished"  # a row a deadline stopped: nothing to compare, still to be made
COMMIT_NOT_FOUND = "commit not found"


@attrs.frozen
class CodePath:
    """The files a row's numbers depend on, as paths relative to the checkout."""

    include: tuple[str, ...]  # folders and files
    exclude: tuple[str, ...] = ()
    outside: tuple[str, ...] = ()  # package folders outside the checkout (installed): not compared

    def holds(self, file: str) -> bool:
        return any(_under(file, p) for p in self.include) and not any(_under(file, p) for p in self.exclude)

    def most_specific_first(self, files: list[str]) -> list[str]:
        """Recipe files, then plugin files, then the kernel's (the order `include` is built in, reversed)."""
        return sorted(files, key=lambda f: -max(i for i, p in enumerate(self.include) if _under(f, p)))


def _under(file: str, prefix: str) -> bool:
    return file == prefix or file.startswith(prefix.rstrip("/") + "/")


def recipe_files(recipe_file: Path) -> list[Path]:
    """The recipe and every file it `extends`, each once, in the order they are read."""
    from ..recipe.extends import EXTENDS
    from ..recipe.toml import read_toml

    out: list[Path] = []
    todo = [Path(os.path.normpath(recipe_file))]
    while todo:
        path = todo.pop(0)
        if path in out or not path.is_file():
            continue
        out.append(path)
        try:
            bases = read_toml(path).get(EXTENDS, [])
        except RecipeError:
            continue  # the recipe check reports a broken file; its own path is still listed
        bases = [bases] if isinstance(bases, str) else bases
        todo += [Path(os.path.normpath(path.parent / b)) for b in bases if isinstance(b, str)]
    return out


def package_folder(module: str) -> Path | None:
    """The folder of a module's top-level package (the file, for a single-module plugin)."""
    top = module.split(":", 1)[0].split(".", 1)[0]
    loaded = sys.modules.get(top)
    try:
        spec = loaded.__spec__ if loaded is not None else importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations))).resolve()
    return Path(spec.origin).resolve() if spec.origin else None


def used_modules(recipe, registry) -> set[str]:
    """Modules whose code a run of `recipe` calls: each component's factory and its plugin's
    entry module, and those of the optimisers, loggers and placements it names."""
    from ..recipe import TrainStage

    resolved = [recipe.data, recipe.head, recipe.memory, *recipe.objectives.values(), *recipe.metrics]
    parts = [part for top in resolved if top is not None for part in top.walk()]
    registered: list[Any] = [part.component for part in parts]
    wanted = {"optimizers": set(), "loggers": set(recipe.run.loggers), "placements": set()}
    for stage in recipe.stages:
        if isinstance(stage, TrainStage):
            wanted["optimizers"] |= {stage.optimizer, *(g.optimizer for g in stage.param_groups if g.optimizer)}
    for part in parts:
        placement = getattr(part.config, "placement", None)
        if isinstance(placement, str):
            wanted["placements"].add(placement)
    for kind, names in wanted.items():
        registered += [registry.extensions[kind][n] for n in sorted(names) if n in registry.extensions[kind]]
    modules = {getattr(r.factory, "__module__", None) for r in registered}
    modules |= {registry.plugins[r.plugin].module for r in registered if r.plugin in registry.plugins}
    return {m for m in modules if m}


def code_path(root: Path, recipe_file: Path, recipe=None, registry=None) -> CodePath:
    """The row's code path (module docstring); without a resolved recipe, the kernel and the
    recipe files only."""
    from ..registry import load_registry

    root = root.resolve()
    include, outside = [KERNEL], []

    def add(path: Path) -> None:
        try:
            rel = path.resolve().relative_to(root).as_posix()
        except ValueError:
            outside.append(str(path))
            return
        if rel not in include:
            include.append(rel)

    if recipe is not None:
        for module in sorted(used_modules(recipe, registry or load_registry())):
            if module.split(".", 1)[0] == KERNEL:
                core_plugin = _core_plugin_of(module)
                if core_plugin is not None and core_plugin not in include:
                    include.append(core_plugin)
                continue
            folder = package_folder(module)
            if folder is not None:
                add(folder)
    for path in recipe_files(recipe_file):
        add(path)
    unused_core_plugins = tuple(p for p in CORE_PLUGINS if p not in include)
    return CodePath(tuple(include), KERNEL_LEFT_OUT + unused_core_plugins, tuple(sorted(set(outside))))


def _core_plugin_of(module: str) -> str | None:
    """The folder of the engram-core plugin package `module` belongs to, if any."""
    return next((folder for folder in CORE_PLUGINS if _under(module.replace(".", "/"), folder)), None)


class Git:
    """The checkout's history, read with the git command line; each commit's diff read once."""

    def __init__(self, root: Path):
        self.root = root
        rc, head = self._run("rev-parse", "HEAD")
        if rc != 0:
            raise EngramError(f"{root} is not a git checkout with a commit (git rev-parse HEAD failed): "
                              "`engram results stale` compares each row's commit with HEAD")
        self.head = head.strip()
        self._changed: dict[str, list[str]] = {}
        self._touched: dict[str, dict[str, set[str]]] = {}

    def _run(self, *args: str) -> tuple[int, str]:
        try:
            proc = subprocess.run(["git", *args], cwd=self.root, capture_output=True, text=True)
        except OSError as exc:
            raise EngramError(f"git could not be run ({exc}): `engram results stale` needs git on PATH") from None
        return proc.returncode, proc.stdout

    def has_commit(self, commit: str) -> bool:
        return bool(commit) and self._run("cat-file", "-e", f"{commit}^{{commit}}")[0] == 0

    def changed_since(self, commit: str) -> list[str]:
        if commit not in self._changed:
            rc, out = self._run("diff", "--name-only", "--no-renames", commit, self.head)
            if rc != 0:
                raise EngramError(f"git diff {commit} {self.head} failed in {self.root}")
            self._changed[commit] = out.splitlines()
        return self._changed[commit]

    def touched_since(self, commit: str) -> dict[str, set[str]]:
        """{file: the commits after `commit` up to HEAD that changed it}."""
        if commit not in self._touched:
            rc, out = self._run("log", "--format=@%H", "--name-only", "--no-renames", f"{commit}..{self.head}")
            if rc != 0:
                raise EngramError(f"git log {commit}..{self.head} failed in {self.root}")
            touched: dict[str, set[str]] = {}
            current = ""
            for line in out.splitlines():
                if line.startswith("@"):
                    current = line[1:]
                elif line:
                    touched.setdefault(line, set()).add(current)
            self._touched[commit] = touched
        return self._touched[commit]

    def full_hash(self, commit: str) -> str | None:
        rc, out = self._run("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
        return out.strip() if rc == 0 else None

    def files_of(self, commit: str) -> set[str]:
        rc, out = self._run("show", "--format=", "--name-only", "--no-renames", commit)
        return set(out.splitlines()) if rc == 0 else set()


def neutral_declarations(root: Path, git: Git) -> dict[str, set[str]]:
    """{full commit hash: the files it is declared to change without changing any row's
    numbers}, from `NEUTRAL_FILE` (none when it is absent). A declaration whose commit or
    file is not what the history says is one line, exit 2 (a declaration must be checkable)."""
    from ..recipe.toml import read_toml  # the one TOML reader, with its one-line errors

    path = root / NEUTRAL_FILE
    if not path.is_file():
        return {}
    data = read_toml(path)
    out: dict[str, set[str]] = {}
    for i, entry in enumerate(data.get("commits", [])):
        where = f"commits.{i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("commit"), str) or not entry.get("why"):
            raise RecipeError([(where, "expected { commit = \"<hash>\", files = [\"path\", ...], why = \"...\" }")], str(path))
        files = entry.get("files")
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            raise RecipeError([(f"{where}.files", "expected the list of the files this commit changes without changing any row")],
                              str(path))
        full = git.full_hash(entry["commit"])
        if full is None:
            raise RecipeError([(f"{where}.commit", f"{entry['commit']!r} is not a commit of this repository "
                                                   "(a shallow clone? git fetch --unshallow)")], str(path))
        not_changed = sorted(set(files) - git.files_of(full))
        if not_changed:
            raise RecipeError([(f"{where}.files", f"commit {full[:9]} does not change {', '.join(not_changed)}: "
                                                  "list only files it changes")], str(path))
        out.setdefault(full, set()).update(files)
    return out


def stale_row(root: Path, git: Git, page: str, rid: str, d: dict, neutral: dict[str, set[str]] | None = None) -> dict:
    """One row's report: its commit, the files on its path changed since, and why it is stale
    (an empty `reasons` when it is current). A changed file whose every commit since the
    row's is declared neutral for it (`neutral`) is listed under `neutral`, not `changed`."""
    commit = d.get("commit") or ""
    out: dict[str, Any] = {"page": page, "row": rid, "commit": commit, "reasons": [], "changed": [], "neutral": [], "path": [],
                           "not_compared": [], "remake": f"engram results run {page} --rows {row_recipe.spec_row_id(rid, d)}"}
    recipe_file = root / d["recipe"]
    recipe = None
    try:
        recipe = row_recipe.resolve_today(recipe_file, list(d.get("overrides", [])), d.get("point"), d.get("forced_device"))
    except EngramError as exc:
        out["reasons"].append(f"its recipe does not resolve today ({_first_line(exc)})")
    path = code_path(root, recipe_file, recipe)
    out["path"], out["not_compared"] = [*path.include, *(f":!{p}" for p in path.exclude)], list(path.outside)
    # a row `--complete` added seeds to was made at each of its commits: compare from every one
    made_at = [commit, *(e.get("commit") or "" for e in d.get("completed", ()))]
    if all(git.has_commit(c) for c in made_at):
        changed, dirty = [], [*(d.get("dirty") or []), *(f for e in d.get("completed", ()) for f in e.get("dirty") or [])]
        for c in made_at:
            since = [f for f in git.changed_since(c) if path.holds(f)]
            if neutral:
                touched = git.touched_since(c)
                declared = [f for f in since if touched.get(f) and all(f in neutral.get(t, ()) for t in touched[f])]
                out["neutral"] += [f for f in declared if f not in out["neutral"]]
                since = [f for f in since if f not in declared]
            changed += [f for f in since if f not in changed]
        out["neutral"] = [f for f in out["neutral"] if f not in changed]
        changed += [f for f in dirty if path.holds(f) and f not in changed]
        out["changed"] = changed = path.most_specific_first(changed)
        if changed:
            shown = ", ".join(changed[:SHOWN_FILES]) + (f", +{len(changed) - SHOWN_FILES} more" if len(changed) > SHOWN_FILES else "")
            out["reasons"].append(f"{len(changed)} file{'s' * (len(changed) != 1)} on its path changed ({shown})")
    else:
        out["reasons"].append(COMMIT_NOT_FOUND if commit and all(made_at) else "no commit recorded")
    recorded = d.get("resolved_recipe")
    statuses = row_recipe.unfinished_statuses(d)
    if statuses is not None:
        out["reasons"].append(f"{NOT_FINISHED} (status: {statuses})")
    elif not recorded:
        out["reasons"].append(NOT_RECORDED)
    elif recipe is not None:
        diffs = row_recipe.differences(recorded, row_recipe.text_today(recipe), recipe)
        if diffs:
            out["reasons"].append(f"resolved recipe differs ({row_recipe.describe(diffs)})")
    return out


def _first_line(exc: EngramError) -> str:
    lines = exc.lines() if isinstance(exc, RecipeError) else [str(exc)]
    return lines[0] if lines else type(exc).__name__


def stale_rows(root: Path, pages: dict[str, dict[str, dict]]) -> dict:
    """{"head", "checked", "rows": [the report of every stale row]} over {page: {row id: JSON}}."""
    git = Git(root)
    neutral = neutral_declarations(root, git)
    reports = [stale_row(root, git, page, rid, d, neutral) for page, data in pages.items() for rid, d in sorted(data.items())]
    return {"head": git.head, "checked": len(reports), "rows": [r for r in reports if r["reasons"]],
            "neutral_rows": sum(1 for r in reports if r["neutral"])}


def format_report(report: dict) -> list[str]:
    """One line per stale row, then the commands that re-make them, one per page."""
    lines = [f"{r['page']}  {r['row']}  {(r['commit'] or '?')[:9]}  " + "; ".join(r["reasons"]) for r in report["rows"]]
    by_page: dict[str, list[str]] = {}
    for r in report["rows"]:
        rows = by_page.setdefault(r["page"], [])
        spec = r["remake"].rsplit(" ", 1)[1]
        if spec not in rows:
            rows.append(spec)
    lines.append(f"{len(report['rows'])} of {report['checked']} rows stale at {report['head'][:9]}"
                 + (":" if by_page else ""))
    lines += [f"  engram results run {page} --rows {' '.join(rows)}" for page, rows in by_page.items()]
    if report.get("neutral_rows"):
        lines.append(f"{report['neutral_rows']} rows have changed files on their path that are declared results-neutral in "
                     f"{NEUTRAL_FILE} (not counted; --json lists them)")
    return lines
