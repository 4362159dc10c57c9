"""The ``device`` placement: the whole table as one `nn.Embedding` on the model's device."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .rowwise import reading_rows, wants_row_gradients


class DeviceRowTable(nn.Embedding):
    """The whole table as one `nn.Embedding`. Its gradient is sparse (the rows read) with
    `sparse=True`, or while a row-wise optimiser updates it in backward
    (`engram_core.tables.rowwise`: no dense table-sized gradient on CUDA by default);
    dense otherwise."""

    placement = "device"

    def __init__(self, num_rows: int, dim: int, sparse: bool = False):
        super().__init__(num_rows, dim, sparse=sparse)
        self.register_load_state_dict_pre_hook(_drop_held_optimizer_state)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        sparse = self.sparse
        # no gradient (generate, evaluation): a plain read, which a compiled decode step keeps
        # in its graph instead of breaking it at every layer with a memory
        if not sparse and torch.is_grad_enabled() and self.weight.requires_grad and wants_row_gradients(self.weight):
            if torch.compiler.is_compiling():
                return read_rows_eagerly(rows, self.weight)
            sparse = reading_rows(self.weight)
        return F.embedding(rows, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, sparse)

    @property
    def row_gradients(self) -> bool:
        """Whether this forward's gradient is made as rows (sparse)."""
        return self.sparse or wants_row_gradients(self.weight)

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


@torch.compiler.disable
def read_rows_eagerly(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`weight[rows]` with a sparse gradient, outside any compiled graph: inductor cannot
    lower a sparse gradient ("Cannot access storage of SparseTensorImpl"), so under
    torch.compile a table read with row gradients is a graph break, and the rest of the
    forward stays compiled. Cheaper than the alternative, a dense table-sized gradient."""
    return F.embedding(rows, weight, sparse=reading_rows(weight))
