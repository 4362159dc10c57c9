"""Hook specifications of the pluggy project ``engram``: one hook per kind of component.

A plugin is a module with functions marked ``@hookimpl``; each receives a
``register(name, factory, config_cls, *, provides=(), requires=(), offers=())``
callback. Plugins are found through the entry-point group ``engram``::

    [project.entry-points.engram]
    my-plugin = "my_package.plugin"
"""

import pluggy

PROJECT = "engram"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

KINDS = ("datasets", "heads", "memories", "objectives", "metrics")


@hookspec
def engram_datasets(register):
    """Register data sets: ``register("zdyn", ZdynDataset, ZdynConfig)``."""


@hookspec
def engram_heads(register):
    """Register heads; pass ``provides=("dynamics",)`` and ``offers=("residual",)``."""


@hookspec
def engram_memories(register):
    """Register memory types; ``provides`` names the attachment points they fit."""


@hookspec
def engram_objectives(register):
    """Register objectives; ``requires`` names capabilities the head/memory must provide."""


@hookspec
def engram_metrics(register):
    """Register metrics; ``requires`` as for objectives."""


@hookspec
def engram_loggers(register):
    """Register experiment trackers that `run.loggers` can name:
    ``register("wandb", factory, modules=("wandb",), install="engram-core[wandb]")``.
    ``factory(ctx)`` gets an `engram_core.run.loggers.LoggerContext` and returns an
    `engram_core.run.loggers.Logger`; `modules` are checked before the run starts, and a missing
    one is a one-line error telling the user to ``pip install`` `install`."""


@hookspec
def engram_optimizers(register):
    """Register optimisers that a stage's or a parameter group's `optimizer` can name:
    ``register("lion", factory, help="...")``. ``factory(param_groups, stage)`` gets the
    torch parameter groups and the `engram_core.recipe.TrainStage` and returns a
    `torch.optim.Optimizer` (see `engram_core.optim`). ``holds_rows=True``: it can train
    tables whose rows live outside their parameter (`engram_core.tables.rowwise.RowHolder`)."""
