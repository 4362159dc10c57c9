"""flash-linear-attention (fla) recurrent layers as engram `layer` memories: the memory zoo's
references from the field's library (`fla:gated_deltanet`, `fla:deltanet`, `fla:gla`). fla
itself is the optional extra `engram-fla[fla]` and needs a CUDA GPU."""

from .memories import (
    DeltaNetConfig,
    DeltaNetMemory,
    GatedDeltaNetConfig,
    GatedDeltaNetMemory,
    GatedLinearAttentionConfig,
    GatedLinearAttentionMemory,
    deltanet_state,
    gated_backward_refusal,
    gated_deltanet_state,
    gla_state,
    require_fla_on_cuda,
)

__all__ = [
    "DeltaNetConfig", "DeltaNetMemory", "GatedDeltaNetConfig", "GatedDeltaNetMemory", "GatedLinearAttentionConfig",
    "GatedLinearAttentionMemory", "deltanet_state", "gated_backward_refusal", "gated_deltanet_state", "gla_state",
    "require_fla_on_cuda",
]
