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

Placements (`register_placement` adds one without touching this module):

- ``device``: an `nn.Embedding` on the model's device. `weight` is the full table, in
  the state dict as ``<prefix>weight``; `.to()`, dtype casts and any optimiser work as on
  an `nn.Embedding` (it is one).
- ``host``: rows in (pinned) host memory, gathered into a device buffer ahead of the
  forward (`engram_core.tables.host_rows`); trained by a row-wise optimiser
  (`engram_core.optim`). The state dict holds the rows under the same key, so a
  checkpoint of one placement loads into the other.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import ConfigError


class DeviceRowTable(nn.Embedding):
    """The whole table as one `nn.Embedding` (dense or sparse gradients)."""

    placement = "device"

    def __init__(self, num_rows: int, dim: int, sparse: bool = False):
        super().__init__(num_rows, dim, sparse=sparse)
        self.register_load_state_dict_pre_hook(_drop_held_optimizer_state)

    @property
    def full_weight(self) -> torch.Tensor:
        return self.weight

    def set_dtype(self, dtype: torch.dtype) -> None:
        """Keep the master rows in `dtype` (reads are cast by the caller)."""
        self.to(dtype)

    def prefetch(self, rows: torch.Tensor) -> None:
        """Nothing to do: every row is already where the forward reads it."""

    def stats(self) -> dict[str, float]:
        return {}


def _drop_held_optimizer_state(module, state_dict, prefix, *args) -> None:
    """A checkpoint of a placement that keeps the rows' optimiser state beside them (host)
    loads here too: the rows load, that state is left out (here it is the optimiser's)."""
    for key in [k for k in state_dict if k.startswith(prefix + "optimizer.")]:
        del state_dict[key]


RowTableFactory = Callable[..., nn.Module]
PLACEMENTS: dict[str, RowTableFactory | None] = {"device": DeviceRowTable}


def register_placement(name: str, factory: RowTableFactory) -> None:
    """Make `make_row_table(name, ...)` build `factory(num_rows, dim, sparse=...)`."""
    PLACEMENTS[name] = factory


def make_row_table(placement: str, num_rows: int, dim: int, sparse: bool = False) -> nn.Module:
    """The row table of `placement`; an unknown or unimplemented one is a ConfigError
    on the key ``placement`` naming those that work."""
    factory = PLACEMENTS.get(placement)
    if factory is None:
        ready = ", ".join(repr(k) for k, v in PLACEMENTS.items() if v is not None)
        what = "is not implemented yet" if placement in KNOWN_PLACEMENTS else "is not a placement"
        raise ConfigError("placement", f"{placement!r} {what}; use one of {ready}")
    return factory(num_rows, dim, sparse=sparse)


# every placement a config may name; those without a factory yet are refused at build time
KNOWN_PLACEMENTS = ("device", "host", "sharded")



from . import host_rows  # noqa: E402,F401  (registers the "host" placement)
