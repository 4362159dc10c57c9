"""The memory contract kit catches what it claims to: each invariant fails on a memory built
to break it, passes on a correct one, and a check with nothing to check is skipped."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engram_core.components import Memory
from engram_core.testing import MemoryContract

DIM = 6


class GoodMemory(Memory):
    """A correct residual memory: out = W z + trace, a counter of calls reset by reset()."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(DIM, DIM)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, z):
        self.calls += 1
        return self.proj(z)

    def reset(self):
        self.calls.zero_()


class LeaksAcrossBatch(GoodMemory):
    def forward(self, z):
        return self.proj(z) + z.mean(0, keepdim=True)


class TimeMajorLeak(GoodMemory):
    """Outputs (T, B, D): the batch is dim 1, and items leak into each other along it."""

    batch_dim = 1

    def forward(self, z):  # z: (B, D)
        out = self.proj(z).unsqueeze(0).expand(3, -1, -1)  # (T=3, B, D)
        return out + z.sum(0)


class TimeMajorCorrect(TimeMajorLeak):
    def forward(self, z):
        return self.proj(z).unsqueeze(0).expand(3, -1, -1).clone()


class StateOutsideStateDict(GoodMemory):
    def __init__(self):
        super().__init__()
        self.offset = torch.randn(DIM)  # a plain attribute: not saved, differs per instance

    def forward(self, z):
        return self.proj(z) + self.offset


class IgnoresTheSeed(GoodMemory):
    def __init__(self):
        super().__init__()
        g = torch.Generator()
        g.seed()  # from the OS, not from torch.manual_seed: two builds with one seed differ
        self.register_buffer("offset", torch.randn(DIM, generator=g))

    def forward(self, z):
        return self.proj(z) + self.offset


class NotFiniteAtZero(GoodMemory):
    def forward(self, z):
        return self.proj(z) / z.norm(dim=-1, keepdim=True)  # 0 / 0 for a zero input


class ResetForgetsNothing(GoodMemory):
    def reset(self):
        pass  # the call counter stays


class DeadParameter(GoodMemory):
    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(DIM))


class DeclaresDependentItems(LeaksAcrossBatch):
    independent_batch_items = False


class NoParameters(Memory):
    def forward(self, z):
        return z * 2


def contract_for(memory_cls):
    class Contract(MemoryContract):
        def make_memory(self, seed):
            return memory_cls()

        def make_inputs(self, batch_size, generator):
            return {"z": torch.randn(batch_size, DIM, generator=generator)}

        def run(self, memory, inputs):
            return memory(inputs["z"])

    Contract.__name__ = f"Contract{memory_cls.__name__}"
    return Contract()


INVARIANTS = [
    "test_state_dict_round_trip",
    "test_same_seed_same_result",
    "test_finite_in_finite_out",
    "test_batch_items_independent",
    "test_reset_restores_initial_state",
    "test_gradients_reach_trainable_parameters",
]

PLANTED = [
    (StateOutsideStateDict, "test_state_dict_round_trip"),
    (IgnoresTheSeed, "test_same_seed_same_result"),
    (NotFiniteAtZero, "test_finite_in_finite_out"),
    (LeaksAcrossBatch, "test_batch_items_independent"),
    (TimeMajorLeak, "test_batch_items_independent"),
    (ResetForgetsNothing, "test_reset_restores_initial_state"),
    (DeadParameter, "test_gradients_reach_trainable_parameters"),
]


@pytest.mark.parametrize("invariant", INVARIANTS)
@pytest.mark.parametrize("memory_cls", [GoodMemory, TimeMajorCorrect])
def test_a_correct_memory_passes_every_invariant(memory_cls, invariant):
    getattr(contract_for(memory_cls), invariant)()


@pytest.mark.parametrize("memory_cls,invariant", PLANTED, ids=[f"{c.__name__}-{i[5:]}" for c, i in PLANTED])
def test_each_invariant_catches_its_planted_fault(memory_cls, invariant):
    with pytest.raises(AssertionError):
        getattr(contract_for(memory_cls), invariant)()


def test_time_major_leak_is_caught_along_the_declared_dim():
    with pytest.raises(AssertionError, match="batch dim 1"):
        contract_for(TimeMajorLeak).test_batch_items_independent()


def test_checks_with_nothing_to_check_are_skipped():
    with pytest.raises(pytest.skip.Exception, match="independent_batch_items = False"):
        contract_for(DeclaresDependentItems).test_batch_items_independent()
    with pytest.raises(pytest.skip.Exception, match="no trainable parameters"):
        contract_for(NoParameters).test_gradients_reach_trainable_parameters()


def test_a_wrongly_declared_batch_dim_fails_rather_than_checking_nothing():
    class Undeclared(TimeMajorLeak):
        batch_dim = 2  # the output's dim 2 is the feature dim, never the batch size

    with pytest.raises(AssertionError, match="declared batch dim"):
        contract_for(Undeclared).test_batch_items_independent()


@pytest.mark.parametrize("memory_cls,invariant,numbers", [
    (LeaksAcrossBatch, "test_batch_items_independent", r"max \|difference\| [0-9.e+-]+ at index .*got .*expected"),
    (IgnoresTheSeed, "test_same_seed_same_result", r"same seed: max \|difference\| [0-9.e+-]+"),
    (ResetForgetsNothing, "test_reset_restores_initial_state", r"differs: \d+ of \d+ elements, max \|difference\|"),
])
def test_a_failed_invariant_says_by_how_much(memory_cls, invariant, numbers):
    with pytest.raises(AssertionError, match=numbers):
        getattr(contract_for(memory_cls), invariant)()


def test_point_contract_assertions_carry_numbers():
    from engram_core.testing.points import assert_close, assert_shape

    with pytest.raises(AssertionError, match=r"read: max \|difference\| 0.5 at index \(1, 2\) \(got 0.5, expected 0; .*1 of 6 elements differ\)"):
        a = torch.zeros(2, 3)
        a[1, 2] = 0.5
        assert_close(a, torch.zeros(2, 3), "read", 1e-5)
    with pytest.raises(AssertionError, match=r"out: shape \(2, 3\), expected \(2, 4\)"):
        assert_shape(torch.zeros(2, 3), (2, 4), "out")
