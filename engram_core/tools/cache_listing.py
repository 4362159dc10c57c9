"""What `engram cache list` and `engram cache clear` read and remove: the entries of a cache folder."""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs

from ..cache import KEY_CHARS, META_SUFFIX
from ..cache import path_size as _size
from ..cache import remove_path as _remove

# ---- listing and clearing ----------------------------------------------------------------


@attrs.define
class Listed:
    """An artefact found on disk, with its sidecar's contents (None where it has none)."""

    plugin: str
    name: str  # <kind>-<key16>[.<ext>]
    path: Path
    meta: dict | None
    size: int  # bytes on disk, sidecar included
    damaged: bool = False  # no sidecar, an unreadable one, a size that disagrees, a left-over temp

    @property
    def kind(self) -> str:
        if self.name.startswith("."):
            return "(temp)"
        return (self.meta or {}).get("kind") or self.name.rsplit("-", 1)[0]

    @property
    def key(self) -> str:
        if self.name.startswith("."):
            return self.name
        return (self.meta or {}).get("key", "")[:KEY_CHARS] or self.name.rsplit("-", 1)[-1].split(".")[0]

    @property
    def stem(self) -> str:
        """`plugin/kind-key16`, what `engram cache clear PATTERN` matches."""
        if self.name.startswith("."):
            return f"{self.plugin}/{self.name}"
        return f"{self.plugin}/{self.kind}-{self.key}"

    def files(self) -> list[Path]:
        return [self.path, self.path.parent / (self.path.name + META_SUFFIX)]


def scan(cache_dir: Path | str) -> list[Listed]:
    """Every artefact under `cache_dir/<plugin>/`, with its sidecar where it has one."""
    root = Path(cache_dir)
    out: list[Listed] = []
    if not root.is_dir():
        return out
    for plugin_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for p in sorted(plugin_dir.iterdir()):
            if p.name.endswith(META_SUFFIX):
                art = plugin_dir / p.name[: -len(META_SUFFIX)]
                if not art.exists():  # a sidecar whose artefact is gone
                    out.append(Listed(plugin_dir.name, art.name, art, None, p.stat().st_size, True))
                continue
            side = plugin_dir / (p.name + META_SUFFIX)
            meta = None
            try:
                meta = json.loads(side.read_text(encoding="utf-8")) if side.is_file() else None
            except (OSError, ValueError):
                meta = None
            meta = meta if isinstance(meta, dict) else None
            try:
                art = _size(p)
                size = art + (side.stat().st_size if side.exists() else 0)
            except OSError:
                continue
            damaged = p.name.startswith(".") or meta is None or meta.get("size") != art
            out.append(Listed(plugin_dir.name, p.name, p, meta, size, damaged))
    return out


def select(items: Iterable[Listed], pattern: str | None) -> list[Listed]:
    """Items whose `plugin/kind-key16` (or plugin/file name) matches the glob `pattern`."""
    if not pattern:
        return list(items)
    pat = pattern.rstrip("/")
    if "/" not in pat:
        pat = pat + "/*" if not any(c in pat for c in "*?[") else pat
    return [i for i in items if fnmatch.fnmatchcase(i.stem, pat) or fnmatch.fnmatchcase(f"{i.plugin}/{i.name}", pat)]


def clear(items: Iterable[Listed]) -> int:
    """Remove the items (artefact and sidecar); returns the bytes freed."""
    freed = 0
    for i in items:
        freed += i.size
        for f in i.files():
            if f.exists() or f.is_symlink():
                _remove(f)
    return freed


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def config_summary(meta: dict | None, width: int = 60) -> str:
    """A short `key=value, ...` line of an entry's scalar config values (nested keys dotted), then the seed."""
    if not meta:
        return "(no sidecar: incomplete, or left by an older engram)"
    parts: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}{k}.", v)
        elif not isinstance(value, list) or len(value) <= 4:
            parts.append(f"{prefix[:-1]}={json.dumps(value) if isinstance(value, list) else value}")

    walk("", meta.get("config") or {})
    parts.append(f"seed={meta.get('seed')}")
    text = ", ".join(parts)
    return text if len(text) <= width else text[: width - 1] + "…"
