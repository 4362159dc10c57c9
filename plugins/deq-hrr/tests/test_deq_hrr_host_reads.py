"""The HRR trace's training step reads nothing on the host under the accelerator policy (a GPU
step and a CUDA graph need it; engram_core.testing.host_reads checks it on the CPU). The
configuration is the memory zoo's Zoology row."""

from engram_core.testing.host_reads import host_reads_with_memory


def test_the_hrr_training_step_reads_nothing_on_the_host():
    assert host_reads_with_memory('{ type = "hrr", dim = 64, cleanup_mode = "none" }') == []
