"""The five kinds of component and the small protocols through which they meet.

Plugin authors subclass these. Every factory is called as ``factory(config, build)``
where `config` is the component's frozen attrs config and `build` a `BuildContext`
(the data set's `spec`, the head for a memory, the cache folder, the run's seed).

    Dataset   named splits; `sample` draws a random training batch with a
              torch.Generator; `eval_batches` walks a split in a fixed order;
              `spec` tells heads and memories every dimension.
    Head      nn.Module, the model's trunk. Declares (at registration) the
              attachment points it `offers` to a memory.
    Memory    nn.Module attached at one point the head offers. May expose
              `fit(ctx, ...)`, `stats()`, `histograms()`, `reset()`.
    Objective computes `(loss, terms)` from the assembled model and a batch.
    Metric    `reset / update / compute` over an eval split, like torchmetrics.

Events: any component may define ``on_step_end(event)``, ``on_eval_end(event)``
and ``on_stage_end(event)``; the engine calls them with an `Event`.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

from .errors import ConfigError

Batch = dict[str, Any]


class DataSpec(Mapping):
    """What a data set tells the components built on it (dimensions, vocabulary, ...).

    Read fields as attributes (``spec.dim``) or keys; a missing field is a clear error.
    """

    def __init__(self, source: str = "data", **fields: Any):
        self._source = source
        self._fields = dict(fields)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._fields[name]
        except KeyError:
            have = ", ".join(sorted(self._fields)) or "nothing"
            raise ConfigError(None, f"{self._source} does not provide '{name}' (it provides: {have})") from None

    def __getitem__(self, key: str) -> Any:
        return self._fields[key]

    def __iter__(self):
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"DataSpec({self._fields!r})"


@attrs.define
class BuildContext:
    """Handed to every factory. Fields are None where they do not apply yet."""

    spec: DataSpec | None = None
    head: nn.Module | None = None
    dataset: Dataset | None = None
    cache_dir: Path = attrs.field(factory=lambda: default_cache_dir())
    seed: int = 0
    device: torch.device = attrs.field(factory=lambda: torch.device("cpu"))
    run_dir: Path | None = None


def default_cache_dir() -> Path:
    """$ENGRAM_CACHE, else $XDG_CACHE_HOME/engram, else ~/.cache/engram."""
    import os

    if os.environ.get("ENGRAM_CACHE"):
        return Path(os.environ["ENGRAM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "engram"


class Dataset(abc.ABC):
    """A data set with named splits. Batches are dicts of CPU tensors."""

    spec: DataSpec
    splits: tuple[str, ...] = ("train", "eval")

    @abc.abstractmethod
    def sample(self, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        """A random batch from `split`, drawn only with `generator` (so resume is exact)."""

    @abc.abstractmethod
    def eval_batches(self, split: str, batch_size: int) -> Iterator[Batch]:
        """Every example of `split` once, in a fixed order."""


class Head(nn.Module):
    """The model's trunk. A memory attached by the engine is reachable as `self.memory`.

    The memory is not registered as a child module of the head (the assembled
    `Model` owns it), so parameter names are ``head.*`` and ``memory.*``.
    """

    def __init__(self) -> None:
        super().__init__()
        object.__setattr__(self, "memory", None)
        self.memory_point: str | None = None

    def attach_memory(self, memory: Memory, point: str) -> None:
        """Called once by the engine. Override to install hooks (e.g. after layer i)."""
        object.__setattr__(self, "memory", memory)
        self.memory_point = point

    @property
    def memory_active(self) -> bool:
        return self.memory is not None and bool(getattr(self.memory, "enabled", True))


class Memory(nn.Module):
    """A memory type. Set `independent_batch_items = False` if items in a batch interact."""

    independent_batch_items: bool = True

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True

    def stats(self) -> dict[str, float]:
        """Values logged as ``memory/<name>`` at each evaluation."""
        return {}

    def histograms(self) -> dict[str, torch.Tensor]:
        """Tensors logged as histograms ``memory/<name>`` at each evaluation."""
        return {}

    def reset(self) -> None:
        """Restore the state a freshly built memory has (traces, counters). Default: nothing."""


class Objective(nn.Module):
    """Computes ``(loss, terms)``; terms are logged as ``train/<term>``.

    An objective may hold state (an nn.Module's buffers, or `get_extra_state`),
    which is saved in checkpoints.
    """

    def sample(self, dataset: Dataset, split: str, batch_size: int, generator: torch.Generator) -> Batch:
        """The batch this objective trains on; override to ask for another view (segments)."""
        return dataset.sample(split, batch_size, generator)

    @abc.abstractmethod
    def forward(self, model: Model, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        ...


class Metric(abc.ABC):
    """reset / update / compute, in the manner of torchmetrics.

    `compute` returns ``{name: value}``; a name without a slash is logged as
    ``eval/<name>``, one with a slash (``rollout/dnll``) as it is.
    """

    ctx: EvalContext | None = None

    def bind(self, ctx: EvalContext) -> None:
        """Called before each evaluation with the model, objective, data set and step."""
        self.ctx = ctx

    def batches(self, dataset: Dataset, split: str, batch_size: int) -> Iterator[Batch]:
        return dataset.eval_batches(split, batch_size)

    @abc.abstractmethod
    def reset(self) -> None: ...

    @abc.abstractmethod
    def update(self, model: Model, batch: Batch) -> None: ...

    @abc.abstractmethod
    def compute(self) -> dict[str, float]: ...


class Model(nn.Module):
    """The assembled model: a head and, optionally, a memory attached to it."""

    def __init__(self, head: nn.Module, memory: nn.Module | None = None, point: str | None = None):
        super().__init__()
        self.head = head
        self.memory = memory
        if memory is not None:
            if hasattr(head, "attach_memory"):
                head.attach_memory(memory, point)
            else:
                object.__setattr__(head, "memory", memory)

    def forward(self, *args, **kwargs):
        return self.head(*args, **kwargs)


@attrs.define
class EvalContext:
    model: Model
    dataset: Dataset
    split: str
    step: int
    stage: str
    objective: Objective | None
    batch_size: int
    device: torch.device


@attrs.define
class Event:
    """What a component's ``on_step_end / on_eval_end / on_stage_end`` receives."""

    step: int
    stage: str
    model: Model
    metrics: dict[str, float]
    logger: Any  # engram_core.tb.RunLogger: .scalar(tag, value, step), .histogram(...)
    optimizer: Any = None  # the stage's torch optimizer (or a list of them), None outside training
    run_dir: Path | None = None
    stage_step: int = 0
    stage_steps: int = 0


@attrs.define
class FitContext:
    """What a `fit` stage action receives (e.g. fitting a memory on head residuals)."""

    model: Model
    dataset: Dataset
    device: torch.device
    generator: torch.Generator
    batch_size: int
    split: str
    logger: Any
    step: int


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


# re-exported for plugin authors
__all__ = [
    "Batch",
    "BuildContext",
    "DataSpec",
    "Dataset",
    "EvalContext",
    "Event",
    "FitContext",
    "Head",
    "Memory",
    "Metric",
    "Model",
    "Objective",
    "to_device",
    "default_cache_dir",
]
