"""Optimisers a recipe names (`optimizer = "..."` of a stage or a parameter group).

Plugins add optimisers through the ``engram_optimizers`` hook::

    @hookimpl
    def engram_optimizers(register):
        register("lion", lambda groups, stage: Lion(groups, lr=stage.lr, betas=stage.betas))

``factory(param_groups, stage)`` gets the torch parameter groups (each with ``params``,
``lr``, ``weight_decay`` and, for groups of the recipe's ``param_groups``, what they set)
and the `TrainStage`, and returns a `torch.optim.Optimizer`. The core registers
``adamw``, ``adam``, ``sgd``, ``sparse_adam`` and the row-wise table optimisers
``rowwise_adagrad`` and ``rowwise_adam`` (`engram_core.tables.rowwise`).
"""

from __future__ import annotations

import importlib
import warnings

# the row-wise optimisers and row holders moved to engram_core.tables.rowwise (an optional part
# the kernel does not import); their earlier names here import it on use, for one release
_MOVED = ("RowwiseAdagrad", "RowwiseAdam", "attach_row_holder", "row_holder")


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module 'engram_core.optim' has no attribute {name!r}")
    warnings.warn(f"engram_core.optim.{name} moved to engram_core.tables.rowwise.{name}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module("engram_core.tables.rowwise"), name)
