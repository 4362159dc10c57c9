"""A third-party engram plugin, kept in the engram repository as the worked example."""

from .memory import KeyValueSlotsConfig, KeyValueSlotsMemory

__all__ = ["KeyValueSlotsConfig", "KeyValueSlotsMemory"]
