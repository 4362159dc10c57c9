"""The run directory: recipe.toml, env.json, metrics.jsonl, summary.json, checkpoints/.

Every file a user may rely on is written atomically (temporary file, then rename),
so a run killed at any moment leaves either the old or the new version.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "last.pt"


def new_run_dir(out_dir: str | Path, name: str, suffix: str = "", create: bool = True) -> Path:
    """runs/<name>/<timestamp>-<short id><suffix>/ (created unless create=False)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(out_dir) / name / f"{stamp}-{secrets.token_hex(3)}{suffix}"
    if create:
        path.mkdir(parents=True, exist_ok=False)
    return path


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
    raise FileExistsError(f"no free temporary name in {folder}")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = _temporary(path.parent, f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


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
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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


def load_checkpoint(run_dir: Path) -> dict | None:
    path = Path(run_dir) / "checkpoints" / CHECKPOINT
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


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
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
            f.flush()


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
