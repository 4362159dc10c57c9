#!/usr/bin/env python3
"""Set up a development environment and run engram, in one command each.

    python3 dev.py run     # make .venv, install core + every plugin, run recipes/rollout_vmf.toml
    python3 dev.py test    # the same set-up, then the whole test suite (pytest)

Only the standard library is used here, so this works on a fresh machine with Python 3.11.
The venv is ./.venv (override with ENGRAM_VENV). Extra arguments go to engram-run / pytest.
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


def sh(*cmd: str | Path) -> int:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.call([str(c) for c in cmd], cwd=ROOT)


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
    if not argv or argv[0] not in ("run", "test", "setup"):
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    setup()
    if cmd == "setup":
        return 0
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
