"""mem_encoder's training step reads nothing on the host under the accelerator policy (a GPU
step and a CUDA graph need it; engram_core.testing.host_reads checks it on the CPU). The
configuration is the memory zoo's Zoology row."""

from engram_core.testing.host_reads import host_reads_with_memory


def test_the_mem_encoder_training_step_reads_nothing_on_the_host():
    memory = '{ type = "mem_encoder", n_slots = 8, dim = 64, n_heads = 4, n_self_layers = 1, n_cross_layers = 1 }'
    assert host_reads_with_memory(memory) == []
