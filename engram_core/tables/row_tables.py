"""Row tables: where the rows of a large embedding table live, behind one small protocol.

A memory that reads rows of a big table by address (hashed n-gram memory, any
embedding table whose addresses depend on ids only) holds a `RowTable` and calls it
like an `nn.Embedding`:

    table = make_row_table("device", num_rows, dim, sparse=False)
    vectors = table(rows)            # rows (N,) or (..., H) int64 -> (..., dim)
    table.full_weight                # every row (Tensor), wherever it lives: fit, content scans
    table.weight                     # the Parameter an optimiser is given (see placements)
    table.prefetch(rows)             # rows the next forward will read (a hint; may be a no-op)
    table.stats()                    # placement telemetry for `memory/...` tags

Placements (registered through the ``engram_placements`` hook; the core registers these):

- ``device``: an `nn.Embedding` on the model's device. `weight` is the full table, in
  the state dict as ``<prefix>weight``; `.to()`, dtype casts and any optimiser work as on
  an `nn.Embedding` (it is one).
- ``host``: rows in (pinned) host memory, gathered into a device buffer ahead of the
  forward (`engram_core.tables.host_rows`); trained by a row-wise optimiser
  (`engram_core.tables.rowwise`). The state dict holds the rows under the same key, so a
  checkpoint of one placement loads into the other.
"""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError, did_you_mean
from ..registry import load_registry


def make_row_table(placement: str, num_rows: int, dim: int, sparse: bool = False) -> nn.Module:
    """The row table of `placement`, a name registered through the ``engram_placements`` hook;
    an unknown one is a ConfigError on the key ``placement`` naming those there are."""
    known = placements()
    entry = known.get(placement)
    if entry is None:
        raise ConfigError("placement", f"{placement!r} is not a placement{did_you_mean(placement, known)}; use one of {', '.join(map(repr, known))}")
    return entry.factory(num_rows, dim, sparse=sparse)


def placements() -> dict:
    """Every registered placement, by name (`engram_core.registry.Extension`)."""
    return load_registry().extensions["placements"]


def known_placement(inst, attribute, value) -> None:
    """An attrs validator: `value` names a registered placement."""
    known = placements()
    if value not in known:
        raise ConfigError(attribute.name, f"must be one of {', '.join(map(repr, known))}, got {value!r}{did_you_mean(str(value), known)}")


# the placements engram-core registers (engram_core.tables.plugin); plugins may add more
KNOWN_PLACEMENTS = ("device", "host", "sharded")
