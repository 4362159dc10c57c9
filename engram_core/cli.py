"""Command line: ``engram-run`` and ``engram plugins | describe | validate | report``.

Every user error is one line per problem on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import EngramError, RecipeError
from .hookspecs import hookimpl
from .registry import KIND_ALIASES, KIND_SINGULAR, load_registry
from .run.commands import runnable
from .run.console import fail, hint, print_markdown_tables, print_summary  # noqa: F401  (the last two re-exported: their earlier home)

# ---- engram-run ------------------------------------------------------------------------


def run_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="engram-run", description="Run a recipe: train, evaluate, write a run directory.")
    recipe_arg = p.add_argument("recipe", nargs="?", help="recipe TOML file (omit with --resume)")
    overrides_arg = p.add_argument("overrides", nargs="*", help="dotted overrides: head.hidden=1024 stages.1.steps=500")
    p.add_argument("--dry-run", action="store_true", help="validate (build every component on the meta device) and print the resolved recipe; train nothing")
    p.add_argument("--resume", metavar="RUN_DIR", help="resume a run (or sweep) directory from its last checkpoint")
    p.add_argument("--device", help="override run.device (auto, cpu, cuda, cuda:N)")
    p.add_argument("--out", metavar="DIR", help="override run.out_dir")
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument("--params", action="store_true", help="with --dry-run: list the model's parameter names and shapes")
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe, each value's origin (base, recipe, override, default); run nothing")
    p.add_argument("--nproc", type=int, metavar="N", help="one run over N local ranks, through torchrun (torch.distributed.run --standalone --nproc_per_node N)")
    p.add_argument("--traceback", action="store_true", help="show the whole stack of an error raised inside a component")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="sweeps: run N points at once, each in its own process with its share of the CPU threads")
    from . import completion

    completion.recipe_files(recipe_arg)
    completion.overrides(overrides_arg)
    completion.autocomplete(p)  # a shell's completion request ends here (docs/cli.md)
    raw = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_intermixed_args(raw)  # options may come between overrides
    from .run import distributed

    if args.jobs < 1 or (args.jobs > 1 and (args.nproc is not None or distributed.launched_by_torchrun())):
        what = "expected a number of points at once >= 1" if args.jobs < 1 else \
            "cannot be combined with a distributed run (--nproc or torchrun); run the sweep's points one after another over the ranks, or drop --nproc"
        print(f"error: --jobs: {what}", file=sys.stderr)
        return 2
    if args.nproc is not None and not distributed.launched_by_torchrun():
        if args.nproc < 1:
            print("error: --nproc: expected a number of ranks >= 1", file=sys.stderr)
            return 2
        if args.nproc > 1 and not (args.dry_run or args.print_config):
            try:
                _precheck(args, args.nproc)  # a bad recipe fails here, before N processes start
            except EngramError as exc:
                return fail(exc)
            return _torchrun(args.nproc, _without_nproc(raw))
    dist = distributed.setup()
    console = Console(highlight=False, quiet=not dist.is_main)  # rank 0 speaks for the run
    from .cache import logging_to_stdout

    finished = False
    try:
        with logging_to_stdout(not (args.quiet or args.dry_run) and dist.is_main):  # cache hit/miss lines
            code = _run(args, console)
        finished = code == 0  # only a rank that finished its run waits for the others
        return code
    except EngramError as exc:
        return fail(exc, args.traceback) if dist.is_main else exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a full or failing disk under a writer that is not the run directory's own (TensorBoard's)
        from .run.rundir import WRITE_FAULTS

        if exc.errno not in WRITE_FAULTS or args.traceback:
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"error: the disk failed{where}: {exc.strerror or exc} (errno {exc.errno}); free space (or use another --out), "
              "then resume: engram-run --resume RUN_DIR", file=sys.stderr)
        return 1
    except Exception as exc:
        if not (dist.enabled and distributed.lost_a_rank(exc)):
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        print(f"error: rank {dist.rank}: another rank stopped ({first})", file=sys.stderr)
        return 1
    finally:
        distributed.teardown(finished)


def _precheck(args, nproc: int) -> None:
    """Validate the recipe (every sweep point) and its batch split over `nproc` ranks."""
    from .recipe import TrainStage, load_recipe, point_recipe, sweep_points
    from .run.distributed import check_batch_split

    if args.resume:
        from .run.rundir import check_resumable_dir

        check_resumable_dir(Path(args.resume))  # a folder that is not a run: one line, before N processes start
        return
    if not args.recipe:
        return
    recipe = load_recipe(args.recipe, list(args.overrides))
    points = [point_recipe(recipe, p) for _, p in sweep_points(recipe)] if recipe.sweep else [recipe]
    for r in points:
        for i, st in enumerate(r.stages):
            if isinstance(st, TrainStage):
                check_batch_split(st.batch_size, nproc, st.grad_accum, f"stages.{i}", r.file)


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _torchrun(nproc: int, argv: list[str]) -> int:
    """torchrun itself (torch.distributed.run's parser and `run`, in this process) starting
    `python -m engram_core.run ARGV` on N local ranks; its failure report becomes one line.

    The same as `torchrun --standalone --nproc_per_node=N -m engram_core.run ARGV`, except that
    a failed run does not end in torchrun's traceback: a problem with the input was already
    reported by rank 0 (exit 2); a rank that died is named, with its exit code or signal.
    """
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    targs = get_args_parser().parse_args(["--standalone", f"--nproc_per_node={nproc}", "-m", "engram_core.run", *argv])
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # its per-rank lines; summed up below
    # torchrun's agent replaces this process's signal handlers (and leaves SIGINT ignored
    # after it returns): a caller that runs on in this process (a notebook, a test session)
    # would then start children that ignore Ctrl-C. Put them back afterwards.
    import os
    import signal

    from .run.threads import AUTO_ENV, child_env

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    shared = child_env(nproc)  # the ranks share the cores (engram_core.run.threads), not torchrun's 1 thread each
    saved_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", AUTO_ENV)}
    os.environ.update({k: shared[k] for k in saved_env if k in shared})
    try:
        return _run_torchrun(run, targs, ChildFailedError, nproc)
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_torchrun(run, targs, ChildFailedError, nproc: int) -> int:
    try:
        run(targs)
    except ChildFailedError as exc:
        codes = {rank: f.exitcode for rank, f in exc.failures.items()}
        if 2 in codes.values():
            return 2  # rank 0 printed the problem
        # the cause: a rank killed by a signal torchrun did not send (its own is SIGTERM), else the first to fail
        killed = [(r, f) for r, f in sorted(exc.failures.items()) if f.exitcode < 0 and f.signal_name() != "SIGTERM"]
        rank, failure = killed[0] if killed else exc.get_first_failure()
        how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with status {failure.exitcode}"
        print(f"error: rank {rank} {how}; torchrun stopped the other ranks (resume with: {runnable('engram-run')} --nproc {nproc} --resume RUN_DIR)", file=sys.stderr)
        return 1 if failure.exitcode < 0 else failure.exitcode
    return 0


def _warn_broken() -> None:
    """A broken plugin is never silent: say so at start-up (the recipe may not need it)."""
    for info in load_registry().plugins.values():
        if info.broken:
            print(f"warning: plugin '{info.name}' is broken and its components are unavailable: {info.error}", file=sys.stderr)


def _run(args, console: Console) -> int:
    from .recipe import load_recipe
    from .run import distributed
    from .sweep import resume_any, run_recipe

    if distributed.current().is_main:
        _warn_broken()

    if args.resume:
        # `engram-run --resume RUN_DIR lr=...`: argparse puts the first override in `recipe`
        overrides = ([args.recipe] if args.recipe else []) + list(args.overrides)
        not_overrides = [o for o in overrides if "=" not in o]
        if not_overrides:
            raise RecipeError([("", f"--resume takes the run directory and key=value overrides, got {not_overrides[0]!r} "
                                    "(the run directory's recipe.toml is what resumes)")])
        return resume_any(Path(args.resume), console, device=args.device, quiet=args.quiet, overrides=overrides, jobs=args.jobs)
    if not args.recipe:
        raise RecipeError([("", "give a recipe file (or --resume RUN_DIR)")])
    overrides = list(args.overrides)
    if args.device:
        overrides.append(f"run.device={json.dumps(args.device)}")
    if args.out:
        overrides.append(f"run.out_dir={json.dumps(args.out)}")
    recipe = load_recipe(args.recipe, overrides)
    _check_loggers(recipe)
    if args.print_config:
        from .recipe.explain import print_config

        console.print(print_config(recipe), markup=False, end="", soft_wrap=True)
        return 0
    if args.dry_run:
        from .train.validate import check_all, check_recipe

        n = check_all(recipe)  # every component built on the meta device: all problems at once
        console.print(recipe.to_toml(), markup=False, end="")
        if recipe.sweep:
            console.print(f"# sweep: {n} points, all built and valid", markup=False)
        if args.params:
            _print_params(console, check_recipe(recipe))
        return 0
    return run_recipe(recipe, console, quiet=args.quiet, jobs=args.jobs)


def _check_loggers(recipe) -> None:
    """run.loggers names known trackers whose packages are installed (before anything runs)."""
    from .run.loggers import check_loggers

    try:
        check_loggers(recipe.run.loggers, load_registry())
    except RecipeError as exc:
        raise exc.with_file(recipe.file) from None


def _print_params(console: Console, built) -> None:
    """Parameter names (what `train`, `freeze` and `param_groups` globs match) and shapes."""
    table = Table(title="parameters")
    for col in ("name", "shape", "count"):
        table.add_column(col)
    total = 0
    for name, p in built.model.named_parameters():
        table.add_row(name, "×".join(map(str, p.shape)), f"{p.numel():,}")
        total += p.numel()
    console.print(table)
    console.print(f"{total:,} parameters")


# ---- engram -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from . import completion

    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(prog="engram", description="Inspect plugins, components and recipes; report and publish runs.",
                                epilog="plugins may add commands: `engram plugins` lists them")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    handlers = {}
    for name, command in command_registry(argv).items():
        handlers[name] = command.factory(sub.add_parser(name, help=command.help, description=command.help))
    completion.autocomplete(p)  # a shell's completion request ends here (docs/cli.md)
    args = p.parse_args(argv)
    console = Console(highlight=False)
    try:
        return handlers[args.cmd](args, console)
    except EngramError as exc:
        return fail(exc, getattr(args, "traceback", False))
    except BrokenPipeError:  # `engram plugins --json | head`: the reader left; not an error
        _quiet_stdout()
        return 0


def command_registry(argv: list[str]) -> dict:
    """`engram`'s subcommands (`engram_core.registry.Extension`s of kind "commands"): the kernel's
    own (this module's hook) and those of engram-core's own entry points (the tools), loaded
    without importing any component plugin; when the command typed is none of these, every
    plugin's too (a plugin's command runs when typed)."""
    from importlib import metadata

    from . import __version__
    from .registry import CORE, ENTRY_POINT_GROUP, PluginInfo, Registry, is_core_entry_point

    reg = Registry()
    reg.add_plugin(CORE, sys.modules[__name__], PluginInfo(CORE, __name__, "engram-core", __version__))
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if is_core_entry_point(ep):  # their commands only: a core part's components (engram_core.lm) import torch
            reg.add_plugin(ep.name, ep.load(), PluginInfo(ep.name, ep.value, "engram-core", __version__), kinds=("commands",))
    commands = dict(reg.extensions["commands"])
    typed = next((a for a in argv if not a.startswith("-")), None)
    if typed is not None and typed not in commands:
        for name, command in load_registry().extensions["commands"].items():
            commands.setdefault(name, command)
    return commands


@hookimpl
def engram_commands(register):
    register("plugins", _plugins_command, help="installed plugins, their versions and components")
    register("describe", _describe_command, help="a component's documentation and config keys")
    register("validate", _validate_command, help="check a recipe without running it")


def _plugins_command(pp):
    pp.add_argument("--json", action="store_true", help="machine-readable output")
    pp.add_argument("--verbose", action="store_true", help="tracebacks of broken plugins")
    return lambda args, console: _plugins(console, args.json, args.verbose)


def _describe_command(pd):
    from . import completion

    pd.add_argument("kind", help="dataset, head, memory, objective or metric").completer = lambda prefix, **_: [
        k for k in ("dataset", "head", "memory", "objective", "metric") if k.startswith(prefix)]
    completion.component_names(pd.add_argument("name"))
    return lambda args, console: _describe(console, args.kind, args.name)


def _validate_command(pv):
    from . import completion

    completion.recipe_files(pv.add_argument("recipe"))
    completion.overrides(pv.add_argument("overrides", nargs="*"))
    pv.add_argument("--print-config", action="store_true", help="also print the resolved recipe with each value's origin")
    pv.add_argument("--traceback", action="store_true", help="show the whole stack of an error raised inside a component")
    pv.add_argument("--no-forward", action="store_true", help="skip the dry forward (one batch of 2 through the first train stage's objective, on the CPU)")
    return lambda args, console: _validate(console, args.recipe, args.overrides, args.print_config, forward=not args.no_forward)


def _quiet_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so the interpreter's final flush is silent."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (a test's StringIO)
        pass


def _plugins(console: Console, as_json: bool, verbose: bool) -> int:
    reg = load_registry()
    if as_json:
        out = [
            {"name": i.name, "module": i.module, "distribution": i.dist, "version": i.version, "broken": i.broken, "error": i.error, "components": i.components}
            for i in reg.plugins.values()
        ]
        print(json.dumps(out, indent=2))
        return 0
    table = Table(title="engram plugins")
    for col in ("plugin", "version", "status", "components"):
        table.add_column(col, overflow="fold")
    for i in reg.plugins.values():
        status = "[red]broken[/]: " + (i.error or "") if i.broken else "[green]ok[/]"
        table.add_row(i.name, i.version or "-", status, ", ".join(i.components) or "-")
    console.print(table)
    if verbose:
        for i in reg.plugins.values():
            if i.detail:
                console.print(f"[bold]{i.name}[/]\n{i.detail}", markup=True)
    return 0


def _describe(console: Console, kind: str, name: str) -> int:
    from .config import config_fields

    k = KIND_ALIASES.get(kind)
    if k is None:
        raise RecipeError([("", f"unknown kind {kind!r}; kinds: dataset, head, memory, objective, metric")])
    reg = load_registry()
    comp = reg.resolve(k, name, f"{KIND_SINGULAR[k]} name")
    console.print(f"[bold]{KIND_SINGULAR[k]} {comp.qualified}[/]  ({comp.factory.__module__}.{comp.factory.__name__})", soft_wrap=True)
    console.print(own_doc(comp.factory) or own_doc(comp.config_cls) or "(no docstring)", markup=False)
    caps = []
    for label, vals in (("provides", comp.provides), ("requires", comp.requires), ("points", comp.points)):
        if vals:
            caps.append(f"{label}: {', '.join(vals)}")
    if caps:
        console.print("; ".join(caps))
    from .points import PROTOCOLS, point_signature

    points = [p for p in comp.points if p in PROTOCOLS]
    for point in points:
        role = "implements" if k == "memories" else "calls"
        console.print(f"point '{point}' ({role} engram_core.points.{PROTOCOLS[point].__name__}):", markup=False)
        for line in point_signature(point):
            console.print(f"  {line}", markup=False)
    table = Table(title=f"config keys ({comp.config_cls.__name__})")
    for col in ("key", "type", "default", "help"):
        table.add_column(col, overflow="fold")
    for f in config_fields(comp.config_cls):
        table.add_row(escape(f["name"]), escape(f["type"]), escape(f["default"]), escape(f["help"]))
    console.print(table)
    return 0


def own_doc(obj) -> str:
    """The docstring written on `obj` itself: a class without one does not show its base
    class's (`Memory`'s docstring says nothing about the memory being described)."""
    import inspect

    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else ""


def _validate(console: Console, recipe_path: str, overrides: list[str], print_config: bool = False, forward: bool = True) -> int:
    from .recipe import load_recipe
    from .train.validate import check_all

    recipe = load_recipe(recipe_path, overrides)
    _check_loggers(recipe)
    if print_config:
        from .recipe.explain import print_config as explain

        console.print(explain(recipe), markup=False, end="", soft_wrap=True)
    n = check_all(recipe)  # every component built on the meta device, every sweep point
    note = _dry_forwards(recipe) if forward else "dry forward skipped (--no-forward)"
    console.print(f"{recipe_path}: ok ({_count(len(recipe.stages), 'stage')}, {_count(len(recipe.metrics), 'metric')}"
                  + (f", sweep of {_count(n, 'point')}" if recipe.sweep else "") + f"; {note})", markup=False, soft_wrap=True)
    return 0


def _dry_forwards(recipe) -> str:
    """engram_core.train.dry_forward on the recipe, or on each distinct sweep configuration (seeds
    aside: they change no shape). Returns the note of the last one checked."""
    from .recipe import point_recipe, sweep_points
    from .train.dry_forward import dry_forward, skip_reason
    from .train.validate import check_recipe

    def one(r) -> str:
        return skip_reason(r) or dry_forward(r, check_recipe(r))  # no second meta build for a skipped one

    if not recipe.sweep:
        return one(recipe)
    seen, notes = set(), []
    for _, point in sweep_points(recipe):
        key = json.dumps({k: v for k, v in point.items() if k != "run.seed"}, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        notes.append(one(point_recipe(recipe, point)))
    ok = sum(n.startswith("dry forward ok") for n in notes)
    return f"dry forward ok on {ok} of {_count(len(notes), 'configuration')}" + ("" if ok == len(notes) else ", the others skipped")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
