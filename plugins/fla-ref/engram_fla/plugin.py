"""Hook implementations: the whole of the plugin's contact with engram."""

from engram_core import hookimpl

from .memories import (
    DeltaNetConfig,
    DeltaNetMemory,
    GatedDeltaNetConfig,
    GatedDeltaNetMemory,
    GatedLinearAttentionConfig,
    GatedLinearAttentionMemory,
)


@hookimpl
def engram_memories(register):
    register("gated_deltanet", GatedDeltaNetMemory, GatedDeltaNetConfig, points=("layer",))
    register("deltanet", DeltaNetMemory, DeltaNetConfig, points=("layer",))
    register("gla", GatedLinearAttentionMemory, GatedLinearAttentionConfig, points=("layer",))
