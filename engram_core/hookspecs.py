"""Hook specifications of the pluggy project ``engram``: one hook per kind of thing a plugin adds.

A plugin is a module with functions marked ``@hookimpl``; each receives a ``register``
callback. Components (the five kinds) take
``register(name, factory, config_cls, *, provides=(), requires=(), points=())``:
`provides`/`requires` name capabilities (what a head, data set or memory can do; what an
objective, metric or memory needs), `points` name attachment points (those a head offers,
those a memory attaches at);
extensions (optimisers, loggers, placements, commands) take ``register(name, factory, **options)``
(`engram_core.registry.Extension`). Every hook goes through the one registry
(`engram_core.registry`), which calls each plugin's hooks once, when it loads, and isolates a
broken plugin. Plugins are found through the entry-point group ``engram``::

    [project.entry-points.engram]
    my-plugin = "my_package.plugin"
"""

import pluggy

PROJECT = "engram"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

KINDS = ("datasets", "heads", "memories", "objectives", "metrics")
EXTENSIONS = ("optimizers", "loggers", "placements", "commands")


@hookspec
def engram_datasets(register):
    """Register data sets: ``register("zdyn", ZdynDataset, ZdynConfig)``."""


@hookspec
def engram_heads(register):
    """Register heads; pass capabilities ``provides=("dynamics",)`` and the attachment points it
    offers, ``points=("residual",)``."""


@hookspec
def engram_memories(register):
    """Register memory types; ``points`` names the attachment points they fit (and ``provides``
    any capability they add, ``requires`` any they need from the head or data set)."""


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


@hookspec
def engram_placements(register):
    """Register where a large table's rows may live (a memory's `placement` key):
    ``register("host", factory, help="...")``. ``factory(num_rows, dim, sparse=False)`` returns
    a row table (`engram_core.tables.row_tables`: called like an `nn.Embedding`, with
    `full_weight`, `prefetch(rows)` and `stats()`)."""


@hookspec
def engram_commands(register):
    """Register a subcommand of ``engram``: ``register("report", configure, help="...")``.
    ``configure(parser)`` adds its arguments to an `argparse` parser and returns
    ``handler(args, console) -> int`` (the exit status). A plugin's command runs when typed
    (`engram NAME`); `engram --help` lists the core's commands without importing plugins."""
