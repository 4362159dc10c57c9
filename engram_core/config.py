"""Config classes: attrs, frozen, typed, documented field by field, structured by cattrs.

A component's config is an ``@attrs.frozen`` class whose fields are made with
`field` (default, help text, validator). `structure` turns a TOML table into it
and reports every problem at once as `(dotted path, message)` pairs: unknown keys
(with the closest valid key), wrong types, and validator failures.

Types are strict, as a careful user expects: TOML ``1.5`` is not an ``int`` and
``true`` is not a number (cattrs alone would silently truncate both).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError, IterableValidationNote
from cattrs.gen import make_dict_structure_fn

from .errors import ConfigError, did_you_mean

__all__ = [
    "field",
    "structure",
    "unstructure",
    "config_fields",
    "positive",
    "non_negative",
    "in_range",
    "one_of",
    "probability",
    "existing_path",
    "existing_file",
    "finite",
    "finite_positive",
    "finite_non_negative",
    "adam_betas",
    "ConfigError",
]


def field(default: Any = attrs.NOTHING, *, help: str = "", validator=None, converter=None, factory=None):
    """An attrs field with a help text shown by ``engram describe``."""
    kwargs: dict[str, Any] = {"metadata": {"help": help}}
    if factory is not None:
        kwargs["factory"] = factory
    elif default is not attrs.NOTHING:
        kwargs["default"] = default
    if validator is not None:
        kwargs["validator"] = validator
    if converter is not None:
        kwargs["converter"] = converter
    return attrs.field(**kwargs)


# ---- validators: raise ConfigError so the message names the key ---------------------


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def positive(inst, attribute, value):
    if value is not None and (_is_nan(value) or not value > 0):
        raise ConfigError(attribute.name, f"must be > 0, got {value!r}")


def non_negative(inst, attribute, value):
    if value is not None and (_is_nan(value) or not value >= 0):
        raise ConfigError(attribute.name, f"must be >= 0, got {value!r}")


def finite(inst, attribute, value):
    """A finite number (TOML allows `inf` and `nan`; no optimiser setting wants them)."""
    if value is not None and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(attribute.name, f"must be a finite number, got {value!r}")


def finite_positive(inst, attribute, value):
    finite(inst, attribute, value)
    positive(inst, attribute, value)


def finite_non_negative(inst, attribute, value):
    finite(inst, attribute, value)
    non_negative(inst, attribute, value)


def probability(inst, attribute, value):
    if value is not None and (_is_nan(value) or not 0.0 <= value <= 1.0):
        raise ConfigError(attribute.name, f"must be in [0, 1], got {value!r}")


def in_range(lo: float | None = None, hi: float | None = None):
    """Closed interval [lo, hi]; either end may be None. NaN is never in range."""

    def check(inst, attribute, value):
        if value is None:
            return
        if _is_nan(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            lo_s = "-inf" if lo is None else repr(lo)
            hi_s = "inf" if hi is None else repr(hi)
            raise ConfigError(attribute.name, f"must be in [{lo_s}, {hi_s}], got {value!r}")

    return check


def adam_betas(inst, attribute, value):
    """Two coefficients in [0, 1), as torch.optim.Adam requires (checked here, not by a traceback)."""
    if value is None:
        return
    for i, b in enumerate(value):
        if _is_nan(b) or not 0.0 <= b < 1.0:
            raise ConfigError(f"{attribute.name}.{i}", f"must be in [0, 1), got {b!r} (typical: [0.9, 0.999])")


def one_of(*choices: Any):
    def check(inst, attribute, value):
        if value not in choices:
            opts = ", ".join(repr(c) for c in choices)
            hint = did_you_mean(value, [str(c) for c in choices]) if isinstance(value, str) else ""
            raise ConfigError(attribute.name, f"must be one of {opts}, got {value!r}{hint}")

    return check


def existing_path(inst, attribute, value):
    """A path that must exist when given ('' or None mean: not given)."""
    if value and not Path(value).expanduser().exists():
        raise ConfigError(attribute.name, f"path does not exist: {value}")


def existing_file(inst, attribute, value):
    """A path to a file (not a folder) that must exist when given."""
    existing_path(inst, attribute, value)
    if value and Path(value).expanduser().is_dir():
        raise ConfigError(attribute.name, f"expected a file, got the folder {value}")


# ---- strict converter ----------------------------------------------------------------


def _strict_int(v, _):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"expected an integer, got {_show(v)}")
    return v


def _strict_float(v, _):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"expected a number, got {_show(v)}")
    return float(v)


def _strict_str(v, _):
    if not isinstance(v, str):
        raise TypeError(f"expected a string, got {_show(v)}")
    return v


def _strict_bool(v, _):
    if not isinstance(v, bool):
        raise TypeError(f"expected true or false, got {_show(v)}")
    return v


def _bool_or_str(v, _):
    """A switch with a word beside true and false (`run.cuda_graphs = "auto"`)."""
    if not isinstance(v, (bool, str)):
        raise TypeError(f"expected true, false or a string, got {_show(v)}")
    return v


def _strict_dict(v, _):
    if not isinstance(v, dict):
        raise TypeError(f"expected a table ({{ key = value, ... }}), got {_show(v)}")
    return dict(v)


def _show(v: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", tuple: "array", dict: "table"}
    if isinstance(v, (list, tuple)):
        return f"an array {list(v)!r}" if len(repr(v)) < 40 else "an array"
    if isinstance(v, dict):
        return "a table"
    return f"{kind.get(type(v), type(v).__name__)} {v!r}"


def _is_array_type(tp: Any) -> bool:
    return tp in (list, tuple) or typing.get_origin(tp) in (list, tuple)


def _array_hook_factory(tp: Any, conv: cattrs.Converter):
    """Arrays: a string or table is never split into characters or keys; fixed tuples check length.

    Errors of the items are gathered in cattrs' own IterableValidationError with an
    IterableValidationNote per index, so `structure` reports `key.<i>` for each.
    """
    origin = typing.get_origin(tp) or tp
    args = typing.get_args(tp)
    fixed = origin is tuple and args and args[-1] is not Ellipsis
    item_types = list(args) if fixed else [args[0] if args else Any]

    def hook(v, _):
        if not isinstance(v, (list, tuple)):
            if isinstance(v, str):
                raise TypeError(f"expected an array, got string {v!r} (write [{v!r}])")
            raise TypeError(f"expected an array, got {_show(v)}")
        if fixed and len(v) != len(item_types):
            raise TypeError(f"expected an array of {len(item_types)} values, got {len(v)}: {list(v)!r}")
        out, errors = [], []
        for i, item in enumerate(v):
            t = item_types[i] if fixed else item_types[0]
            try:
                out.append(conv.structure(item, t))
            except Exception as exc:
                exc.add_note(IterableValidationNote(f"Structuring {tp} @ index {i}", i, t))
                errors.append(exc)
        if errors:
            raise IterableValidationError(f"While structuring {tp!r}", errors, tp)
        return tuple(out) if origin is tuple else list(out)

    return hook


def _attrs_hook_factory(cl: type, conv: cattrs.Converter):
    """A table is required where a config class is: a string or array gets a clear message."""
    inner = make_dict_structure_fn(cl, conv)

    def hook(v, t):
        if not isinstance(v, dict):
            raise TypeError(f"expected a table, got {_show(v)}")
        return inner(v, t)

    return hook


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(bool | str, _bool_or_str)
    conv.register_structure_hook(Any, lambda v, _: v)
    conv.register_structure_hook_func(lambda t: t is dict or typing.get_origin(t) is dict, _strict_dict)
    conv.register_structure_hook_factory(_is_array_type, _array_hook_factory)
    conv.register_structure_hook_factory(attrs.has, _attrs_hook_factory)
    return conv


converter = _make_converter()


def structure(data: Any, cls: type, path: str = "") -> Any:
    """Build `cls` from plain data; on failure raise ConfigError listing every problem.

    The raised error has `.problems`: a list of `(dotted path, message)` where the
    path is prefixed by `path` and list items are `.0`, `.1` (the override syntax).
    """
    if not isinstance(data, dict):
        raise _Problems([(path, f"expected a table, got {_show(data)}")])
    try:
        return converter.structure(data, cls)
    except Exception as exc:  # every failure, walked through cattrs' structured errors
        raise _Problems(list(_flatten(exc, path)) or [(path, f"{type(exc).__name__}: {exc}")]) from None


class _Problems(ConfigError):
    """Several problems of one config; the engine turns them into a RecipeError."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__(None, "; ".join(f"{p}: {m}" for p, m in problems))


ConfigProblems = _Problems


def _join(path: str, key: str | int | None) -> str:
    if key is None or key == "":
        return path
    return f"{path}.{key}" if path else str(key)


def _flatten(exc: BaseException, path: str) -> typing.Iterator[tuple[str, str]]:
    """(dotted path, message) for every leaf of a cattrs error tree.

    Paths come from cattrs' notes (`AttributeValidationNote.name`,
    `IterableValidationNote.index`), never from parsing message text.
    """
    if isinstance(exc, ForbiddenExtraKeysError):
        valid = [a.name for a in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
        for key in sorted(exc.extra_fields):
            yield _join(path, key), f"unknown key{did_you_mean(key, valid)}"
        return
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        # a class's notes name the attribute, an iterable's the index: either is the next key
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            key = note.name if isinstance(exc, ClassValidationError) else note.index
            yield from _flatten(sub, _join(path, key))
        for sub in without:
            yield from _flatten(sub, path)
        return
    if isinstance(exc, _Problems):
        yield from ((_join(path, p) if path else p, m) for p, m in exc.problems)
        return
    if isinstance(exc, ConfigError):
        yield _join(path, exc.key), exc.message
        return
    if isinstance(exc, KeyError):  # cattrs: a required attribute is missing (its note names it)
        yield path, "missing required key"
        return
    if isinstance(exc, (TypeError, ValueError)):
        # attrs' own validators raise TypeError(message, attribute, expected, value)
        if len(exc.args) >= 2 and isinstance(exc.args[1], attrs.Attribute):
            yield _join(path, exc.args[1].name), str(exc.args[0])
            return
        yield path, str(exc)
        return
    yield path, f"{type(exc).__name__}: {exc}"


def unstructure(obj: Any) -> Any:
    """Plain data (TOML-writable: None values are dropped) from a config."""
    data = converter.unstructure(obj)
    return _drop_none(data)


def _drop_none(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _drop_none(v) for k, v in data.items() if v is not None}
    if isinstance(data, (list, tuple)):
        return [_drop_none(v) for v in data]
    if isinstance(data, float) and not math.isfinite(data):
        return str(data)
    return data


def config_fields(cls: type) -> list[dict[str, Any]]:
    """Each field: name, type (as written), default, help. Used by `engram describe`."""
    out = []
    for a in attrs.fields(cls):
        if a.default is attrs.NOTHING:
            default = "(required)"
        elif isinstance(a.default, attrs.Factory):  # type: ignore[arg-type]
            default = repr(a.default.factory())
        else:
            default = repr(a.default)
        out.append(
            {
                "name": a.name,
                "type": _type_name(a.type),
                "default": default,
                "help": a.metadata.get("help", ""),
            }
        )
    return out


def _type_name(tp: Any) -> str:
    if tp is None:
        return "any"
    if isinstance(tp, str):
        return tp
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


Validator = Callable[[Any, Any, Any], None]
