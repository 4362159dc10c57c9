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

from ..tables.rowwise import RowwiseAdagrad, RowwiseAdam, attach_row_holder, row_holder

__all__ = ["RowwiseAdagrad", "RowwiseAdam", "attach_row_holder", "row_holder"]
