"""Start-up time of the commands that train nothing: `engram --help`, a shell completion
(TAB), `engram plugins`, `engram validate`.

Each command runs as a fresh process, as a user's shell runs it; the commands alternate
(round-robin) and repeat, so a burst of load on a shared machine does not fall on one
command only. Printed and saved as JSON (benchmarks/results/startup-cpu.json).

    python benchmarks/startup.py               # 5 rounds
    python benchmarks/startup.py --rounds 10 --out /tmp/startup.json
    git worktree add /tmp/engram-base 2825d68 && python benchmarks/startup.py --baseline-src /tmp/engram-base
        # the same commands with another checkout's engram_core first on PYTHONPATH, alternating
        # with this one's in every round ("baseline" in the JSON)

Goals (docs/cli.md): `engram --help` <= 0.3 s, a TAB <= 0.5 s once the completion cache is
warm (the first TAB after installing or editing a plugin pays the plugin imports once).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent


def _completion_env(line: str, reply: Path) -> dict[str, str]:
    """The environment bash's completion function gives the command (argcomplete's protocol)."""
    return {"_ARGCOMPLETE": "1", "_ARGCOMPLETE_SHELL": "bash", "COMP_LINE": line, "COMP_POINT": str(len(line)),
            "_ARGCOMPLETE_STDOUT_FILENAME": str(reply), "_ARGCOMPLETE_SUPPRESS_SPACE": "1", "COMP_TYPE": "9"}


def commands(reply: Path) -> dict[str, tuple[list[str], dict[str, str]]]:
    engram, engram_run = str(BIN / "engram"), str(BIN / "engram-run")
    return {
        "engram --help": ([engram, "--help"], {}),
        "engram-run --help": ([engram_run, "--help"], {}),
        "TAB: engram describe memory res<TAB>": ([engram], _completion_env("engram describe memory res", reply)),
        "TAB: engram-run recipes/minimal.toml stages.0.<TAB>": ([engram_run], _completion_env("engram-run recipes/minimal.toml stages.0.", reply)),
        "engram plugins": ([engram, "plugins"], {}),
        "engram validate recipes/minimal.toml": ([engram, "validate", "recipes/minimal.toml"], {}),
    }


def time_once(cmd: list[str], extra_env: dict[str, str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, env={**env, **extra_env}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"startup.py: {' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()[-300:]}")
    return wall


def _rows(times: dict[str, list[float]]) -> dict[str, dict]:
    return {name: {"median_s": round(statistics.median(t), 3), "min_s": round(min(t), 3), "max_s": round(max(t), 3),
                   "runs_s": [round(x, 3) for x in t]} for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (each runs every command once)")
    p.add_argument("--out", type=Path, default=RESULTS / "startup-cpu.json")
    p.add_argument("--baseline-src", type=Path, metavar="DIR", help="another checkout: its engram_core is timed too, alternating")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "ENGRAM_CACHE": os.environ.get("ENGRAM_CACHE", str(Path(tmp) / "cache")),
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        cmds = commands(Path(tmp) / "reply")
        cache = Path(env["ENGRAM_CACHE"]) / "completion.json"
        cache.unlink(missing_ok=True)
        cold = {name: time_once(cmd, extra, env) for name, (cmd, extra) in cmds.items() if name.startswith("TAB")}
        base_env = None
        if args.baseline_src:
            base_env = {**env, "PYTHONPATH": str(args.baseline_src.resolve()), "ENGRAM_CACHE": str(Path(tmp) / "base-cache")}
        times: dict[str, list[float]] = {name: [] for name in cmds}
        base_times: dict[str, list[float]] = {name: [] for name in cmds}
        for _ in range(args.rounds):  # round-robin: every command once per round (and the baseline's after it)
            for name, (cmd, extra) in cmds.items():
                times[name].append(time_once(cmd, extra, env))
                if base_env is not None:
                    base_times[name].append(time_once(cmd, extra, base_env))
    rows = _rows(times)
    for name, wall in cold.items():
        rows[name]["first_tab_s"] = round(wall, 3)  # the completion cache empty: pays the plugin imports once
    result = {"benchmark": "startup", "rounds": args.rounds, "python": platform.python_version(),
              "machine": platform.machine(), "cpus": os.cpu_count(), "commands": rows,
              "goals_s": {"engram --help": 0.3, "TAB (warm cache)": 0.5}}
    if base_env is not None:
        result["baseline"] = {"src": str(args.baseline_src), "commands": _rows(base_times)}
    width = max(map(len, rows))
    print(f"{'command'.ljust(width)}  median    min    max")
    for name, r in rows.items():
        cold_note = f"  (first TAB {r['first_tab_s']:.2f} s)" if "first_tab_s" in r else ""
        base = result.get("baseline", {}).get("commands", {}).get(name)
        base_note = f"  (baseline median {base['median_s']:.2f} s)" if base else ""
        print(f"{name.ljust(width)}  {r['median_s']:6.2f} {r['min_s']:6.2f} {r['max_s']:6.2f}{cold_note}{base_note}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
