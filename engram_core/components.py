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
import collections
import copy
import warnings
import weakref
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
    # True when `engram validate` / `--dry-run` builds (device "meta"): build the shapes and
    # run every check, but load no weights and generate nothing large
    dry_run: bool = False
    # the registry the recipe was resolved against: for components made of other registered
    # components (weighted_sum), so none of them loads a registry of its own
    registry: Any = None


def default_cache_dir() -> Path:
    """$ENGRAM_CACHE, else $XDG_CACHE_HOME/engram, else ~/.cache/engram."""
    import os

    if os.environ.get("ENGRAM_CACHE"):
        return Path(os.environ["ENGRAM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "engram"


class Dataset(abc.ABC):
    """A data set with named splits. Batches are dicts of CPU tensors.

    Optional protocol (no default here): ``place(device)``, which the engine calls once after
    building the data set where it is defined, keeps the data on the run's device; `sample`
    then still draws its indices with the CPU `generator` (same batches on every device,
    exact resume) and returns tensors on that device (the core `mqar` does this).
    """

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
    """A memory type. Set `independent_batch_items = False` if items in a batch interact.

    Distributed runs (engram_core.run.distributed) read, where a component defines them (a head
    or objective may too): `ddp_find_unused_parameters = True`; `self_managed_parameters()`
    (left out of DDP, synced by the component itself); `sharded_actions = ("fit",)` (the
    action runs on every rank and reduces through `ctx.dist`; otherwise rank 0 runs it and
    the model's state is broadcast); `compilable = False` with a `compile_note`.

    `batch_dim` is the dimension of the memory's outputs that indexes batch items (0 for
    (B, ...) outputs, 1 for time-major (T, B, ...)); the contract kit checks batch
    independence along it.
    """

    independent_batch_items: bool = True
    batch_dim: int = 0

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

    def state_numbers(self, seq_len: int) -> int | None:
        """Numbers one sequence's inference carries from position to position in this memory,
        beyond the head's own (Zoology's "state size"; parameters are not state), for a
        sequence of `seq_len` tokens; None: not declared. Heads count what they can see
        themselves (a trace, a context prefix in the attention cache); a layer memory that
        looks back at earlier tokens says how many it keeps."""
        return None


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


# Reductions a state may name in `add_state(..., dist_reduce_fx=...)` (None: the rule by type).
DIST_REDUCE_FX = ("sum", "max", "min", "cat", "union", "none")


@attrs.frozen
class MetricState:
    """One declared metric state: its default (restored, as a fresh copy, by `reset`) and reduction."""

    default: Any
    dist_reduce_fx: str | None


class Metric(abc.ABC):
    """reset / update / compute, in the manner of torchmetrics.

    `compute` returns ``{name: value}``; a name without a slash is logged as
    ``eval/<name>``, one with a slash (``rollout/dnll``) as it is.

    *States* are declared in ``__init__`` with ``self.add_state(name, default,
    dist_reduce_fx=None)``; `reset` gives every state a fresh copy of its default. Distributed
    runs deal the eval batches over the ranks, then call `dist_reduce` before `compute`: each
    state is reduced by its `dist_reduce_fx` ("sum", "max", "min", "cat", "union", "none"), or
    by the rule by type when None (sums numbers, tensors and dicts of them, concatenates lists,
    unions sets, ORs bools, keeps anything else as it is). Override `dist_reduce`, or set
    `shardable = False` (every rank then walks the whole split and nothing is reduced).

    Deprecated, read for one more release: a subclass that declares no state and overrides
    `reset` has as states the attributes its `reset` assigns (one DeprecationWarning per
    class), reduced by the class dict `dist_reduce_fx` ({"max_norm": "max"}) or the rule by type.
    """

    ctx: EvalContext | None = None
    dist_reduce_fx: dict[str, str] = {}  # deprecated: name the reduction in add_state
    shardable: bool = True
    # What the values mean to a reader (engram_core.run.metric_info), by the names `compute`
    # returns or globs over them: `directions` {"acc": "higher", "*/nll": "lower"} (a name
    # not declared is "unknown": shown without a verdict); `groups` {"params": "cost"} (the
    # heading a value is shown under; default the tag's prefix; "cost" is not an outcome);
    # `references` {"acc": {"chance": 0.1}} (levels drawn beside the value: a number, the
    # name of another value, or a function of the resolved recipe dict).
    directions: dict[str, str] = {}
    groups: dict[str, str] = {}
    references: dict[str, dict[str, Any]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "reset" in cls.__dict__:
            cls.reset = _checked_reset(cls.__dict__["reset"])
            cls.__setattr__ = _recording_setattr  # only classes with their own reset may be legacy
        if cls.__dict__.get("dist_reduce_fx"):
            # stacklevel 3: the class statement, under ABCMeta.__new__
            warnings.warn(f"{cls.__module__}.{cls.__qualname__}: {LEGACY_FX_WARNING}", DeprecationWarning, stacklevel=3)

    def add_state(self, name: str, default: Any, dist_reduce_fx: str | None = None) -> None:
        """Declare a state (in ``__init__``): `reset` sets it to a fresh copy of `default`
        (lists, dicts, sets and tensors are deep-copied, so no evaluation sees another's),
        `dist_reduce` combines the ranks' values by `dist_reduce_fx` (None: the rule by type)."""
        who = f"{type(self).__name__}.add_state({name!r})"
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{who}: a state's name must be an identifier")
        if hasattr(Metric, name) or name in _INTERNAL_NAMES or callable(getattr(type(self), name, None)):
            raise ValueError(f"{who}: {name!r} is taken by the Metric API or a method; choose another name")
        if dist_reduce_fx is not None and dist_reduce_fx not in DIST_REDUCE_FX:
            raise ValueError(f"{who}: unknown dist_reduce_fx {dist_reduce_fx!r} "
                             f"(use {', '.join(DIST_REDUCE_FX)}, or None for the rule by type)")
        legacy_fx = self.dist_reduce_fx.get(name)
        if legacy_fx is not None and dist_reduce_fx is not None and legacy_fx != dist_reduce_fx:
            raise ValueError(f"{who}: dist_reduce_fx {dist_reduce_fx!r} contradicts the class's "
                             f"dist_reduce_fx[{name!r}] = {legacy_fx!r}; keep the add_state one")
        states = self.__dict__.setdefault("_declared_states", {})
        states[name] = MetricState(_fresh_copy(default), dist_reduce_fx or legacy_fx)
        object.__setattr__(self, name, _fresh_copy(default))

    def reset(self) -> None:
        """Every declared state back to a fresh copy of its default. A subclass overriding
        `reset` (to clear scratch attributes) calls ``super().reset()``."""
        for name, state in self.__dict__.get("_declared_states", {}).items():
            object.__setattr__(self, name, _fresh_copy(state.default))
        self.__dict__["_base_resets"] = self.__dict__.get("_base_resets", 0) + 1

    def state_names(self) -> tuple[str, ...]:
        """The declared states (a legacy metric: the attributes its last `reset` assigned) —
        what `dist_reduce` reduces."""
        declared = self.__dict__.get("_declared_states")
        if declared:
            return tuple(declared)
        return tuple(sorted(self.__dict__.get("_state_names", ())))

    def dist_reduce(self, dist) -> None:
        """Combine every rank's states into the states of the whole split (on every rank)."""
        names = self.state_names()
        local = {n: _to_cpu(getattr(self, n)) for n in names}
        gathered = dist.all_gather_object(local)
        for n in names:
            value = reduce_states([g[n] for g in gathered], self._reduction(n), f"{type(self).__name__}.{n}")
            object.__setattr__(self, n, _to_device_like(value, getattr(self, n)))

    def _reduction(self, name: str) -> str:
        declared = self.__dict__.get("_declared_states", {}).get(name)
        if declared is not None and declared.dist_reduce_fx is not None:
            return declared.dist_reduce_fx
        return self.dist_reduce_fx.get(name, "default")

    def bind(self, ctx: EvalContext) -> None:
        """Called before each evaluation with the model, objective, data set and step."""
        self.ctx = ctx

    def batches(self, dataset: Dataset, split: str, batch_size: int) -> Iterator[Batch]:
        return dataset.eval_batches(split, batch_size)

    @abc.abstractmethod
    def update(self, model: Model, batch: Batch) -> None: ...

    @abc.abstractmethod
    def compute(self) -> dict[str, float]: ...


def _fresh_copy(value: Any) -> Any:
    """A copy sharing nothing mutable with `value` (a tensor stays on its device)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return copy.deepcopy(value)


# Legacy states (until the release after next): a subclass that overrides `reset` and declares
# nothing with add_state has as states the attributes its `reset` assigns, recorded here.
LEGACY_RESET_WARNING = "declare states with add_state in __init__; reset-assigned states are read for one more release"
LEGACY_FX_WARNING = ("name each state's reduction in add_state(name, default, dist_reduce_fx=...); "
                     "the class dict dist_reduce_fx is read for one more release")
_INTERNAL_NAMES = {"_declared_states", "_state_names", "_recording_states", "_base_resets"}
_warned_legacy: weakref.WeakSet = weakref.WeakSet()


def _recording_setattr(self, name: str, value: Any) -> None:
    recording = self.__dict__.get("_recording_states")
    if recording is not None:
        recording.add(name)
    object.__setattr__(self, name, value)


def _checked_reset(reset):
    """Wrap a Metric subclass's own `reset`: a metric with declared states must call
    ``super().reset()``; one without (legacy) has the attributes the call assigns as states."""

    def wrapped(self, *args, **kwargs):
        outer = self.__dict__.get("_recording_states") is None
        if outer:
            object.__setattr__(self, "_recording_states", set())
            object.__setattr__(self, "_base_resets", 0)
        try:
            result = reset(self, *args, **kwargs)
        except BaseException:
            if outer:
                object.__setattr__(self, "_recording_states", None)
            raise
        if outer:
            assigned = self.__dict__["_recording_states"] - {"ctx"}
            object.__setattr__(self, "_recording_states", None)
            _settle_reset(self, assigned)
        return result

    wrapped.__name__ = reset.__name__
    wrapped.__qualname__ = getattr(reset, "__qualname__", reset.__name__)
    wrapped.__doc__ = reset.__doc__
    wrapped.__wrapped__ = reset
    return wrapped


def _settle_reset(metric: Metric, assigned: set[str]) -> None:
    cls = type(metric)
    if metric.__dict__.get("_declared_states"):
        if not metric.__dict__.get("_base_resets"):
            raise TypeError(f"{cls.__name__} declares states with add_state, but its reset does not call "
                            "super().reset(), which restores them; call it first")
        return  # what the override assigned besides is scratch, not state
    object.__setattr__(metric, "_state_names", assigned)
    if assigned and cls not in _warned_legacy:
        _warned_legacy.add(cls)
        _warn_at_reset(cls)


def _warn_at_reset(cls: type) -> None:
    """The legacy warning, pointing at the `reset` that assigns the states (the plugin's line)."""
    owner = next(c for c in cls.__mro__ if "reset" in c.__dict__)
    code = getattr(owner.__dict__["reset"], "__wrapped__", owner.__dict__["reset"]).__code__
    message = f"{cls.__module__}.{cls.__qualname__}: {LEGACY_RESET_WARNING}"
    warnings.warn_explicit(message, DeprecationWarning, code.co_filename, code.co_firstlineno, module=owner.__module__)


def reduce_states(values: list[Any], fx: str = "default", what: str = "state") -> Any:
    """One state from every rank's value of it (in rank order), by reduction `fx`."""
    first = values[0]
    if fx == "none":
        return first
    if fx == "default":
        if isinstance(first, bool):
            fx = "or"
        elif isinstance(first, (int, float, torch.Tensor, dict)):
            fx = "sum"
        elif isinstance(first, (list, tuple)):
            fx = "cat"
        elif isinstance(first, (set, frozenset)):
            fx = "union"
        else:
            return first
    if fx == "or":
        return any(values)
    if fx == "sum":
        if isinstance(first, dict):
            keys = list(dict.fromkeys(k for v in values for k in v))
            merged = {k: reduce_states([v[k] for v in values if k in v], "sum", f"{what}[{k!r}]") for k in keys}
            if isinstance(first, collections.defaultdict):
                return collections.defaultdict(first.default_factory, merged)
            return type(first)(merged)
        total = values[0]
        for v in values[1:]:
            total = total + v
        return total
    if fx in ("max", "min"):
        if isinstance(first, torch.Tensor):
            out = values[0]
            for v in values[1:]:
                out = torch.maximum(out, v) if fx == "max" else torch.minimum(out, v)
            return out
        return max(values) if fx == "max" else min(values)
    if fx == "cat":
        if isinstance(first, torch.Tensor):
            return torch.cat(values)
        return type(first)(x for v in values for x in v)
    if fx == "union":
        return type(first)().union(*values)
    raise ValueError(f"{what}: unknown dist_reduce_fx {fx!r} (use sum, max, min, cat, union or none)")


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def _to_device_like(value: Any, like: Any) -> Any:
    if isinstance(value, torch.Tensor) and isinstance(like, torch.Tensor):
        return value.to(like.device)
    return value


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
    metrics: dict[str, Any]  # eval/stage end: {tag: float}; step end: {"loss": the step's 0-d loss tensor}
    logger: Any  # engram_core.run.tb.RunLogger: .scalar(tag, value, step), .histogram(...)
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
    dist: Any = attrs.field(factory=lambda: _one_process())  # engram_core.run.distributed.Dist: rank, world_size, collectives


def _one_process():
    from .run.distributed import Dist

    return Dist()


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a batch onto `device`. A host tensor bound for CUDA goes through pinned
    memory, so the copy is asynchronous (from pageable memory the host would wait)."""
    if isinstance(batch, torch.Tensor):
        if device.type == "cuda" and batch.device.type == "cpu":
            return batch.pin_memory().to(device, non_blocking=True)
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
