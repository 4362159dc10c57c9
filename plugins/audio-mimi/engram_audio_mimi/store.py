"""The `zdyn` zarr store: one float32 (T, D) array per utterance, each with its speaker.

Layout (zarr format 3)::

    <store>/                      attrs: {"format": "engram-zdyn", "version": 1, "dim": D,
                                          "frame_rate": Hz or null, "source": "..."}
    <store>/utterances/<utt_id>   float32 (T, D); attrs: {"speaker": "<speaker id>"}

The export script and the synthetic default both write this layout; `read_store`
checks it and raises `ConfigError` naming what is missing.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import zarr

from engram_core.config import ConfigError

FORMAT = "engram-zdyn"
VERSION = 1


def write_store(
    path: str | Path,
    utterances: Iterable[tuple[str, str, np.ndarray]],
    *,
    frame_rate: float | None = None,
    source: str = "",
) -> Path:
    """Write `(utterance id, speaker id, z (T, D))` triples; returns the path."""
    path = Path(path)
    root = zarr.open_group(str(path), mode="w")
    group = root.create_group("utterances")
    dim = None
    count = 0
    for utt, speaker, z in utterances:
        z = np.asarray(z, dtype=np.float32)
        if z.ndim != 2:
            raise ValueError(f"utterance {utt}: expected a (T, D) array, got shape {z.shape}")
        if dim is None:
            dim = int(z.shape[1])
        elif z.shape[1] != dim:
            raise ValueError(f"utterance {utt}: dimension {z.shape[1]} differs from {dim}")
        arr = group.create_array(str(utt), data=z, chunks=z.shape)
        arr.attrs["speaker"] = str(speaker)
        count += 1
    root.attrs.update(
        {
            "format": FORMAT,
            "version": VERSION,
            "dim": dim,
            "frame_rate": frame_rate,
            "source": source,
            "n_utterances": count,
        }
    )
    return path


def read_store(path: str | Path, key: str = "path") -> tuple[list[str], list[str], list[np.ndarray], dict]:
    """(utterance ids, speaker ids, arrays, root attrs) of a zdyn store, sorted by id."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(key, f"zarr store does not exist: {path}")
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for "not a group"
        raise ConfigError(key, f"{path} is not a zarr group ({type(exc).__name__}: {exc})") from None
    if "utterances" not in set(root.group_keys()):
        have = sorted(list(root.array_keys()) + list(root.group_keys()))
        raise ConfigError(
            key,
            f"{path} has no 'utterances' group of per-utterance (T, D) arrays "
            f"(found: {', '.join(have) or 'nothing'}); write it with engram-audio-export",
        )
    group = root["utterances"]
    names = sorted(group.array_keys())
    if not names:
        raise ConfigError(key, f"{path}/utterances holds no arrays")
    ids, speakers, arrays = [], [], []
    dim = None
    for name in names:
        arr = group[name]
        if arr.ndim != 2:
            raise ConfigError(key, f"{path}/utterances/{name}: expected a (T, D) array, got shape {arr.shape}")
        if "speaker" not in arr.attrs:
            raise ConfigError(key, f"{path}/utterances/{name} has no 'speaker' attribute")
        if dim is None:
            dim = arr.shape[1]
        elif arr.shape[1] != dim:
            raise ConfigError(key, f"{path}/utterances/{name}: D = {arr.shape[1]} differs from D = {dim} of the others")
        if arr.shape[1] < 1:
            raise ConfigError(key, f"{path}/utterances/{name}: expected a (T, D) array with D >= 1, got shape {arr.shape}")
        values = np.asarray(arr[...], dtype=np.float32)  # float64 past float32's range becomes inf here, as training sees it
        bad = ~np.isfinite(values)
        if bad.any():  # found when the data set is built (validate too), not as a NaN loss at some step
            t, d = (int(x) for x in np.argwhere(bad)[0])
            raise ConfigError(key, f"{path}/utterances/{name}: non-finite value {values[t, d]} at [frame {t}, dim {d}], "
                                   f"the first of {int(bad.sum())} in this utterance; clean or drop it and export the store again")
        ids.append(name)
        speakers.append(str(arr.attrs["speaker"]))
        arrays.append(values)
    return ids, speakers, arrays, dict(root.attrs)
