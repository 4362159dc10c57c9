"""Hook implementations: the whole of the plugin's contact with engram."""

from engram_core import hookimpl

from .memory import KeyValueSlotsConfig, KeyValueSlotsMemory
from .trace import OuterProductTraceConfig, OuterProductTraceMemory


@hookimpl
def engram_memories(register):
    register("kv_slots", KeyValueSlotsMemory, KeyValueSlotsConfig, provides=("residual",))
    register("outer_product_trace", OuterProductTraceMemory, OuterProductTraceConfig, provides=("trace",))
