"""A third-party memory checks that its training step reads nothing on the host, as a GPU step
and a CUDA graph need (engram_core.testing.host_reads, on the CPU)."""

from engram_core.testing.host_reads import host_reads_with_memory


def test_the_outer_product_trace_step_reads_nothing_on_the_host():
    assert host_reads_with_memory('{ type = "example-slots:outer_product_trace", key_dim = 32, value_dim = 32 }') == []
