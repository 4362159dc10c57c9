"""The example's memories against the core point contracts (written only against engram_core)."""

import torch
from engram_example_slots import KeyValueSlotsConfig, KeyValueSlotsMemory, OuterProductTraceConfig, OuterProductTraceMemory

from engram_core import BuildContext, DataSpec
from engram_core.testing.points import ResidualPointContract, TracePointContract, backbone_build


class TestOuterProductTracePoint(TracePointContract):
    def make_memory(self, seed):
        return OuterProductTraceMemory(OuterProductTraceConfig(key_dim=8, value_dim=8), backbone_build(width=self.width))


class TestKeyValueSlotsResidualPoint(ResidualPointContract):
    def make_memory(self, seed):
        return KeyValueSlotsMemory(KeyValueSlotsConfig(slots=4), BuildContext(spec=DataSpec(dim=self.width)))

    def close(self, memory):
        with torch.no_grad():
            memory.gate_logit.fill_(-1e4)
