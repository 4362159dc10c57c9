#!/usr/bin/env python3
"""CI, second step: the HF-using tests against the OLDEST transformers and peft each plugin admits.

The first step (`python3 dev.py test` in a fresh venv) resolves the newest releases the open
ranges admit. This step reads the lower bounds from every plugin's pyproject.toml (its
dependencies and extras), pins them exactly, and runs only that plugin's test files
that use transformers or peft. Plugins with the same bounds share one install; one venv
(ENGRAM_OLDEST_VENV, default ./.venv-ci-oldest) is reused, with torch pinned as everywhere.
Only the standard library is used.
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
TORCH = "torch==2.13.0"  # the same wheel as the first step
HF = ("transformers", "peft")


def floors(pyproject: Path) -> dict[str, str]:
    """{package: lower bound} for the HF packages among the dependencies and every extra
    (an extra that asked for another bound than the rest would be untested: refused)."""
    proj = tomllib.loads(pyproject.read_text())["project"]
    reqs = list(proj.get("dependencies", []))
    for extra in proj.get("optional-dependencies", {}).values():
        reqs += list(extra)
    out: dict[str, str] = {}
    for req in reqs:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[[^]]*\])?\s*(.*)", req)
        name, spec = m.group(1).lower(), m.group(2)
        if name not in HF:
            continue
        low = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", spec)
        if low is None:
            sys.exit(f"oldest_hf: {pyproject}: {req!r} has no lower bound (>=) to test")
        if out.get(name, low.group(1)) != low.group(1):
            sys.exit(f"oldest_hf: {pyproject}: {name} has two lower bounds ({out[name]}, {low.group(1)}); use one")
        out[name] = low.group(1)
    return out


def hf_tests(plugin: Path) -> list[str]:
    """The plugin's test files that use transformers or peft."""
    files = sorted((plugin / "tests").glob("test_*.py"))
    return [str(f.relative_to(ROOT)) for f in files if re.search(r"\b(transformers|peft)\b", f.read_text())]


def sh(*cmd) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    rc = subprocess.call([str(c) for c in cmd], cwd=ROOT)
    if rc != 0:
        sys.exit(f"oldest_hf: failed ({rc}): {' '.join(map(str, cmd))}")


def core_group() -> tuple[list[str], list[str]]:
    """engram-core's own extras that use transformers (`lm`): (exact pins, its test files)."""
    pins = floors(ROOT / "pyproject.toml")
    extras = [e for e, reqs in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"].items()
              if e != "test" and any(re.match(rf"\s*({'|'.join(HF)})\b", r) for r in reqs)]
    if not pins or not extras:
        return [], []
    tests = [t for t in hf_tests(ROOT) if re.search(r"importorskip\(\"transformers\"\)|^\s*(from|import) transformers\b",
                                                     (ROOT / t).read_text(), re.M)]  # files that use it, not name it
    return [f"{n}=={v}" for n, v in sorted(pins.items())] + [f".[test,{','.join(extras)}]"], tests


def main() -> int:
    groups: dict[tuple, list[Path]] = {}
    for pp in sorted((ROOT / "plugins").glob("*/pyproject.toml")):
        pins = floors(pp)
        if pins and hf_tests(pp.parent):
            groups.setdefault(tuple(sorted(pins.items())), []).append(pp.parent)
    if not groups:
        print("oldest_hf: no plugin depends on transformers or peft")
        return 0
    t0 = time.perf_counter()
    if not (VENV / "bin" / "python").exists():
        venv.create(VENV, with_pip=True)
    py = VENV / "bin" / "python"
    core_pins, core_tests = core_group()
    if core_tests:  # engram-core's own transformers extra (engram_core.lm), before any plugin is installed
        *exact, core = core_pins
        print(f"== oldest: {', '.join(exact)} for engram-core{core[1:]}", flush=True)
        sh(py, "-m", "pip", "install", "--quiet", TORCH, *exact, "-e", core)
        sh(py, "-m", "pytest", "-q", "-p", "no:randomly", *core_tests)
    sh(py, "-m", "pip", "install", "--quiet", TORCH, "-e", ".[test]")
    installed: list[str] = []
    for pins, plugins in groups.items():
        if installed:  # the previous group's plugins may require newer HF releases than these pins
            sh(py, "-m", "pip", "uninstall", "--quiet", "-y", *installed)
            installed = []
        pkgs = []
        for p in plugins:
            proj = tomllib.loads((p / "pyproject.toml").read_text())["project"]
            installed.append(proj["name"])
            extra = "[test]" if "test" in proj.get("optional-dependencies", {}) else ""
            pkgs += ["-e", f"{p.relative_to(ROOT)}{extra}"]
        exact = [f"{name}=={ver}" for name, ver in pins]
        print(f"== oldest: {', '.join(exact)} for {', '.join(p.name for p in plugins)}", flush=True)
        sh(py, "-m", "pip", "install", "--quiet", TORCH, *exact, *pkgs)
        sh(py, "-c", "import importlib.metadata as m; print('   installed:', ', '.join(f'{p} {m.version(p)}' "
                     f"for p in {[n for n, _ in pins]!r}))")
        tests = [t for p in plugins for t in hf_tests(p)]
        sh(py, "-m", "pytest", "-q", "-p", "no:randomly", *tests)
    print(f"oldest_hf: all HF tests passed on the lowest bounds ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
