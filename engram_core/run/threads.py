"""CPU threads shared out between the engram runs of one machine (issue 32).

Each process of PyTorch takes as many intra-op threads as the machine has cores, so four
runs started together on 16 cores run 64 threads and spend their time waiting for each
other. Here every run registers itself in a per-user folder (one file per process id)
and takes ``cores // live runs`` threads; `rebalance` re-reads the folder, so runs that
start later shrink the earlier ones and runs that end give their cores back.

What wins, first to last (docs/decisions.md, "CPU threads and sweeps at once"):

1. `run.threads = N` in the recipe (N > 0);
2. `OMP_NUM_THREADS` in the environment, set by the user;
3. the automatic share: ``max(1, min(cap, cores // live))``, where `cores` is the CPUs
   this process may run on (`os.sched_getaffinity`), `live` the registered engram
   processes that are still alive (this one included) and `cap` the count torch chose at
   start (its own default, or the share an engram launcher put in `OMP_NUM_THREADS` with
   `ENGRAM_THREADS_AUTO=1` beside it), so a run alone uses exactly the threads it used
   before this module existed.

Every process registers, fixed or not, so that automatic runs count it. Nothing here may
fail a run: a folder that cannot be written leaves the process unregistered, counting
itself alone.
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

RUNTIME_DIR_ENV = "ENGRAM_RUNTIME_DIR"  # where the registry lives (tests; any folder of this host)
AUTO_ENV = "ENGRAM_THREADS_AUTO"  # "1": OMP_NUM_THREADS is a launcher's starting share, not the user's choice
REBALANCE_INTERVAL_S = 2.0  # the registry is read at most this often by `rebalance`


class _State:
    """This process's policy: the registered file, a fixed count or the automatic cap."""

    def __init__(self) -> None:
        self.registered: Path | None = None
        self.registered_pid: int | None = None
        self.fixed: int | None = None
        self.cap: int | None = None  # torch's own count, read before this module first changes it
        self.last_scan = 0.0
        self.unregisters_at_exit = False


_state = _State()


# ---- the registry ------------------------------------------------------------------------------


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask: taskset, cgroups' cpusets, Slurm)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def registry_dir() -> Path:
    """`$ENGRAM_RUNTIME_DIR/procs`, else `<tmp>/engram-<uid>/procs`.

    Not `$XDG_RUNTIME_DIR`: a run started from cron or a service has none, so it would not
    see the runs started from a shell, and systemd deletes it at the user's last logout,
    under the `nohup` runs still going."""
    if os.environ.get(RUNTIME_DIR_ENV):
        return Path(os.environ[RUNTIME_DIR_ENV]) / "procs"
    user = os.getuid() if hasattr(os, "getuid") else getpass.getuser()
    return Path(tempfile.gettempdir()) / f"engram-{user}" / "procs"


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (/proc/PID/stat, field 22), or ""
    where /proc cannot say: with it a recycled process id is not taken for a live run."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[-1].split()[19]  # fields after the command name start at field 3
    except (OSError, IndexError):
        return ""


def _alive(pid: int, started: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user (a shared ENGRAM_RUNTIME_DIR)
        return True
    except OSError:
        return False
    return not started or _start_time(pid) in ("", started)


def _owned_by_me(folder: Path) -> bool:
    """A folder in a shared /tmp that another user made first is not trusted (nor written)."""
    try:
        return not hasattr(os, "getuid") or folder.stat().st_uid == os.getuid()
    except OSError:
        return False


def register() -> Path | None:
    """Write this process's file (once per process id); None where the folder is unusable."""
    pid = os.getpid()
    if _state.registered is not None and _state.registered_pid == pid:
        return _state.registered
    _state.registered, _state.registered_pid = None, pid  # a forked child registers itself anew
    folder = registry_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not _owned_by_me(folder):
            return None
        path = folder / str(pid)
        path.write_text(_start_time(pid))
    except OSError:
        return None
    _state.registered = path
    if not _state.unregisters_at_exit:
        atexit.register(unregister)
        _state.unregisters_at_exit = True
    return path


def unregister() -> None:
    """Remove this process's file (at exit; also safe to call twice)."""
    path = _state.registered
    if path is None or _state.registered_pid != os.getpid():
        return
    _state.registered = None
    try:
        path.unlink()
    except OSError:
        pass


def live_processes() -> int:
    """Registered engram processes still alive (this one included); dead ones' files are removed."""
    me = os.getpid()
    count = 1
    try:
        entries = list(registry_dir().iterdir())
    except OSError:
        return count
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            started = entry.read_text().strip()
        except (OSError, ValueError):  # removed by its process meanwhile, or not one of ours
            continue
        if _alive(int(entry.name), started):
            count += 1
        else:
            try:
                entry.unlink()
            except OSError:
                pass
    return count


# ---- the policy --------------------------------------------------------------------------------


def _explicit_env_threads() -> int | None:
    """OMP_NUM_THREADS as the user set it (a launcher's share, marked by ENGRAM_THREADS_AUTO, is not)."""
    if os.environ.get(AUTO_ENV) == "1":
        return None
    try:
        n = int(os.environ.get("OMP_NUM_THREADS", "").strip())
    except ValueError:  # unset, or a value torch itself ignores ("4,2" nested lists)
        return None
    return n if n > 0 else None


def share(live: int | None = None) -> int:
    """The automatic count: max(1, min(cap, cores // live))."""
    cap = _state.cap if _state.cap is not None else torch.get_num_threads()
    live = live_processes() if live is None else live
    return max(1, min(cap, cpu_count() // max(1, live)))


def configure(run_threads: int = 0) -> int:
    """Register this process and set torch's intra-op threads by the policy above; returns
    the count. Called before a run builds anything (data generation uses the threads too);
    `release` undoes both. `shared` is the two as a `with` block."""
    if _state.cap is None:  # the first of nested calls keeps torch's own count, to restore
        _state.cap = torch.get_num_threads()
    register()
    _state.fixed = run_threads if run_threads > 0 else _explicit_env_threads()
    _state.last_scan = time.monotonic()
    n = _state.fixed if _state.fixed is not None else share()
    _set(n)
    return n


def release() -> None:
    """The run is over: unregister (an idle notebook or test session that ran one does not
    hold a share) and give torch back the count it had before `configure`."""
    unregister()
    if _state.cap is not None:
        _set(_state.cap)
    _state.cap, _state.fixed = None, None


@contextlib.contextmanager
def shared(run_threads: int = 0) -> Iterator[int]:
    """`with shared(recipe.run.threads):` around one run: `configure`, then `release`."""
    n = configure(run_threads)
    try:
        yield n
    finally:
        release()


def rebalance() -> int | None:
    """Re-read the registry (at most every REBALANCE_INTERVAL_S) and move this process to its
    share; returns the new count when it changed, else None. Cheap enough for every log step:
    a fixed count, or a call within the interval, returns at once."""
    if _state.fixed is not None or _state.cap is None:
        return None
    now = time.monotonic()
    if now - _state.last_scan < REBALANCE_INTERVAL_S:
        return None
    _state.last_scan = now
    n = share()
    return n if _set(n) else None


def _set(n: int) -> bool:
    if torch.get_num_threads() == n:
        return False
    torch.set_num_threads(n)
    return True


def child_env(jobs: int, env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one of `jobs` runs a launcher starts at once: OMP_NUM_THREADS =
    max(1, cores // jobs) as their starting share (marked automatic, so they still rebalance),
    unless the user set OMP_NUM_THREADS, which is passed on untouched."""
    env = dict(os.environ if env is None else env)
    if "OMP_NUM_THREADS" in env and env.get(AUTO_ENV) != "1":
        return env
    env["OMP_NUM_THREADS"] = str(max(1, cpu_count() // max(1, jobs)))
    env[AUTO_ENV] = "1"
    return env


__all__ = ["configure", "release", "shared", "rebalance", "share", "live_processes", "register", "unregister", "registry_dir",
           "cpu_count", "child_env", "AUTO_ENV", "RUNTIME_DIR_ENV"]
