"""Progress display: a rich bar on a terminal, a plain line every ~10% otherwise (CI, logs).

Lines are never wrapped at the console's width (80 columns when there is no terminal): a
log keeps one line per event, which grep and a later reader can rely on."""

from __future__ import annotations

import re
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

_DURATION = re.compile(r" \(\d+(\.\d+)?s\)")


class Progress:
    def __init__(self, console: Console | None = None, enabled: bool = True):
        self.console = console or Console(highlight=False)
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self._bar: RichProgress | None = None
        self._task = None
        self._last_note: str | None = None

    def start(self, stage: str, total: int, done: int = 0) -> None:
        self.stage, self.total, self.t0, self.done0 = stage, total, time.perf_counter(), done
        self._next_line = done + max(1, total // 10)
        if not self.enabled:
            return
        if self.live:
            self._bar = RichProgress(
                TextColumn(f"[bold]{stage}[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("{task.fields[rate]} it/s"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(stage, total=total, completed=done, loss="-", rate="-")
        else:
            self._line(f"stage {stage}: {total} steps" + (f" (resuming at {done})" if done else ""))

    def update(self, done: int, loss: float) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        rate = (done - self.done0) / elapsed if elapsed > 0 else 0.0
        if self._bar is not None:
            self._bar.update(self._task, completed=done, loss=f"{loss:.4g}", rate=f"{rate:.1f}")
        elif done >= self._next_line or done == self.total:
            eta = (self.total - done) / rate if rate > 0 else 0.0
            self._line(f"  [{self.stage}] step {done}/{self.total}  loss {loss:.4g}  {rate:.1f} it/s  eta {eta:.0f}s")
            self._next_line = done + max(1, self.total // 10)

    def note(self, text: str) -> None:
        """A line above the bar (or in the log). The same line twice in a row is printed once:
        the evaluation that ends a train stage and an eval stage right after it at the same
        step report the same numbers (only the time they took, "(0.4s)", may differ)."""
        same = _DURATION.sub("", text)
        if not self.enabled or same == self._last_note:
            return
        self._last_note = same
        if self._bar is not None:
            self._bar.console.print(f"  {text}", markup=False, highlight=False, soft_wrap=True)
        else:
            self._line(f"  {text}")

    def _line(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def stop(self) -> None:
        self.finish()
