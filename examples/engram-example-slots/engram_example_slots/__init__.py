"""A third-party engram plugin, kept in the engram repository as the worked example."""

from .memory import KeyValueSlotsConfig, KeyValueSlotsMemory
from .trace import OuterProductTraceConfig, OuterProductTraceMemory

__all__ = ["KeyValueSlotsConfig", "KeyValueSlotsMemory", "OuterProductTraceConfig", "OuterProductTraceMemory"]
