"""engram: a config-driven plugin framework for memory-augmented sequence models.

The public names below are imported on first use (PEP 562 ``__getattr__``), so importing
``engram_core`` — and with it every ``engram`` command that trains nothing, such as
``engram --help`` or shell completion — does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the submodule that defines it
_LAZY = {
    "Batch": "components",
    "BuildContext": "components",
    "Dataset": "components",
    "DataSpec": "components",
    "EvalContext": "components",
    "Event": "components",
    "FitContext": "components",
    "Head": "components",
    "Memory": "components",
    "Metric": "components",
    "Model": "components",
    "Objective": "components",
    "ConfigError": "config",
    "field": "config",
    "hookimpl": "hookspecs",
}

__all__ = ["__version__", *_LAZY]

from . import _moved  # noqa: E402  (earlier module paths, for one release)

_moved.install()


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'engram_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


if TYPE_CHECKING:  # for type checkers and IDEs: the names as if imported eagerly
    from .components import (  # noqa: F401
        Batch,
        BuildContext,
        Dataset,
        DataSpec,
        EvalContext,
        Event,
        FitContext,
        Head,
        Memory,
        Metric,
        Model,
        Objective,
    )
    from .config import ConfigError, field  # noqa: F401
    from .hookspecs import hookimpl  # noqa: F401
