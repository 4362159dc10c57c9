"""engram: a config-driven plugin framework for memory-augmented sequence models."""

__version__ = "0.1.0"

from .components import (  # noqa: E402
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
from .config import ConfigError, field  # noqa: E402
from .hookspecs import hookimpl  # noqa: E402

__all__ = [
    "__version__",
    "Batch",
    "BuildContext",
    "ConfigError",
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
    "field",
    "hookimpl",
]
