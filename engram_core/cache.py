"""Cached artefacts that cannot lie: one keyed, atomic, self-describing cache for every plugin.

Generated data sets, pretrained readers, synthetic stores: anything a plugin builds once and
reuses across runs goes through `entry` + `load_or_build`::

    from engram_core import cache

    e = cache.entry(build.cache_dir, plugin="deq-hrr", kind="needle", config=cfg, seed=cfg.seed,
                    version=2, builder=generate_needle, ext="pt")
    data = cache.load_or_build(e, make, save_fn=lambda d, p: torch.save(d, p),
                               load_fn=lambda p: torch.load(p, weights_only=True))

The key
-------
An entry's key is the sha256 of the canonical JSON (sorted keys, no whitespace, no NaN) of

    kind       what the artefact is ("needle", "reader", ...), plus the plugin
    config     the builder's FULL resolved config (an attrs instance or plain data), every key
               included, defaults too: a setting the key leaves out is a setting under which
               one recipe can be handed another's artefact
    seed       the seed (or None where the builder is deterministic without one)
    inputs     anything else that determines the content and is not in the config: a digest
               of a model's initial weights, of a generator's state, of a data file, the key
               of the upstream cached artefact it was built from
    version    an explicit integer the builder declares; bump it in the same commit that
               changes what the builder produces
    source     a sha256 of the builder's source code (`inspect.getsource` of each function,
               class or module passed as `builder`)

The explicit version says "the output changed" on purpose; the source digest is the safety
net for a forgotten bump: any edit of the builder's code (a comment too) misses the cache.
A spurious miss costs one rebuild; a false hit costs a wrong result, so we accept the misses.
What the source digest cannot see (code the builder calls but was not listed, the versions of
torch or numpy) is recorded in the sidecar, not keyed: list every module whose code shapes
the artefact in `builder`.

Files
-----
``<cache>/<plugin>/<kind>-<key16>.<ext>`` (a file or a folder, e.g. a zarr store) and the
sidecar ``<same>.meta.json``: plugin, kind, the full key, config, seed, inputs, version,
source digest, created time, size, torch/python versions. The artefact is written to a
temporary name and moved into place with `os.replace`, then the sidecar (atomically, with
`engram_core.run.rundir.atomic_write_json`); an entry counts as present only when its sidecar
names the same full key and the artefact has the recorded size. Anything else (a killed
writer, a truncated file, a sidecar from another key, a load that raises) is a damaged entry:
it is rebuilt, never trusted.

Every lookup logs one line on stdout: ``cache hit <plugin>/<kind> <key16>`` or
``cache miss ... (building)`` (not under ``engram-run --quiet`` or ``--dry-run``). `ENGRAM_CACHE` chooses the folder
(`engram_core.components.default_cache_dir`); ``engram cache list`` and ``engram cache clear``
inspect and prune it.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import inspect
import json
import math
import os
import platform
import shutil
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from .run.rundir import atomic_write_json

META_SUFFIX = ".meta.json"


KEY_CHARS = 16  # of the sha256 hex digest, in file names (the sidecar holds all 64)


# ---- canonical JSON and digests ----------------------------------------------------------


def _plain(obj: Any) -> Any:
    """Plain JSON data for `obj`; raises TypeError for anything without an exact encoding."""
    if attrs.has(type(obj)):
        return {f.name: _plain(getattr(obj, f.name)) for f in attrs.fields(type(obj))}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"cache key: dict keys must be str or int, got {type(k).__name__}")
            out[str(k)] = _plain(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted((_plain(v) for v in obj), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return repr(obj)  # "nan", "inf": JSON has no literal for them
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return _plain(obj.value)
    if hasattr(obj, "item") and hasattr(obj, "ndim") and obj.ndim == 0:  # numpy / torch scalars
        return _plain(obj.item())
    raise TypeError(f"cache key: cannot encode {type(obj).__name__} exactly; pass plain data or a digest")


def canonical_json(obj: Any) -> str:
    """Sorted keys, no whitespace, attrs instances as dicts: equal data, equal text."""
    return json.dumps(_plain(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def sha256_hex(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def source_digest(builder: Any) -> str:
    """sha256 of the source of a function, class or module (or a list of them), in order."""
    items = list(builder) if isinstance(builder, (list, tuple)) else [builder]
    if not items:
        raise ValueError("cache: `builder` must name the code that builds the artefact")
    h = hashlib.sha256()
    for b in items:
        if isinstance(b, (types.FunctionType, types.MethodType, type, types.ModuleType)):
            try:
                src = inspect.getsource(b)
            except (OSError, TypeError):  # no source shipped: the compiled code still tells edits apart
                src = _compiled(b)
            name = getattr(b, "__qualname__", None) or b.__name__
            h.update(f"{getattr(b, '__module__', b.__name__)}:{name}\n".encode())
            h.update(src.encode())
        else:
            raise TypeError(f"cache: builder must be a function, class or module, got {type(b).__name__}")
    return h.hexdigest()


def _compiled(b: Any) -> str:
    if isinstance(b, types.ModuleType) and getattr(b, "__file__", None):
        return sha256_hex(Path(b.__file__).read_bytes())
    code = getattr(b, "__code__", None)
    if code is not None:
        return sha256_hex(code.co_code + repr(code.co_consts).encode())
    raise TypeError(f"cache: cannot read the source of {b!r}")


def tensors_digest(tensors: dict) -> str:
    """sha256 of a state_dict (names, dtypes, shapes and bytes of every tensor), name-sorted."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            h.update(f"{name}={canonical_json(t)}\n".encode())
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def generator_digest(generator) -> str:
    """sha256 of a torch.Generator's full state (not just its initial seed)."""
    return sha256_hex(generator.get_state().numpy().tobytes())


# ---- entries -----------------------------------------------------------------------------


def path_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@attrs.define
class Entry:
    """One cached artefact. `root` None means caching is off: `path` is None, nothing is kept."""

    root: Path | None
    plugin: str
    kind: str
    key: str  # full sha256 hex
    ext: str
    meta: dict  # what the key was made of (written to the sidecar)

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.key[:KEY_CHARS]}" + (f".{self.ext}" if self.ext else "")

    @property
    def label(self) -> str:
        return f"{self.plugin}/{self.kind} {self.key[:KEY_CHARS]}"

    @property
    def path(self) -> Path | None:
        return None if self.root is None else Path(self.root) / self.plugin / self.name

    @property
    def meta_path(self) -> Path | None:
        return None if self.root is None else Path(self.root) / self.plugin / (self.name + META_SUFFIX)

    def read_meta(self) -> dict | None:
        if self.meta_path is None or not self.meta_path.is_file():
            return None
        try:
            meta = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def exists(self) -> bool:
        """True only for a complete entry: the sidecar names this key and the size matches."""
        if self.path is None or not self.path.exists():
            return False
        meta = self.read_meta()
        if meta is None or meta.get("key") != self.key:
            return False
        try:
            return path_size(self.path) == meta.get("size")
        except OSError:
            return False

    def remove(self) -> None:
        if self.path is not None:
            remove_path(self.path)
            self.meta_path.unlink(missing_ok=True)

    def commit(self, tmp: Path) -> None:
        """Move a finished artefact at `tmp` (same folder) into place, then write the sidecar."""
        path = self.path
        if path.exists():
            if self.exists():  # another process finished first: keep its entry, others may be reading it
                remove_path(tmp)
                return
            # an incomplete left-over: move it aside in one step (a folder cannot be replaced), then drop it;
            # its sidecar goes first, so it never describes the artefact that replaces it
            self.meta_path.unlink(missing_ok=True)
            trash = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, trash)
            remove_path(trash)
        try:
            os.replace(tmp, path)
        except OSError:
            # another process put a folder there first; keep theirs if it is complete
            remove_path(tmp)
            if self.exists():
                return
            raise
        import torch

        meta = dict(self.meta)
        meta.update(
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            size=path_size(path),
            torch=torch.__version__,
            python=platform.python_version(),
        )
        atomic_write_json(self.meta_path, meta)


def entry(
    cache_dir: Path | str | None,
    *,
    plugin: str,
    kind: str,
    config: Any,
    seed: int | None,
    version: int,
    builder: Any,
    ext: str,
    inputs: dict | None = None,
) -> Entry:
    """The cache entry for one artefact (see the module doc for what the key covers).

    `config` is the builder's full resolved config (attrs instance or plain data); `builder`
    the function(s), class(es) or module(s) whose source builds it; `inputs` further
    content-determining values (digests). `cache_dir` None: caching off, the key is still made.
    """
    if not isinstance(version, int) or isinstance(version, bool):
        raise TypeError("cache: `version` must be an int (bump it when the builder changes)")
    for label, value in (("plugin", plugin), ("kind", kind)):
        if not value or any(c in value for c in "/\\*?[] ") or value.startswith("."):
            raise ValueError(f"cache: bad {label} {value!r} (a plain name is needed)")
    meta = {
        "plugin": plugin,
        "kind": kind,
        "config": _plain(config),
        "seed": seed,
        "inputs": _plain(inputs or {}),
        "version": version,
        "source": source_digest(builder),
    }
    key = sha256_hex(canonical_json(meta))
    meta = {"key": key, **meta}
    return Entry(Path(cache_dir) if cache_dir is not None else None, plugin, kind, key, ext.lstrip("."), meta)


_LOG = [True]


def log(msg: str) -> None:
    # stdout, beside the run's progress: stderr is kept for errors (one line per problem)
    if _LOG[-1]:
        print(f"cache {msg}", flush=True)


@contextlib.contextmanager
def logging_to_stdout(on: bool):
    """Print (or not) the hit/miss lines inside the block; `engram-run --quiet` turns them off."""
    _LOG.append(bool(on))
    try:
        yield
    finally:
        _LOG.pop()


def load_or_build(
    e: Entry,
    build_fn: Callable[[], Any],
    save_fn: Callable[[Any, Path], None],
    load_fn: Callable[[Path], Any],
) -> Any:
    """Load `e` if it is present and sound, else build, save (atomically) and return it.

    `save_fn(value, tmp_path)` writes the artefact to `tmp_path` (a file or a folder it
    creates); `load_fn(path)` reads it back. A load that raises counts as a damaged entry
    and is rebuilt. With caching off (`e.root` None) this is just `build_fn()`.
    """
    if e.path is None:
        return build_fn()
    if e.exists():
        try:
            value = load_fn(e.path)
        except Exception as exc:  # noqa: BLE001 - a damaged entry is rebuilt, never trusted
            log(f"damaged {e.label} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}), rebuilding")
            e.meta_path.unlink(missing_ok=True)  # it looked complete but cannot be read: no longer an entry
        else:
            log(f"hit {e.label}")
            return value
    with _build_lock(e):  # concurrent runs build an entry once: the others wait, then load it
        if e.exists():
            try:
                value = load_fn(e.path)
            except Exception:  # noqa: BLE001 - rebuilt below
                e.meta_path.unlink(missing_ok=True)
            else:
                log(f"hit {e.label} (built by another run)")
                return value
        elif e.path.exists() or e.meta_path.exists():
            log(f"damaged {e.label} (incomplete entry), rebuilding")
        else:
            log(f"miss {e.label} (building)")
        value = build_fn()
        save(e, value, save_fn)
        return value


@contextlib.contextmanager
def _build_lock(e: Entry):
    """An exclusive advisory lock (flock) on `<cache>/.locks/<plugin>-<entry>.lock`, held while it is
    checked, built and written; where flock does not exist (Windows) builds may race, and the
    atomic commit still keeps whichever complete entry came first."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    locks = Path(e.root) / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{e.plugin}-{e.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def save(e: Entry, value: Any, save_fn: Callable[[Any, Path], None]) -> None:
    """Write `value` as entry `e` (temp name, then os.replace, then the sidecar)."""
    if e.path is None:
        return
    folder = e.path.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{e.name}.", suffix=".tmp")) / ("artefact." + (e.ext or "bin"))
    try:
        save_fn(value, tmp)
        if not tmp.exists():
            raise RuntimeError(f"cache: save_fn wrote nothing for {e.label}")
        e.commit(tmp)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)
