"""TOML in and out: the one reader (one-line errors) and the writer of resolved recipes."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import tomli_w

from ..errors import RecipeError


def toml_value(v: Any) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }" if v else "{}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return tomli_w.dumps({"v": v})[4:].strip()


def toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else tomli_w.dumps({k: 0}).split(" = ")[0]


def to_toml(data: dict) -> str:
    """A recipe as a user would write it: [tables], [[stages]], [[metrics]], inline sub-tables."""
    out: list[str] = []
    for key, value in data.items():
        if isinstance(value, list) and all(isinstance(x, dict) for x in value):
            for item in value:
                out.append(f"[[{key}]]")
                out += [f"{toml_key(k)} = {toml_value(v)}" for k, v in item.items()]
                out.append("")
        elif isinstance(value, dict):
            out.append(f"[{key}]")
            out += [f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()]
            out.append("")
        else:
            out.insert(0, f"{toml_key(key)} = {toml_value(value)}")
    return "\n".join(out)


# ---- loading --------------------------------------------------------------------------


BOM = "\ufeff"


def read_toml(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise RecipeError([("", "recipe file not found")], file=str(path))
    if p.is_dir():
        tomls = sorted(x.name for x in p.glob("*.toml"))[:3]
        hint = f" (it holds {', '.join(tomls)})" if tomls else ""
        raise RecipeError([("", f"is a folder, not a recipe file{hint}; give the path of a .toml file")], file=str(path))
    try:
        text = p.read_text(encoding="utf-8")
        if text.startswith(BOM):
            raise RecipeError([("", "the file starts with a UTF-8 byte-order mark (BOM), which TOML does not allow; "
                                    "save it as UTF-8 without BOM")], file=str(path))
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError([("", f"TOML syntax error: {exc}")], file=str(path)) from None
    except UnicodeDecodeError as exc:
        raise RecipeError([("", f"not UTF-8 text: {exc}")], file=str(path)) from None
    except ValueError as exc:  # an integer past sys.get_int_max_str_digits (not a TOMLDecodeError)
        raise RecipeError([("", f"a value cannot be read ({str(exc).splitlines()[0][:120]}); give numbers of ordinary size")],
                          file=str(path)) from None
