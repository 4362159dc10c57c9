"""HRR algebra: binding commutes, unitary keys recover exactly, recall cosine ≈ theory."""

import math

import pytest
import torch
from engram_deq_hrr.hrr import (
    bind,
    check_fft_dim,
    cosine,
    expected_recall_cosine,
    involution,
    make_unitary,
    random_keys,
    unbind,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_core.config import ConfigError

FAST = settings(max_examples=10, deadline=None)


@FAST
@given(seed=st.integers(0, 10_000), dim=st.sampled_from([16, 64, 96, 128]))
def test_binding_commutes_and_associates(seed, dim):
    g = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randn(3, dim, generator=g) for _ in range(3))
    assert torch.allclose(bind(a, b), bind(b, a), atol=1e-5)
    assert torch.allclose(bind(bind(a, b), c), bind(a, bind(b, c)), atol=1e-4)


def test_bind_matches_the_definition_of_circular_convolution():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(12, generator=g), torch.randn(12, generator=g)
    direct = torch.stack([sum(a[j] * b[(i - j) % 12] for j in range(12)) for i in range(12)])
    assert torch.allclose(bind(a, b), direct, atol=1e-5)
    # correlation = binding with the involution
    assert torch.allclose(unbind(b, a), bind(involution(a), b), atol=1e-5)


@FAST
@given(seed=st.integers(0, 10_000), dim=st.sampled_from([32, 64, 256]), mode=st.sampled_from(["correlation", "inverse"]))
def test_unitary_keys_recover_exactly(seed, dim, mode):
    g = torch.Generator().manual_seed(seed)
    k = random_keys((5,), dim, g, unitary=True)
    v = torch.randn(5, dim, generator=g)
    rec = unbind(bind(k, v), k, mode=mode, eps=1e-8 if mode == "inverse" else 1e-3)
    assert torch.allclose(rec, v, atol=1e-4)
    assert torch.allclose(k.norm(dim=-1), torch.ones(5), atol=1e-5)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), n_pairs=st.integers(1, 10), dim=st.sampled_from([256, 512]), unitary=st.booleans())
def test_recall_cosine_close_to_theory(seed, n_pairs, dim, unitary):
    """Mean cosine of an unbound value over 64 traces ≈ 1/√(n+1) (Gaussian) or 1/√n (unitary)."""
    g = torch.Generator().manual_seed(seed)
    trials = 64
    keys = random_keys((trials, n_pairs), dim, g, unitary=unitary)
    values = random_keys((trials, n_pairs), dim, g)
    trace = bind(keys, values).sum(1)
    rec = unbind(trace, keys[:, 0])
    measured = cosine(rec, values[:, 0]).mean().item()
    expected = expected_recall_cosine(n_pairs, unitary=unitary)
    if unitary and n_pairs == 1:
        assert measured > 0.999
    else:
        # the per-trace cosine has std ≈ 1/√d·O(1); the mean of 64 is well inside 0.06
        assert abs(measured - expected) < 0.06, (measured, expected)


def test_recall_decreases_with_load():
    g = torch.Generator().manual_seed(1)
    cos = []
    for n in (1, 4, 16):
        keys = random_keys((128, n), 512, g)
        values = random_keys((128, n), 512, g)
        cos.append(cosine(unbind(bind(keys, values).sum(1), keys[:, 0]), values[:, 0]).mean().item())
    assert cos[0] > cos[1] > cos[2]
    assert math.isclose(cos[2], 1 / math.sqrt(17), abs_tol=0.05)


@pytest.mark.parametrize("dim", [3, 7, 101, 2 * 11, 2 * 13 * 4])
def test_dimensions_not_suited_to_the_fft_path(dim):
    with pytest.raises(ConfigError, match="not suited to the FFT path"):
        check_fft_dim(dim)


@pytest.mark.parametrize("dim", [4, 64, 96, 128, 160, 256, 384, 1000])
def test_smooth_even_dimensions_pass(dim):
    check_fft_dim(dim)


def test_make_unitary_has_unit_spectrum():
    k = make_unitary(torch.randn(4, 64))
    assert torch.allclose(torch.fft.rfft(k).abs(), torch.ones(4, 33), atol=1e-5)


@FAST
@given(seed=st.integers(0, 10_000), dim=st.sampled_from([4, 16, 96, 128]), mode=st.sampled_from(["correlation", "inverse"]))
def test_dft_matmul_binding_equals_fft_binding(seed, dim, mode):
    from engram_deq_hrr.hrr import bind_dft, dft_matrices, unbind_dft

    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(3, dim, generator=g), torch.randn(3, dim, generator=g)
    m = dft_matrices(dim)
    assert torch.allclose(bind_dft(a, b, m), bind(a, b), atol=1e-4)
    assert torch.allclose(unbind_dft(a, b, m, mode=mode), unbind(a, b, mode=mode), atol=1e-3, rtol=1e-3)
