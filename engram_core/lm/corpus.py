"""The offline text corpus: the Python standard library's own source files.

Every machine with Python has them, so a general language model can be pretrained here
with nothing downloaded. Files are split whole into train / val / test by a hash of their
path relative to the standard library (90 / 5 / 5 in hundredths), so a file and its
docstrings sit in one split only, and the split of a file never depends on which other
files exist. The corpus differs between Python versions (3.11 here, 3.12 on the GPU
machine): its digest (every path, size and content hash) keys every artefact built on it.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from pathlib import Path

import attrs

from ..config import field

SPLITS = ("train", "val", "test")
SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__", "idlelib", "turtledemo", "lib2to3"}
TEST_DIRS = {"test", "tests", "idle_test"}


@attrs.frozen
class CorpusConfig:
    """Which standard-library files make the corpus."""

    include_tests: bool = field(False, help="also the test suites (Lib/test, */tests): about 3x the text")
    max_file_kb: int = field(256, help="skip files larger than this (generated tables)")
    max_files: int = field(0, help="at most this many files per split, evenly spaced by path (0 = all; quick trials)")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative_path: str) -> str:
    """'train', 'val' or 'test' from the path alone (sha256, so stable across machines)."""
    bucket = int(hashlib.sha256(relative_path.encode()).hexdigest()[:8], 16) % 100
    return "train" if bucket < 90 else "val" if bucket < 95 else "test"


def corpus_files(cfg: CorpusConfig, root: Path | None = None) -> dict[str, list[Path]]:
    """The corpus's files per split, each list sorted by relative path."""
    root = root or stdlib_root()
    out: dict[str, list[Path]] = {s: [] for s in SPLITS}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        parts = set(rel.parts[:-1])
        if parts & SKIPPED_DIRS or (not cfg.include_tests and parts & TEST_DIRS):
            continue
        if path.stat().st_size > cfg.max_file_kb * 1024:
            continue
        out[split_of(rel.as_posix())].append(path)
    if cfg.max_files:
        out = {s: files[:: max(1, len(files) // cfg.max_files)][: cfg.max_files] for s, files in out.items()}
    return out


def read_text(path: Path) -> str:
    # a few stdlib files hold bytes that are not UTF-8 on purpose (encoding tests)
    return path.read_text(encoding="utf-8", errors="replace")


def corpus_digest(cfg: CorpusConfig, root: Path | None = None) -> dict:
    """What the corpus is, for cache keys: the Python version and a sha256 over every file's
    relative path, split and content."""
    root = root or stdlib_root()
    h = hashlib.sha256()
    counts = {}
    for split, files in corpus_files(cfg, root).items():
        counts[split] = len(files)
        for path in files:
            h.update(f"{split}\0{path.relative_to(root).as_posix()}\0".encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return {"python": f"{sys.version_info.major}.{sys.version_info.minor}", "files": counts, "sha256": h.hexdigest()}
