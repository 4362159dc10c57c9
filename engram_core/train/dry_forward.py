"""`engram validate`'s dry forward: one forward pass of the first train stage's objective
on a batch of two drawn from the recipe's own data, on the CPU, before anything trains.

Building on the meta device (engram_core.train.validate) checks every component's construction
and shapes it declares, but not the shapes its forward meets: a memory whose forward fails
on the recipe's sequence length or width passes the meta build and fails at step 1. The dry
forward catches it, cheaply and only where it is safe to try:

- the model is built again on the CPU from the config alone (``build.dry_run``: no weights
  loaded), and only when it has at most `MAX_PARAMS` parameters (counted on the meta build,
  free); a larger model is skipped, not allocated;
- only when the data set was built by validate (one without `dry_spec`), or it offers
  `dry_dataset(config, build)`: a few examples made in memory (the core `mqar`) — no
  full data set is made for the check alone;
- only when no `fit` stage comes before the first train stage (a memory fitted by k-means
  need not answer before its fit);
- in eval mode, without gradients;
- not for a head or memory that declares it has no CPU forward (`cpu_forward = False`: its
  kernels run only on a GPU, e.g. flash-linear-attention's Triton layers).

A failure is one line naming the stage, its objective and the exception (exit status 1;
``--traceback`` shows the stack); ``engram validate --no-forward`` skips the check.
"""

from __future__ import annotations

from typing import Any

MAX_PARAMS = 20_000_000
BATCH = 2


def first_train_stage(recipe) -> tuple[int, Any] | None:
    """(index, stage) of the first train stage, or None when a fit stage comes first or there is none."""
    from ..recipe import FitStage, TrainStage

    for i, st in enumerate(recipe.stages):
        if isinstance(st, FitStage):
            return None
        if isinstance(st, TrainStage) and i in recipe.objectives:
            return i, st
    return None


def skip_reason(recipe) -> str | None:
    """Why the dry forward will not run, known from the recipe alone (no build needed)."""
    factory = recipe.data.component.factory
    if getattr(factory, "dry_spec", None) is not None and getattr(factory, "dry_dataset", None) is None:
        return "dry forward skipped: the data set gives its spec without data"
    if first_train_stage(recipe) is None:
        return "dry forward skipped: no train stage, or a fit stage comes first"
    for role, spec in (("head", recipe.head), ("memory", recipe.memory)):
        if spec is not None and getattr(spec.component.factory, "cpu_forward", True) is False:
            return f"dry forward skipped: the {role} '{spec.type_as_written}' has no CPU forward (it declares cpu_forward = False)"
    return None


def dry_forward(recipe, built) -> str:
    """Run the check on `built` (validate's `DryBuild` of `recipe`). Returns a short note of
    what was checked or why it was skipped; raises ComponentError when the forward fails."""
    import torch

    from ..components import BuildContext, Model
    from .validate import blame, make_component

    reason = skip_reason(recipe)
    dataset = built.dataset
    if reason is None and dataset is None and getattr(recipe.data.component.factory, "dry_dataset", None) is not None:
        with blame(f"data.dry_dataset ({recipe.data.type_as_written})", recipe.file):
            dataset = recipe.data.component.factory.dry_dataset(recipe.data.config, BuildContext(seed=recipe.run.seed, dry_run=True))
    if reason is not None or built.model is None or dataset is None:
        return reason or "dry forward skipped: the model or the data set was not built"
    index, stage = first_train_stage(recipe)
    n_params = sum(p.numel() for p in built.model.parameters())
    if n_params > MAX_PARAMS:
        return f"dry forward skipped: {n_params:,} parameters > {MAX_PARAMS:,}"
    objective_cfg = recipe.objectives[index]
    where = f"stages.{index} ('{stage.name}', objective '{objective_cfg.type_as_written}')"
    base = dict(spec=built.spec, dataset=dataset, seed=recipe.run.seed, device=torch.device("cpu"), dry_run=True)
    torch.manual_seed(recipe.run.seed)
    with torch.device("cpu"):
        head = make_component(recipe.head, BuildContext(**base), recipe.file)
        memory = make_component(recipe.memory, BuildContext(head=head, **base), recipe.file) if recipe.memory else None
        points = [p for p in recipe.memory.component.points if p in recipe.head.component.points] if recipe.memory else []
        model = Model(head, memory, points[0] if points else None)
        objective = make_component(objective_cfg, BuildContext(head=head, **base), recipe.file)
    model.eval()
    objective.eval()
    batch_size = min(BATCH, stage.batch_size)
    with blame(f"dry forward of {where} on a batch of {batch_size} from split '{stage.split}'", recipe.file), torch.no_grad():
        batch = objective.sample(dataset, stage.split, batch_size, torch.Generator().manual_seed(recipe.run.seed))
        out = objective(model, batch)
        loss = out[0] if isinstance(out, tuple) else out
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"the objective returned {type(loss).__name__}, not a loss tensor")
    return f"dry forward ok: {where}, batch of {batch_size}"
