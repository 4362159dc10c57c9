"""The Engram memories' training step reads nothing on the host under the accelerator policy
(a GPU step and a CUDA graph need it; engram_core.testing.host_reads checks it on the CPU).
The configurations are the memory zoo's Zoology rows."""

import pytest

from engram_core.testing.host_reads import host_reads_with_memory

MEMORIES = {
    "engram_hash": '{ type = "engram_hash", memory_size = 4096, layers = [0], orders = [1, 2], heads_per_order = 2, slot_dim = 16, conv_kernel = 0 }',
    "engram_hash_conv": '{ type = "engram_hash", memory_size = 512, layers = [0, 1], orders = [2, 3], heads_per_order = 2, slot_dim = 8, conv_kernel = 4 }',
    "hybrid_hash_content": '{ type = "hybrid_hash_content", memory_size = 4096, layers = [0], orders = [1, 2], heads_per_order = 2, slot_dim = 16, conv_kernel = 0, top_k = 8 }',
}


@pytest.mark.parametrize("name", sorted(MEMORIES))
def test_the_training_step_reads_nothing_on_the_host(name):
    assert host_reads_with_memory(MEMORIES[name]) == []
