"""Both memories pass the core's memory contract kit (engram_core.testing.MemoryContract)."""

import pytest
import torch
from engram_qwen_compressor.memories import MemEncoder, MemEncoderConfig, ReaderEncoder, ReaderEncoderConfig
from engram_qwen_compressor.reader import CompressorReader, ReaderConfig
from qwen_compressor_helpers import small_data

from engram_core.components import BuildContext
from engram_core.testing import MemoryContract

DS = small_data()


def removed_inputs(batch_size, generator, lo=3, hi=40):
    """Removed segments of different lengths (right-padded), as the reader hands them over."""
    lengths = torch.randint(lo, hi, (batch_size,), generator=generator)
    ids = torch.randint(0, 256, (batch_size, int(lengths.max())), generator=generator)
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
    return {"ids": ids.masked_fill(mask == 0, 256), "mask": mask}


class TestMemEncoderContract(MemoryContract):
    def make_memory(self, seed):
        torch.manual_seed(seed)
        build = BuildContext(spec=DS.spec)
        build.head = CompressorReader(ReaderConfig(dim=32, n_layers=1, n_heads=2), build)
        return MemEncoder(MemEncoderConfig(dim=32, n_heads=2, n_slots=4, n_cross_layers=1), build)

    def make_inputs(self, batch_size, generator):
        return removed_inputs(batch_size, generator)

    def run(self, memory, inputs):
        return memory(inputs["ids"], inputs["mask"])


class TestQueryAwareMemEncoderContract(TestMemEncoderContract):
    def make_memory(self, seed):
        torch.manual_seed(seed)
        return MemEncoder(MemEncoderConfig(dim=32, n_heads=2, n_slots=3, n_cross_layers=1, query_aware=True, out_dim=16),
                          BuildContext(spec=DS.spec))

    def make_inputs(self, batch_size, generator):
        x = removed_inputs(batch_size, generator)
        q = removed_inputs(batch_size, generator, lo=2, hi=12)
        return {"ids": x["ids"], "mask": x["mask"], "q": q["ids"], "qmask": q["mask"]}

    def run(self, memory, inputs):
        return memory(inputs["ids"], inputs["mask"], inputs["q"], inputs["qmask"])


class TestReaderEncoderContract(MemoryContract):
    # the reader's own weights are shared, not owned: the contract covers the memory's
    # parameters (slots, projection), so the reader is the same one for every seed. The
    # encoder adapter lives in the head; its B starts at zero, so it adds nothing at build.
    def make_memory(self, seed):
        torch.manual_seed(0)
        build = BuildContext(spec=DS.spec)
        build.head = CompressorReader(ReaderConfig(dim=32, n_layers=1, n_heads=2), build)
        torch.manual_seed(seed)
        return ReaderEncoder(ReaderEncoderConfig(n_slots=3, lora_rank=2), build)

    def make_inputs(self, batch_size, generator):
        return removed_inputs(batch_size, generator)

    def run(self, memory, inputs):
        return memory(inputs["ids"], inputs["mask"])


@pytest.mark.parametrize("old, names", [("memory", ["MemEncoder", "MemEncoderConfig", "ReaderEncoder", "ReaderEncoderConfig"]),
                                        ("select", ["TokenSelect", "TokenSelectConfig"])])
def test_the_old_module_paths_still_import_with_a_deprecation_warning(old, names):
    import importlib
    import sys

    import engram_qwen_compressor.memories as new

    sys.modules.pop(f"engram_qwen_compressor.{old}", None)
    with pytest.warns(DeprecationWarning, match="engram_qwen_compressor.memories"):
        module = importlib.import_module(f"engram_qwen_compressor.{old}")
    assert all(getattr(module, n) is getattr(new, n) for n in names)
