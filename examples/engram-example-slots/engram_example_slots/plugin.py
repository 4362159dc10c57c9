"""Hook implementations: the whole of the plugin's contact with engram."""

from engram_core import hookimpl

from .memory import KeyValueSlotsConfig, KeyValueSlotsMemory


@hookimpl
def engram_memories(register):
    register("kv_slots", KeyValueSlotsMemory, KeyValueSlotsConfig, provides=("residual",))
