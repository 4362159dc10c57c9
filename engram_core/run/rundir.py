"""The run directory: recipe.toml, env.json, metrics.jsonl, summary.json, checkpoints/.

Every file a user may rely on is written atomically (temporary file, then rename),
so a run killed at any moment leaves either the old or the new version.
"""

from __future__ import annotations

import errno
import json
import math
import os
import platform
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import EngramError, RecipeError

CHECKPOINT = "last.pt"
# Written into every run (and sweep) directory the engine makes: `--resume` refuses a folder
# without it, so it never trains in (and overwrites) a folder the user made by hand.
RUN_MARKER = ".engram-run"


class RunDirError(EngramError):
    """A run directory that cannot be made, read or resumed (one line, exit 2)."""


class DiskError(EngramError):
    """A file of the run could not be written (disk full, read-only, no permission): the run stops (exit 1)."""

    exit_code = 1


def new_run_dir(out_dir: str | Path, name: str, suffix: str = "", create: bool = True) -> Path:
    """runs/<name>/<timestamp>-<short id><suffix>/ (created and marked unless create=False).

    The name is checked here too (not only in the recipe): a recipe file called `...toml`
    has the stem `..`, which must never put a run directory beside `out_dir`.
    """
    check_run_name(name)
    check_out_dir(out_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(out_dir) / name / f"{stamp}-{secrets.token_hex(3)}{suffix}"
    if create:
        make_run_dir(path, exist_ok=False)
    return path


MAX_RUN_NAME_BYTES = 200


def run_name_problem(name: str) -> str | None:
    """Why `name` cannot be one folder under out_dir (never a path that leaves it), or None."""
    if name in ("", ".", "..") or any(c in name for c in "/\\") or name.startswith("~") or "\0" in name:
        return (f"must be a plain folder name (no '/', '\\', '..' or '~'), got {name!r}; "
                "use run.out_dir to choose where runs go")
    if len(name.encode("utf-8")) > MAX_RUN_NAME_BYTES:
        return (f"is {len(name.encode('utf-8'))} bytes long; a run name must fit in {MAX_RUN_NAME_BYTES} bytes "
                "(its folder also holds a time stamp and an id, and file systems allow 255): shorten it")
    return None


def check_run_name(name: str) -> None:
    """The run's folder name (run.name, else the recipe file's stem) stays one folder under out_dir."""
    problem = run_name_problem(name)
    if problem:
        raise RecipeError([("run.name", f"{problem} (without run.name, the recipe file's name is used)")])


def check_out_dir(out_dir: str | Path) -> None:
    """run.out_dir (--out) is a folder that exists or can be made, and can be written to."""
    out = Path(out_dir).expanduser()
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        what = "is a file" if existing == out else f"cannot be made: {existing} is a file"
        raise RecipeError([("run.out_dir", f"{out} {what}, not a folder; give --out (run.out_dir) a folder")])
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == out else f" ({existing}, where it would be made)"
        raise RecipeError([("run.out_dir", f"{out} is not writable{where}; give --out (run.out_dir) a folder you can write to")])


def make_run_dir(path: str | Path, exist_ok: bool = True) -> Path:
    """Create a run directory (and its parents) and mark it as the engine's."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
    except FileExistsError:
        raise
    except OSError as exc:
        raise RecipeError([("run.out_dir", f"cannot make the run directory {path}: {exc.strerror or exc}; "
                                          "give --out (run.out_dir) a folder you can write to")]) from None
    mark_run_dir(path)
    return path


def mark_run_dir(path: str | Path) -> None:
    """Write the marker that says the engine made this folder (kept if already there)."""
    marker = Path(path) / RUN_MARKER
    if marker.exists():
        return
    note = {"made_by": "engram", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "note": "engram-run --resume only resumes folders holding this file"}
    try:
        atomic_write_json(marker, note)
    except DiskError as exc:
        raise RecipeError([("run.out_dir", str(exc))]) from None


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / RUN_MARKER).is_file()


def check_resumable_dir(path: str | Path) -> None:
    """--resume only ever trains in a folder the engine made (else: one line, nothing touched)."""
    path = Path(path)
    if not path.is_dir():
        raise RunDirError(f"--resume: no such run directory: {path}")
    if not is_run_dir(path):
        hint = ("it has no recipe.toml either" if not (path / "recipe.toml").exists()
                else "a recipe.toml alone does not make a run directory")
        raise RunDirError(f"--resume: {path} is not a run directory made by engram-run (no {RUN_MARKER} marker; {hint}); "
                          "nothing was changed; to run a recipe there, give the recipe file: engram-run RECIPE --out DIR")


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp")


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the `.<file>.<id>.tmp` files a killed run left in its directory and checkpoints/.

    Called before a run starts writing (a new run, a resume): no writer of this run is
    alive then, so every such file is a leftover (and can be as large as a checkpoint).
    """
    removed = []
    run_dir = Path(run_dir)
    for folder in (run_dir, run_dir / "checkpoints"):
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            if _is_temporary(f.name) and f.is_file():
                f.unlink(missing_ok=True)
                removed.append(f)
    return removed


def _temporary(folder: Path, prefix: str) -> tuple[int, str]:
    """A new temporary file beside the target, created with the user's umask.

    `tempfile.mkstemp` makes files owner-only (0600); run files are shared like any
    other file the user writes, so they get 0666 minus the umask, as `open` gives.
    """
    for _ in range(100):
        tmp = str(Path(folder) / f"{prefix}{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise disk_error(Path(folder) / prefix.strip("."), exc) from None
    raise FileExistsError(f"no free temporary name in {folder}")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# faults of the disk, not of the program: said in one line, never as a traceback
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG, errno.ENAMETOOLONG}
# of those, the ones only a write meets (what the CLI reports as a disk fault wherever it arises)
WRITE_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG}


def disk_error(path: Path, exc: OSError) -> BaseException:
    """A disk fault while writing `path` as a one-line DiskError (other OSErrors unchanged)."""
    if exc.errno not in DISK_ERRNOS:
        return exc
    fix = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (disk quota exceeded)",
           errno.EROFS: "the file system is read-only; use another --out"}.get(exc.errno, "check the folder's permissions and the disk")
    return DiskError(f"cannot write {path}: {exc.strerror or exc} (errno {exc.errno}); {fix}, then resume with: "
                     f"engram-run --resume {_run_dir_of(path)}")


def _run_dir_of(path: Path) -> Path:
    path = Path(path)
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = _temporary(path.parent, f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise disk_error(path, exc) from None
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    """JSON that every reader accepts: NaN and ±inf (which `json` would write as bare
    `NaN`/`Infinity`, not JSON) are written as null (docs/cli.md, "Faults and what they leave")."""
    text = json.dumps(finite_json(data), indent=2, sort_keys=False, default=_json_default, allow_nan=False)
    atomic_write_text(path, text + "\n")


def finite_json(data: Any) -> Any:
    """`data` with every non-finite float (and 0-d tensor) replaced by None."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v) for v in data]
    if isinstance(data, torch.Tensor):
        return finite_json(data.tolist())
    return data


def read_json(path: Path, what: str) -> dict:
    """A JSON file of a run directory, or one line saying it is damaged."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path}: damaged {what} (not valid JSON: {exc}); it was not changed") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path}: damaged {what} (expected a JSON object, got {type(data).__name__}); it was not changed")
    return data


def read_summary(path: Path) -> dict | None:
    """summary.json as a dict; None when it is missing or damaged (a torn or edited file)."""
    try:
        return read_json(path, "summary.json") if Path(path).exists() else None
    except RunDirError:
        return None


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def save_checkpoint(run_dir: Path, state: dict) -> Path:
    ckpt_dir = Path(run_dir) / "checkpoints"
    ckpt_dir.mkdir(exist_ok=True)
    final = ckpt_dir / CHECKPOINT
    fd, tmp = _temporary(ckpt_dir, ".last.")
    os.close(fd)
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)  # a full disk gets its space back before summary.json is written
        cause = exc if isinstance(exc, OSError) else exc.__cause__ or exc.__context__
        if isinstance(cause, OSError) and cause.errno in DISK_ERRNOS:  # torch.save wraps the OSError in a RuntimeError
            raise disk_error(final, cause) from None
        raise
    return final


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of floating-point tensors in a state dict that hold NaN or inf (checked, not assumed)."""
    bad = []
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.device.type != "meta":
            if value.is_sparse:
                value = value.coalesce().values()
            if not torch.isfinite(value).all():
                bad.append(name)
    return bad


CHECKPOINT_KEYS = ("stage_index", "stage_step", "stage_done", "global_step", "model")


def load_checkpoint(run_dir: Path) -> dict | None:
    """checkpoints/last.pt, or None; a damaged one (torn, truncated, another file) is one line."""
    path = Path(run_dir) / "checkpoints" / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a torn zip, a pickle or garbage
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0][:120]
        raise RunDirError(f"{path}: damaged checkpoint, cannot be read ({type(exc).__name__}: {reason}); nothing was changed; "
                          "restore it from a copy, or start the run again from its recipe.toml") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise RunDirError(f"{path}: not an engram checkpoint (missing {', '.join(missing)}); nothing was changed; "
                          "restore it from a copy, or start the run again from its recipe.toml")
    return state


class MetricsLog:
    """metrics.jsonl: one JSON object per evaluation, appended and flushed."""

    def __init__(self, path: Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly  # ranks other than 0 of a distributed run keep records, write nothing
        self.records: list[dict] = []
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    try:
                        self.records.append(json.loads(line))
                    except json.JSONDecodeError:
                        break  # a torn last line from a kill

    def truncate(self, n: int) -> None:
        """Keep the first `n` records (those a checkpoint knows about)."""
        self.records = self.records[:n]
        if self.readonly:
            return
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict) -> None:
        self.records.append(record)
        if self.readonly:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=_json_default) + "\n")
                f.flush()
        except OSError as exc:
            raise disk_error(self.path, exc) from None


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(registry, device: torch.device) -> dict:
    plugins = {
        name: {"version": info.version, "distribution": info.dist, "broken": info.error}
        for name, info in registry.plugins.items()
    }
    env = {
        "engram_core": registry.plugins["core"].version,
        "plugins": plugins,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "git_commit": git_commit(Path(__file__).resolve().parent),
        "command": sys.argv,
        "cwd": os.getcwd(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return env
