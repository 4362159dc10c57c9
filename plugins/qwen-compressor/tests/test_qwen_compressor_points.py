"""mem_encoder against the `context` point's contract, on the core backbone."""

from engram_qwen_compressor.memories import MemEncoder, MemEncoderConfig

from engram_core.testing.points import ContextPointContract, backbone_build


class TestMemEncoderContextPoint(ContextPointContract):
    def make_memory(self, seed):
        return MemEncoder(MemEncoderConfig(n_slots=4, dim=16, n_heads=2, n_cross_layers=1), backbone_build(width=self.width, vocab_size=self.vocab_size))
