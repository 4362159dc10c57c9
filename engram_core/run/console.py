"""What the commands print: errors as one line each, lines to copy, the summary table of the
final metrics and the sweep's Markdown tables."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import EngramError, RecipeError
from .commands import runnable


def fail(exc: EngramError, show_traceback: bool = False) -> int:
    """An EngramError as `error: ...` lines on stderr; the exit status to return."""
    from ..train.validate import ComponentError

    if show_traceback and isinstance(exc, ComponentError):
        print(exc.stack(), file=sys.stderr, end="")
    lines = exc.lines() if isinstance(exc, RecipeError) else [str(exc)]
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    if isinstance(exc, ComponentError) and not show_traceback:
        print("(run again with --traceback for the whole stack)", file=sys.stderr)
    return exc.exit_code


def hint(console: Console, text: str) -> None:
    """A line to copy (a command, a path): never wrapped, never styled, even in CI logs."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def print_summary(console: Console, summary: dict, run_dir: Path) -> None:
    """The final table (one column per evaluation stage, each metric's better direction, a
    value that moved against it since the previous stage flagged) and the next commands."""
    stages = {k: v for k, v in (summary.get("stages") or {}).items() if v}
    if stages:
        from .metric_info import for_run

        info = for_run(run_dir)
        title = f"{summary['name']}: final metrics ({summary['status']}, {summary['steps']} steps, {summary['wall_time_s']:.0f}s)"
        hint(console, title)  # a title line of its own: never broken across lines
        table, worse = summary_table(stages, info)
        _print_unwrapped(console, table)
        legend = "↑ higher is better, ↓ lower is better"
        if len(stages) > 1:
            legend += "; (worse): moved against its direction since the previous stage"
        hint(console, legend)
        if worse:
            hint(console, f"got worse: {', '.join(worse)}")
    hint(console, f"run directory: {run_dir}")
    hint(console, f"review it:     {runnable('tensorboard')} --logdir {run_dir}")


def summary_table(stages: dict[str, dict], info) -> tuple[Table, list[str]]:
    """The rich Table of `print_summary`, and the tags that got worse between stages."""
    from .metric_info import got_worse

    tags: list[str] = []
    for res in stages.values():
        tags += [t for t in res if t not in tags]
    groups: dict[str, list[str]] = {}
    for t in tags:  # rows by the tag's prefix (the first appearance orders them), costs last
        groups.setdefault("cost" if info.of(t).is_cost else t.split("/")[0], []).append(t)
    order = sorted(groups, key=lambda g: g == "cost")
    table = Table()
    table.add_column("metric")
    table.add_column("", justify="center")  # ↑ / ↓
    for s in stages:
        table.add_column(s, justify="right")
    worse: list[str] = []
    names = list(stages)
    for gi, group in enumerate(order):
        if gi:
            table.add_section()
        for t in groups[group]:
            ti = info.of(t)
            cells = []
            for i, s in enumerate(names):
                cell = _fmt(stages[s].get(t))
                before = next((stages[p].get(t) for p in reversed(names[:i]) if stages[p].get(t) is not None), None)
                if got_worse(ti, before, stages[s].get(t)):
                    cell += " (worse)"
                    if t not in worse:
                        worse.append(t)
                cells.append(cell)
            table.add_row(escape(t), ti.arrow, *cells)
    return table, worse


def _print_unwrapped(console: Console, renderable) -> None:
    """In a log or a pipe (no terminal width to respect) a table is printed at its natural
    width rather than squeezed into 80 columns."""
    if console.is_terminal:
        console.print(renderable)
    else:
        natural = console.measure(renderable, options=console.options.update_width(10_000)).maximum
        width = console.width
        console.width = max(width, natural)  # print(width=) cannot exceed the console's width
        try:
            console.print(renderable)
        finally:
            console.width = width


def print_markdown_tables(console: Console, markdown: str) -> None:
    """sweep.md on the console: its Markdown tables as tables, headings as bold lines, the
    rest as text (a log gets aligned columns, not pipes and dashes)."""
    rows: list[list[str]] = []

    def flush() -> None:
        if rows:
            table = Table()
            for col in rows[0]:
                table.add_column(escape(col), overflow="fold")
            for r in rows[2:]:  # rows[1] is the |---| separator
                table.add_row(*(escape(c) for c in r))
            _print_unwrapped(console, table)
            rows.clear()

    for line in markdown.splitlines():
        if line.startswith("|") and line.endswith("|"):
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line[1:-1])]
            rows.append(cells)
            continue
        flush()
        if line.startswith("#"):
            console.print(line.lstrip("#").strip(), style="bold", markup=False, highlight=False, soft_wrap=True)
        elif line.strip():
            console.print(line.replace("`", ""), markup=False, highlight=False, soft_wrap=True)
    flush()


def _fmt(v) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1e5 or (v != 0 and abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4f}"
