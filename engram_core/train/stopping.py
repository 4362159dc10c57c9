"""Stopping a train stage between two steps when asked to by a signal.

The first SIGINT (Ctrl-C) or SIGTERM (`kill`, a scheduler's preemption, the results pipeline's
deadline) only asks: the loop finishes the step it is in, writes a checkpoint at that step and
stops as an interrupted run, so `--resume` goes on from there rather than from the last
`checkpoint_every` (a deadline that stopped a run 900 steps after its last checkpoint lost
those steps). A second signal stops at once, as Python's own Ctrl-C does, for a step that
takes long (the first one compiling, an evaluation). Only the main thread may set handlers,
and only a single-process run asks this way: under torchrun every rank would have to agree on
the step to stop at, so its ranks keep the default (the agent stops them; they resume from
the last periodic checkpoint). A signal this process ignores (SIG_IGN) stays ignored.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))


class StopBetweenSteps:
    """Context manager: `requested` turns true at the first SIGINT/SIGTERM; the second raises
    KeyboardInterrupt where the program is. The previous handlers come back on exit."""

    def __init__(self, note: Callable[[str], None], active: bool = True):
        self.note = note
        self.active = active
        self.requested = False
        self._saved: dict[int, object] = {}

    def __enter__(self) -> StopBetweenSteps:
        self.requested = False
        if self.active and threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._saved[sig] = signal.signal(sig, self._ask)
        return self

    def _ask(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.note(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint (send it again to stop now)")

    def __exit__(self, *exc) -> bool:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved.clear()
        return False
