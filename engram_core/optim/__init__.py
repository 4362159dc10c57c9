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

from collections.abc import Callable
from typing import Any

import attrs

from ..errors import PluginError
from ..tables.rowwise import RowwiseAdagrad, RowwiseAdam, attach_row_holder, row_holder

__all__ = ["RowwiseAdagrad", "RowwiseAdam", "attach_row_holder", "row_holder", "OptimizerEntry", "registered_optimizers"]


@attrs.frozen
class OptimizerEntry:
    name: str
    plugin: str
    factory: Callable[[list[dict], Any], Any]
    help: str = ""
    holds_rows: bool = False  # can train rows kept outside their parameter (engram_core.tables.rowwise.RowHolder)


def registered_optimizers(registry) -> dict[str, OptimizerEntry]:
    """Every optimiser the loaded plugins register through ``engram_optimizers``."""
    found: dict[str, OptimizerEntry] = {}
    for impl in registry.pm.hook.engram_optimizers.get_hookimpls():
        plugin = impl.plugin_name

        def register(name, factory, *, help="", holds_rows=False, _plugin=plugin):
            if name in found:
                raise PluginError(f"optimizer '{name}' is registered twice: by {found[name].plugin} and by {_plugin}")
            found[name] = OptimizerEntry(name, _plugin, factory, help, bool(holds_rows))

        impl.function(register=register)
    return found
