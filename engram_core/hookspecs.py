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
ENGINE_HOOKS = ("held_rows", "clip_grad_norm", "serve_peers", "save_extras", "load_extras", "prune_extras",
                "extra_state_keys")


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


# ---- engine hooks: state the model's parameters do not hold --------------------------------
# How the engine reaches large tables whose rows live outside their parameter (host memory)
# or are split over ranks (engram_core.tables implements every one): the engine imports no
# table code. Each is called with keyword arguments; a plugin implements only those it needs.


@hookspec
def engram_held_rows(model):
    """[(parameter name, holder)] for parameters of `model` whose rows live outside them. A
    holder has `claim(optimizer or None)`, `optimizer` (the one that claimed it) and
    `gradient_leaves()` (the device tensors holding its gradient this step, clipped with the
    rest). Such a parameter trains only under an optimiser registered with `holds_rows`."""


@hookspec(firstresult=True)
def engram_grad_clipper(model):
    """Asked once per train stage: a callable ``clip(params, max_norm) -> total norm`` that
    clips as `torch.nn.utils.clip_grad_norm_` does where `model` holds gradients that call
    would miss (rows split over ranks: the norm over every rank's rows), or None to let the
    engine clip with torch's call."""


@hookspec
def engram_serve_peers():
    """A rank has read its share of a sharded evaluation: answer the other ranks' requests
    until all are done (row-sharded tables answer lookups). Collective; returns what it served."""


@hookspec
def engram_save_extras(run_dir, tag, model, optimizers, optimizer_states):
    """Every rank, at each checkpoint: write state the checkpoint must not hold (each rank's
    own rows) under run_dir/checkpoints/, drop it from `optimizer_states` (rank 0's, about to be
    saved), and return {checkpoint key: what finds it again}, or None."""


@hookspec
def engram_load_extras(run_dir, state, model, optimizers):
    """Load what `engram_save_extras` wrote for the checkpoint `state`: into `model` when
    `optimizers` is None (before any stage), else into the restored `optimizers`."""


@hookspec
def engram_prune_extras(run_dir, state):
    """After rank 0 wrote the checkpoint `state`: remove what older checkpoints' extras left."""


@hookspec
def engram_extra_state_keys(state):
    """Model state-dict keys the checkpoint `state` keeps outside its "model" entry (so a
    resume does not call them missing)."""

