#!/usr/bin/env python3
"""Set up a development environment and run engram, in one command each.

    python3 dev.py run                   # make .venv, install core + every plugin, run recipes/rollout_vmf.toml
    python3 dev.py test                  # the same set-up, then the whole test suite (pytest)
    python3 dev.py setup                 # only the set-up
    python3 dev.py tensorboard RUN_DIR   # the venv's TensorBoard on a run (or sweep) directory
    python3 dev.py engram ARGS...        # the venv's `engram` (plugins, describe, validate, report, ...)
    python3 dev.py engram-run ARGS...    # the venv's `engram-run` (any recipe, --resume RUN_DIR, ...)

Only the standard library is used here, so this works on a fresh machine with Python 3.11.
The venv is ./.venv (override with ENGRAM_VENV). Extra arguments go to engram-run / pytest.
Instead of the last three forms you can activate the venv once (`source .venv/bin/activate`)
and type `tensorboard`, `engram` and `engram-run` directly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("ENGRAM_VENV", ROOT / ".venv"))
TORCH = "torch==2.13.0"  # pinned first: an open range would pull a multi-GB CUDA build
HEADLINE = "recipes/rollout_vmf.toml"
FALLBACK = "recipes/minimal.toml"


def bin_path(name: str) -> Path:
    return VENV / ("Scripts" if os.name == "nt" else "bin") / name


COMMANDS = ("run", "test", "setup", "tensorboard", "engram", "engram-run")


def sh(*cmd: str | Path, echo: bool = True) -> int:
    """Run `cmd`; on Ctrl-C let it finish its own clean-up, then re-raise KeyboardInterrupt."""
    if echo:
        print("+", " ".join(map(str, cmd)), flush=True)
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # the terminal sent SIGINT to the whole process group: the child stops by itself
        # (engram-run writes its checkpoint, pytest its summary); wait for it, then go
        try:
            proc.wait(timeout=30)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        raise


def packages() -> list[str]:
    """Core (with test extras), every plugin under plugins/, and the example plugin."""
    pkgs = ["-e", ".[test]"]
    for d in sorted((ROOT / "plugins").glob("*/pyproject.toml")):
        extra = "[test]" if _has_test_extra(d) else ""  # e.g. transformers for audio-mimi's export tests
        pkgs += ["-e", f"{d.parent.relative_to(ROOT)}{extra}"]
    for d in sorted((ROOT / "examples").glob("*/pyproject.toml")):
        pkgs += ["-e", str(d.parent.relative_to(ROOT))]
    return pkgs


def _has_test_extra(pyproject: Path) -> bool:
    import tomllib

    data = tomllib.loads(pyproject.read_text())
    return "test" in data.get("project", {}).get("optional-dependencies", {})


def _pyprojects_digest() -> str:
    import hashlib

    files = [ROOT / "pyproject.toml", *sorted(ROOT.glob("plugins/*/pyproject.toml")), *sorted(ROOT.glob("examples/*/pyproject.toml"))]
    return hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]


def setup() -> None:
    stamp = VENV / ".engram-installed"
    # the stamp covers every pyproject too, so a pull that adds a dependency reinstalls
    wanted = " ".join(packages()) + " " + _pyprojects_digest()
    if stamp.exists() and stamp.read_text() == wanted:
        return
    if not bin_path("python").exists():
        print(f"creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    py = bin_path("python")
    steps = [
        [py, "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
        [py, "-m", "pip", "install", "--quiet", TORCH],
        [py, "-m", "pip", "install", "--quiet", TORCH, *packages()],
    ]
    for cmd in steps:
        if sh(*cmd) != 0:
            sys.exit(f"dev.py: installing failed: {' '.join(map(str, cmd))}")
    stamp.write_text(wanted)


def main(argv: list[str]) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # one line, no traceback; 130 = 128 + SIGINT, as shells report it
        print("dev.py: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "tensorboard" and (not rest or rest[0].startswith("-")):
        print("dev.py tensorboard: give a run or sweep directory (python3 dev.py tensorboard runs/minimal/<id>)", file=sys.stderr)
        return 2
    setup()
    if cmd == "setup":
        return 0
    if cmd == "tensorboard":
        return sh(bin_path("tensorboard"), "--logdir", rest[0], *rest[1:])
    if cmd in ("engram", "engram-run"):
        return sh(bin_path(cmd), *rest, echo=False)  # its output only: `dev.py engram plugins --json | jq`
    if cmd == "run":
        recipe = HEADLINE if (ROOT / HEADLINE).exists() else FALLBACK
        return sh(bin_path("engram-run"), recipe, *rest)
    rc = sh(bin_path("python"), "-m", "pytest", *rest)
    if rc == 5:  # pytest: no tests collected; not a failure of the code under test
        print("dev.py: pytest collected no tests")
        return 0
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
