"""The ``device`` placement: the whole table as one `nn.Embedding` on the model's device."""

from __future__ import annotations

import torch
from torch import nn


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
