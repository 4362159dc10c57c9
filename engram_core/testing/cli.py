"""Run the CLI in-process from a test, like `subprocess.run` but without the start-up cost.

    from engram_core.testing.cli import run_cli
    r = run_cli("recipes/minimal.toml", "--dry-run")            # engram-run
    r = run_cli("describe", "head", "mlp_gaussian", tool="engram")
    assert r.returncode == 0, r.stderr

`plugins` sets ENGRAM_PLUGINS for the call (default: "" = only the core, hermetic); pass
None to load every installed plugin. The registry cache is cleared before and after.
"""

from __future__ import annotations

import contextlib
import io
import os

import attrs


@attrs.define
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args, plugins: str | None = "", env: dict[str, str] | None = None, tool: str = "engram-run") -> CliResult:
    from .. import registry
    from ..cli import main, run_main

    changes = dict(env or {})
    if plugins is not None:
        changes["ENGRAM_PLUGINS"] = plugins
    saved = {k: os.environ.get(k) for k in [*changes, "ENGRAM_PLUGINS"]}
    os.environ.update(changes)
    if plugins is None:
        os.environ.pop("ENGRAM_PLUGINS", None)
    registry._cached = None
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            fn = run_main if tool == "engram-run" else main
            code = fn([str(a) for a in args])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        registry._cached = None
    return CliResult(code, out.getvalue(), err.getvalue())
