"""The core's tools, attached to `engram` through the ``engram_commands`` hook.

`engram report`, `engram results` and `engram cache` live here, outside the kernel: the
kernel never imports this package; engram-core's own entry point (`engram-tools` in its
pyproject) registers it like any plugin. Each command's module is imported only when the
command runs, so `engram --help` imports neither torch nor matplotlib.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console

from ..hookspecs import hookimpl


@hookimpl
def engram_commands(register):
    register("report", _report_command, help="a run or sweep directory as Markdown and PNG figures")
    register("results", _results_command, help="run, render and check the results pages (docs/results/)")
    register("cache", _cache_command, help="list or clear cached artefacts (generated data, pretrained readers)")


def _report_command(pr):
    pr.add_argument("dir", metavar="RUN_OR_SWEEP_DIR")
    pr.add_argument("--out", metavar="DIR", help="where to write report.md and the figures (default: DIR/report/)")
    pr.add_argument("--x", metavar="KEY", help="sweeps: also plot --metric against this swept key (e.g. data.n_pairs)")
    pr.add_argument("--series", metavar="KEY", action="append", default=[], help="sweeps: one line per value of this swept key (repeatable; e.g. memory)")
    pr.add_argument("--metric", metavar="TAG", default="eval/acc", help="the metric of the --x plot (default eval/acc)")
    return lambda args, console: _report(console, args.dir, args.out, (args.x, args.series, args.metric) if args.x else None)


def _results_command(parser):
    from .results import configure  # argparse only: the pipeline's heavy imports wait for the handler

    return configure(parser)


def _cache_command(parser):
    _cache_arguments(parser)
    return lambda args, console: _cache(console, args)


def _report(console: Console, target: str, out: str | None, lines=None) -> int:
    from .report import write_report

    path = write_report(Path(target), Path(out) if out else None, lines)
    console.print(f"report: {path}", markup=False)
    return 0


# ---- engram cache ---------------------------------------------------------------------------


def _cache_arguments(pc) -> None:
    pc.add_argument("--dir", help="the cache folder (default: $ENGRAM_CACHE, else ~/.cache/engram)")
    cs = pc.add_subparsers(dest="cache_cmd", required=True)
    cl = cs.add_parser("list", help="every entry: plugin, kind, key, size, created, config")
    cl.add_argument("--json", action="store_true", help="machine-readable output (the full sidecars)")
    cc = cs.add_parser("clear", help="remove entries matching PATTERN (all without one)")
    cc.add_argument("pattern", nargs="?", help="glob on plugin/kind-key, e.g. 'qwen-compressor/reader-*' or 'deq-hrr'")
    cc.add_argument("--yes", "-y", action="store_true", help="do not ask (a non-terminal is never asked)")


def _cache(console: Console, args) -> int:
    from ..components import default_cache_dir
    from . import cache_listing as cache

    root = Path(args.dir).expanduser() if args.dir else default_cache_dir()
    items = cache.scan(root)
    if args.cache_cmd == "list":
        if args.json:
            out = [{"plugin": i.plugin, "kind": i.kind, "key": i.key, "path": str(i.path), "size": i.size,
                    "damaged": i.damaged, "created": (i.meta or {}).get("created"), "meta": i.meta} for i in items]
            print(json.dumps({"cache_dir": str(root), "entries": out, "total_size": sum(i.size for i in items)}, indent=2))
            return 0
        # plain aligned lines (greppable, and readable in 80 columns), the config summary last
        rows = [("plugin", "kind", "key", "size", "created", "config")]
        for i in items:
            summary = cache.config_summary(i.meta, 10_000) + (" (damaged: rebuilt on next use)" if i.damaged and i.meta else "")
            created = ((i.meta or {}).get("created") or "-")[:16].replace("T", " ")
            rows.append((i.plugin, i.kind, i.key, cache.human_size(i.size), created, summary))
        widths = [max(len(r[c]) for r in rows) for c in range(5)]
        console.print(f"cache folder {root}", markup=False, highlight=False)
        for r in rows if items else []:
            head = "  ".join(r[c].rjust(widths[c]) if c == 3 else r[c].ljust(widths[c]) for c in range(5))
            room = max(20, console.width - len(head) - 2)
            tail = r[5] if len(r[5]) <= room else r[5][: room - 1] + "…"
            console.print(f"{head}  {tail}", markup=False, highlight=False, soft_wrap=True)
        console.print(f"{len(items)} entries, {cache.human_size(sum(i.size for i in items))} in total")
        return 0
    chosen = cache.select(items, args.pattern)
    what = f"matching {args.pattern!r}" if args.pattern else "(everything)"
    if not chosen:
        console.print(f"nothing to remove {what} in {root}")
        return 0
    for i in chosen:
        console.print(f"remove {i.stem}  {cache.human_size(i.size)}", markup=False)
    total = sum(i.size for i in chosen)
    if not args.yes and sys.stdin.isatty():
        answer = input(f"remove {len(chosen)} entries {what}, {cache.human_size(total)}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            console.print("nothing removed")
            return 1
    freed = cache.clear(chosen)
    console.print(f"removed {len(chosen)} entries, freed {cache.human_size(freed)} ({freed} bytes)")
    return 0
