"""How to print a command so that it runs as printed (hints after a run, resume lines)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def runnable(command: str) -> str:
    """`command` as it runs when typed: its name when the shell finds this environment's copy
    on PATH, else the copy's absolute path (a venv that is not activated: `.venv/bin/...`)."""
    import shutil

    here = Path(sys.executable).parent / command
    if not here.exists():
        return command
    found = shutil.which(command)
    if found is not None and os.path.realpath(found) == os.path.realpath(here):
        return command
    return str(here.absolute())
