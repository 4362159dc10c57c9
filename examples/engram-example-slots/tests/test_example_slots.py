"""The example memory passes engram's contract kit, plus invariants of its own."""

import torch
from engram_example_slots import KeyValueSlotsConfig, KeyValueSlotsMemory
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_core import BuildContext, DataSpec
from engram_core.testing import MemoryContract, tensors

DIM = 6


def make(seed=0, **kw):
    torch.manual_seed(seed)
    return KeyValueSlotsMemory(KeyValueSlotsConfig(**kw), BuildContext(spec=DataSpec(dim=DIM)))


class TestKeyValueSlotsContract(MemoryContract):
    def make_memory(self, seed):
        m = make(seed)
        with torch.no_grad():  # non-zero values, so outputs depend on them
            m.values.normal_()
        return m

    def make_inputs(self, batch_size, generator):
        return torch.randn(batch_size, DIM, generator=generator)

    def run(self, memory, inputs):
        return memory(inputs)


@settings(max_examples=25, deadline=None)
@given(z=tensors((5, DIM), -50, 50))
def test_read_weights_sum_to_one(z):
    w = make().weights(z)
    assert torch.allclose(w.sum(-1), torch.ones(5), atol=1e-5)


def test_zero_values_change_nothing():
    m = make()
    assert torch.equal(m(torch.randn(3, DIM)), torch.zeros(3, DIM))


@settings(max_examples=10, deadline=None)
@given(gate=st.floats(-30.0, -20.0))
def test_closed_gate_passes_head_through(gate):
    m = make()
    with torch.no_grad():
        m.values.normal_()
        m.gate_logit.fill_(gate)
    assert m(torch.randn(4, DIM)).abs().max() < 1e-7
