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
import re
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

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


def positive(inst, attribute, value):
    if value is not None and not value > 0:
        raise ConfigError(attribute.name, f"must be > 0, got {value!r}")


def non_negative(inst, attribute, value):
    if value is not None and not value >= 0:
        raise ConfigError(attribute.name, f"must be >= 0, got {value!r}")


def probability(inst, attribute, value):
    if value is not None and not 0.0 <= value <= 1.0:
        raise ConfigError(attribute.name, f"must be in [0, 1], got {value!r}")


def in_range(lo: float | None = None, hi: float | None = None):
    """Closed interval [lo, hi]; either end may be None."""

    def check(inst, attribute, value):
        if value is None:
            return
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            lo_s = "-inf" if lo is None else repr(lo)
            hi_s = "inf" if hi is None else repr(hi)
            raise ConfigError(attribute.name, f"must be in [{lo_s}, {hi_s}], got {value!r}")

    return check


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


def _show(v: Any) -> str:
    kind = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "table"}
    return f"{kind.get(type(v), type(v).__name__)} {v!r}" if not isinstance(v, (list, dict)) else kind[type(v)]


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(Any, lambda v, _: v)
    return conv


converter = _make_converter()


def structure(data: Any, cls: type, path: str = "") -> Any:
    """Build `cls` from plain data; on failure raise ConfigError listing every problem.

    The raised error has `.problems`: a list of `(dotted path, message)` where the
    path is prefixed by `path`.
    """
    if not isinstance(data, dict):
        raise _Problems([(path, f"expected a table, got {_show(data)}")])
    try:
        return converter.structure(data, cls)
    except ClassValidationError as exc:
        raise _Problems(list(_flatten(exc, path, cls))) from None
    except ConfigError as exc:  # validator / __attrs_post_init__
        raise _Problems([(_join(path, exc.key), exc.message)]) from None
    except (ValueError, TypeError) as exc:
        raise _Problems([_from_plain_error(exc, path)]) from None


class _Problems(ConfigError):
    """Several problems of one config; the engine turns them into a RecipeError."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__(None, "; ".join(f"{p}: {m}" for p, m in problems))


ConfigProblems = _Problems


def _join(path: str, key: str | None) -> str:
    if not key:
        return path
    if key.startswith("["):
        return f"{path}{key}"
    return f"{path}.{key}" if path else key


_ATTRS_MSG = re.compile(r"^'(?P<name>[A-Za-z_][A-Za-z_0-9]*)' (?P<rest>.*)$")


def _from_plain_error(exc: Exception, path: str) -> tuple[str, str]:
    """attrs' own validators say "'name' must be > 0: -1"; keep their words, fix the path."""
    msg = str(exc)
    m = _ATTRS_MSG.match(msg)
    if m:
        return _join(path, m.group("name")), m.group("rest")
    return path, msg


def _flatten(exc: BaseException, path: str, cls: type | None) -> typing.Iterator[tuple[str, str]]:
    if isinstance(exc, ForbiddenExtraKeysError):
        valid = [a.name for a in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
        for key in sorted(exc.extra_fields):
            yield _join(path, key), f"unknown key{did_you_mean(key, valid)}"
        return
    if isinstance(exc, (ClassValidationError, IterableValidationError)):
        for sub in exc.exceptions:
            sub_path = path
            for note in getattr(sub, "__notes__", []):
                name = getattr(note, "name", None)
                idx = getattr(note, "index", None)
                if name is not None:
                    sub_path = _join(path, str(name))
                elif idx is not None:
                    sub_path = f"{path}[{idx}]" if not path.endswith("]") or True else path
            sub_cls = getattr(sub, "cl", None)
            yield from _flatten(sub, sub_path, sub_cls)
        return
    if isinstance(exc, ConfigError):
        if isinstance(exc, _Problems):
            yield from exc.problems
            return
        yield _join(path, exc.key) if exc.key else path, exc.message
        return
    if isinstance(exc, KeyError):
        yield path, f"missing required key {exc.args[0]!r}" if exc.args else "missing required key"
        return
    if isinstance(exc, (TypeError, ValueError)):
        msg = str(exc)
        m = _ATTRS_MSG.match(msg)
        if m:
            yield _join(path, m.group("name")), m.group("rest")
            return
        if "missing" in msg and "required" in msg:
            names = re.findall(r"'([A-Za-z_0-9]+)'", msg)
            for n in names or [""]:
                yield _join(path, n), "missing required key"
            return
        if isinstance(exc, TypeError) and "not iterable" in msg:
            yield path, "expected an array"
            return
        yield path, msg
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


def validate_choice(value: str, choices: Sequence[str], key: str) -> None:
    if value not in choices:
        raise ConfigError(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}{did_you_mean(value, choices)}")


Validator = Callable[[Any, Any, Any], None]
