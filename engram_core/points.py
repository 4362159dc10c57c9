"""Attachment points: the exact call a head makes and a memory implements, per point.

A head declares the points it `offers`, a memory the points it `provides` (at
registration). Where they meet, the head calls the memory **only** through the methods
below, so any memory that implements a point works with every head that offers it.
Registration checks that a memory providing a point has the point's methods with the
right positional parameters (`check_memory_implements`).

Shapes: B batch, T positions processed in this call, L every position so far (L >= T
during cached generation), D the head's width (`head.width`), K context slots.

residual   ``mu, log_sigma = memory.apply_residual(z, mu, log_sigma)``
           z (B, D) the head's input state; mu (B, D) and log_sigma (B, D) or None the
           head's prediction. Returns the corrected pair (same shapes). A memory with
           nothing to add returns them unchanged. Stateless per call: no cache.

layer      ``hidden = memory.apply_layer(index, hidden, ids)`` after decoder block `index`
           for every index in ``memory.layer_indices()``. hidden (B, T, D) the states of the
           positions processed now; ids (B, L) long, EVERY token id so far. With a KV cache
           a generation step has T = 1 and L = the whole history, and must give what a full
           forward gives at that position (the memory may look back at ids, never at
           earlier hidden states, which the cache does not keep). Returns (B, T, D);
           a closed gate returns `hidden` unchanged.

context    ``prefix = memory.write_context(ids, mask)`` once per sequence, before the
           head runs; ids (B, T) long the tokens the memory may read (the head decides
           which: removed tokens, the prompt's write region), mask (B, T) 1 = real token.
           Returns (B, K, W) with ``(K, W) == memory.context_shape()`` and W the head's
           embedding width; the head places them before its inputs as prefix embeddings
           (visible to every position). During generation the prefix is written once and
           lives in the KV cache; a new token never rewrites it.

trace      ``trace = memory.empty_trace(B, device, dtype)``;
           ``trace = memory.write_trace(states, write_mask, key_states)`` once per
           sequence: states (B, T, D) the hidden states, write_mask (B, T) 0/1 which
           positions write, key_states (B, T, D) or None (default: states) what the keys
           are made from (a head may pass the previous position's states so a value is
           bound to the context it follows). Positions with write_mask 0 must not change
           the trace. ``out = memory.read_trace(trace, queries)``: queries (B, Q, D) →
           (B, Q, D), what the head adds at its query positions. Reading a trace with no
           write (the empty trace, or an all-zero write_mask) returns zeros. Reads never
           change the trace. During generation the trace written from the prompt lives in
           the head's cache and every new token is a read.

reset      ``memory.reset()`` (every point) restores what a freshly built memory holds
           outside its parameters: telemetry, counters, any trace kept between calls.
           Learned or fitted state stays. Traces and prefixes live for one forward pass
           (one batch) and are never carried into the next batch.
"""

from __future__ import annotations

import abc
import inspect

import torch

POINTS = ("residual", "layer", "context", "trace")


class ResidualPoint(abc.ABC):
    """A memory that corrects a head's prediction: ``apply_residual(z, mu, log_sigma)``."""

    @abc.abstractmethod
    def apply_residual(self, z: torch.Tensor, mu: torch.Tensor, log_sigma: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """z (B, D), mu (B, D), log_sigma (B, D) or None → corrected (mu, log_sigma)."""


class LayerPoint(abc.ABC):
    """A memory inside a hidden stack: ``apply_layer(index, hidden, ids)`` after chosen blocks."""

    @abc.abstractmethod
    def layer_indices(self) -> tuple[int, ...]:
        """The 0-based decoder blocks after which the head calls `apply_layer`."""

    @abc.abstractmethod
    def apply_layer(self, index: int, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, D) after block `index`; ids (B, L) every id so far → (B, T, D)."""


class ContextPoint(abc.ABC):
    """A memory that writes K latent vectors the head reads as prefix embeddings."""

    @abc.abstractmethod
    def context_shape(self) -> tuple[int, int]:
        """(K, W): the number of prefix vectors and their width (the head's embedding width)."""

    @abc.abstractmethod
    def write_context(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """ids (B, T) long, mask (B, T) 0/1 or None (all real) → (B, K, W)."""


class TracePoint(abc.ABC):
    """A memory written from chosen positions' states and read at query positions."""

    @abc.abstractmethod
    def empty_trace(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The trace before any write (B, ...); reading it returns zeros."""

    @abc.abstractmethod
    def write_trace(self, states: torch.Tensor, write_mask: torch.Tensor | None, key_states: torch.Tensor | None = None) -> torch.Tensor:
        """states (B, T, D), write_mask (B, T) 0/1 or None (all write), key_states (B, T, D) or None → trace."""

    @abc.abstractmethod
    def read_trace(self, trace: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """queries (B, Q, D) → (B, Q, D); zeros where nothing was written."""


PROTOCOLS: dict[str, type] = {"residual": ResidualPoint, "layer": LayerPoint, "context": ContextPoint, "trace": TracePoint}


def _positional(fn) -> list[inspect.Parameter]:
    params = list(inspect.signature(fn).parameters.values())
    if params and params[0].name == "self":
        params = params[1:]
    return params


def point_methods(point: str) -> list[str]:
    """The method names a memory must have to provide `point`."""
    return sorted(PROTOCOLS[point].__abstractmethods__)


def missing_methods(cls: type, point: str) -> list[str]:
    """What `cls` lacks to implement `point`: '<method>' or '<method>(takes N of M arguments)'."""
    proto = PROTOCOLS[point]
    problems = []
    for name in point_methods(point):
        fn = getattr(cls, name, None)
        if fn is None or not callable(fn) or getattr(fn, "__isabstractmethod__", False):
            problems.append(name)
            continue
        try:
            have = _positional(fn)
        except (TypeError, ValueError):
            continue  # a builtin or C function: trust it
        if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in have):
            continue
        want = _positional(getattr(proto, name))
        positional = [p for p in have if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        extra_required = [p for p in positional[len(want):] if p.default is inspect.Parameter.empty]
        if len(positional) < len(want) or extra_required:
            problems.append(f"{name} (takes {len(positional)} positional arguments, the point passes {len(want)})")
    return problems


def check_memory_implements(cls: type, provides: tuple[str, ...]) -> list[str]:
    """One message per point in `provides` that `cls` does not implement (empty: all fine)."""
    out = []
    for point in provides:
        if point not in PROTOCOLS:
            continue  # a plugin's own point, outside the core's protocols
        miss = missing_methods(cls, point)
        if miss:
            out.append(f"provides '{point}' but does not implement engram_core.points.{PROTOCOLS[point].__name__}: "
                       f"missing {', '.join(miss)}")
    return out


def point_signature(point: str) -> list[str]:
    """Human-readable signatures of a point's methods (for `engram describe`)."""
    proto = PROTOCOLS[point]
    lines = []
    for name in point_methods(point):
        fn = getattr(proto, name)
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.name != "self"]
        text = ", ".join(p.name + ("" if p.default is inspect.Parameter.empty else f"={p.default!r}") for p in params)
        doc = (inspect.getdoc(fn) or "").splitlines()[0] if inspect.getdoc(fn) else ""
        lines.append(f"{name}({text}) — {doc}")
    return lines


def implements(memory: object, point: str) -> bool:
    """Whether an instance implements `point` (structurally: the ABC need not be a base)."""
    return not missing_methods(type(memory), point)


__all__ = [
    "POINTS", "PROTOCOLS", "ResidualPoint", "LayerPoint", "ContextPoint", "TracePoint",
    "check_memory_implements", "missing_methods", "point_methods", "point_signature", "implements",
]
