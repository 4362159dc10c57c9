#!/usr/bin/env python3
"""CI, third step: the core's optional trackers and completion on the OLDEST releases its
pyproject admits (wandb, mlflow-skinny from the extras; argcomplete from the dependencies).

Reads the lower bounds (>=) from pyproject.toml, pins them exactly in the oldest venv
(ENGRAM_OLDEST_VENV, shared with .ci/oldest_hf.py; torch pinned as everywhere) and runs
the tests that use them. Only the standard library is used.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("ENGRAM_OLDEST_VENV", ROOT / ".venv-ci-oldest"))
TORCH = "torch==2.13.0"
PACKAGES = ("wandb", "mlflow-skinny", "argcomplete")
TESTS = ["tests/test_loggers.py", "tests/test_completion.py"]


def floors() -> dict[str, str]:
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(proj["dependencies"]) + [r for extra in proj["optional-dependencies"].values() for r in extra]
    out: dict[str, str] = {}
    for req in reqs:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[[^]]*\])?\s*(.*)", req)
        name = m.group(1).lower()
        if name not in PACKAGES:
            continue
        low = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", m.group(2))
        if low is None:
            sys.exit(f"oldest_extras: {req!r} has no lower bound (>=) to test")
        if out.get(name, low.group(1)) != low.group(1):
            sys.exit(f"oldest_extras: {name} has two lower bounds ({out[name]}, {low.group(1)}); use one")
        out[name] = low.group(1)
    missing = set(PACKAGES) - set(out)
    if missing:
        sys.exit(f"oldest_extras: no bound for {', '.join(sorted(missing))} in pyproject.toml")
    return out


def sh(*cmd) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    rc = subprocess.call([str(c) for c in cmd], cwd=ROOT)
    if rc != 0:
        sys.exit(f"oldest_extras: failed ({rc}): {' '.join(map(str, cmd))}")


def main() -> int:
    t0 = time.perf_counter()
    if not (VENV / "bin" / "python").exists():
        venv.create(VENV, with_pip=True)
    py = VENV / "bin" / "python"
    exact = [f"{n}=={v}" for n, v in sorted(floors().items())]
    print(f"== oldest: {', '.join(exact)}", flush=True)
    sh(py, "-m", "pip", "install", "--quiet", TORCH, "-e", ".[test]", *exact)
    sh(py, "-c", "import importlib.metadata as m; print('   installed:', ', '.join(f'{p} {m.version(p)}' "
                 f"for p in {list(PACKAGES)!r}))")
    sh(py, "-m", "pytest", "-q", "-p", "no:randomly", *TESTS)
    print(f"oldest_extras: tracker and completion tests passed on the lowest bounds ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
