"""VonMisesFisher: log_prob against scipy (where finite) and 50-digit mpmath; sampling; mean; entropy."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from engram_audio_mimi.distributions import VonMisesFisher, log_vmf_normalizer, vmf_mean_resultant
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import vonmises_fisher

KAPPAS = [1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5]


def mp_log_c(d: int, k: float) -> float:
    mpmath.mp.dps = 50
    nu = mpmath.mpf(d) / 2 - 1
    k = mpmath.mpf(k)
    return float(
        nu * mpmath.log(k) - (mpmath.mpf(d) / 2) * mpmath.log(2 * mpmath.pi) - mpmath.log(mpmath.besseli(nu, k))
    )


@pytest.mark.parametrize("d", [2, 3, 4, 7, 16, 64, 512, 1024])
def test_log_normalizer_matches_mpmath(d):
    k = torch.tensor(KAPPAS, dtype=torch.float64)
    got = log_vmf_normalizer(d, k)
    for kv, g in zip(KAPPAS, got.tolist()):
        ref = mp_log_c(d, kv)
        assert abs(g - ref) <= 5e-9 * max(1.0, abs(ref)), (d, kv, g, ref)


@pytest.mark.parametrize("d", [3, 16, 64, 512, 1024])
def test_log_prob_matches_scipy_where_finite(d):
    rng = np.random.default_rng(d)
    mu = rng.standard_normal(d)
    mu /= np.linalg.norm(mu)
    x = rng.standard_normal((4, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[0] = mu  # the mode
    checked = 0
    for k in KAPPAS:
        with np.errstate(divide="ignore"):
            ref = vonmises_fisher(mu, k).logpdf(x)
        if not np.all(np.isfinite(ref)):
            continue  # scipy's ive underflows at high d and small κ (FACTS.md)
        got = VonMisesFisher(torch.tensor(mu), torch.tensor(k, dtype=torch.float64)).log_prob(torch.tensor(x))
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-7, atol=1e-7 * max(1.0, k))
        checked += 1
    assert checked >= 3  # κ ≥ 1e3 is finite in scipy for every d here


def test_log_prob_is_finite_with_finite_gradients_in_float32():
    for d in (8, 512, 1024):
        loc = torch.randn(len(KAPPAS), d, requires_grad=True)
        log_k = torch.tensor([math.log(k) for k in KAPPAS], requires_grad=True)
        x = torch.nn.functional.normalize(torch.randn(len(KAPPAS), d), dim=-1)
        lp = VonMisesFisher(loc, log_k.exp()).log_prob(x)
        assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
        lp.sum().backward()
        assert torch.isfinite(log_k.grad).all() and torch.isfinite(loc.grad).all()


def test_d3_density_integrates_to_one():
    # on S^2 the density depends on w = μᵀx only, with surface measure 2π dw
    for k in (0.01, 1.0, 30.0):
        w = torch.linspace(-1, 1, 200001, dtype=torch.float64)
        dens = torch.exp(log_vmf_normalizer(3, torch.tensor(k, dtype=torch.float64)) + k * w)
        assert abs(float(torch.trapezoid(dens, w)) * 2 * math.pi - 1) < 1e-6


@pytest.mark.parametrize("d,k", [(3, 5.0), (16, 20.0), (64, 300.0), (512, 2421.0), (64, 1e-3)])
def test_rsample_unit_norm_and_mean(d, k):
    loc = torch.nn.functional.normalize(
        torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), dim=0
    )
    dist = VonMisesFisher(loc, torch.tensor(k, dtype=torch.float64))
    x = dist.rsample((4000,), generator=torch.Generator().manual_seed(0))
    assert x.shape == (4000, d)
    assert torch.allclose(x.norm(dim=-1), torch.ones(4000, dtype=torch.float64), atol=1e-9)
    expected = float(vmf_mean_resultant(d, torch.tensor(k, dtype=torch.float64)))
    got = float((x @ loc).mean())
    assert abs(got - expected) < 4 * float((x @ loc).std()) / math.sqrt(4000) + 1e-6
    assert torch.allclose(x.mean(0), dist.mean, atol=0.05)


def test_rsample_is_deterministic_and_differentiable_in_loc():
    loc = torch.randn(5, 8, requires_grad=True)
    k = torch.full((5,), 10.0)
    a = VonMisesFisher(loc, k).rsample(generator=torch.Generator().manual_seed(3))
    b = VonMisesFisher(loc, k).rsample(generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    (a * torch.randn(5, 8)).sum().backward()
    assert loc.grad is not None and loc.grad.abs().sum() > 0


def test_mean_resultant_limits():
    # A_d(κ) → κ/d as κ → 0 and → 1 − (d−1)/(2κ) as κ → ∞
    for d in (3, 8, 64, 512):
        small = float(vmf_mean_resultant(d, torch.tensor(1e-4, dtype=torch.float64)))
        assert abs(small - 1e-4 / d) < 1e-8
        big = float(vmf_mean_resultant(d, torch.tensor(1e6, dtype=torch.float64)))
        assert abs(big - (1 - (d - 1) / 2e6)) < 1e-6
    # FACTS.md: mean cosine 0.9 needs κ ≈ 299 at d = 64 and ≈ 2421 at d = 512
    assert abs(float(vmf_mean_resultant(64, torch.tensor(299.0))) - 0.9) < 2e-3
    assert abs(float(vmf_mean_resultant(512, torch.tensor(2421.0))) - 0.9) < 2e-3


@pytest.mark.parametrize("d,k", [(3, 2.0), (16, 10.0), (64, 100.0)])
def test_entropy_matches_monte_carlo_and_scipy(d, k):
    loc = torch.nn.functional.normalize(torch.randn(d, dtype=torch.float64), dim=0)
    dist = VonMisesFisher(loc, torch.tensor(k, dtype=torch.float64))
    x = dist.sample((20000,), generator=torch.Generator().manual_seed(0))
    mc = float(-dist.log_prob(x).mean())
    assert abs(float(dist.entropy()) - mc) < 0.05
    assert abs(float(dist.entropy()) - float(vonmises_fisher(loc.numpy(), k).entropy())) < 1e-6
    # the uniform distribution has the largest entropy: log of the sphere's area
    area = math.log(2) + (d / 2) * math.log(math.pi) - math.lgamma(d / 2)
    assert float(VonMisesFisher(loc, torch.tensor(1e-3, dtype=torch.float64)).entropy()) == pytest.approx(
        area, abs=1e-5
    )


@settings(max_examples=25, deadline=None)
@given(d=st.integers(2, 1024), log_k=st.floats(math.log(1e-3), math.log(1e5)))
def test_normalizer_derivative_is_minus_mean_resultant(d, log_k):
    # d/dκ log C_d(κ) = −A_d(κ): ties log_prob, mean and entropy together at any (d, κ)
    k = torch.tensor(math.exp(log_k), dtype=torch.float64, requires_grad=True)
    log_c = log_vmf_normalizer(d, k)
    assert torch.isfinite(log_c)
    (grad,) = torch.autograd.grad(log_c, k)
    a = vmf_mean_resultant(d, k.detach())
    assert 0 <= float(a) < 1
    assert abs(float(grad) + float(a)) < 1e-6 * max(1.0, float(a))


@pytest.mark.parametrize("d,k", [(3, 5.0), (64, 300.0), (64, 1e-3), (512, 1e4)])
def test_rsample_on_an_accelerator_reads_nothing_and_keeps_the_law(d, k):
    """Under the accelerator policy Wood's rounds are drawn ACCELERATOR_ROUNDS at a time and the
    host is never asked whether all were accepted (a sync, and what a CUDA graph cannot
    record); the draws keep the law: unit norm and the mean resultant A_d(κ)."""
    from engram_core.testing.host_reads import HostReads, as_on_an_accelerator

    loc = torch.nn.functional.normalize(
        torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(1)), dim=0
    )
    dist = VonMisesFisher(loc, torch.tensor(k, dtype=torch.float64))
    reads = HostReads()
    with as_on_an_accelerator(), reads:
        x = dist.rsample((4000,), generator=torch.Generator().manual_seed(0))
    assert reads.found == []
    assert torch.allclose(x.norm(dim=-1), torch.ones(4000, dtype=torch.float64), atol=1e-9)
    expected = float(vmf_mean_resultant(d, torch.tensor(k, dtype=torch.float64)))
    got = float((x @ loc).mean())
    assert abs(got - expected) < 4 * float((x @ loc).std()) / math.sqrt(4000) + 1e-6
    # and the CPU's one-round-at-a-time sampler asks once a round (what the policy avoids)
    cpu_reads = HostReads()
    with cpu_reads:
        dist.rsample((4000,), generator=torch.Generator().manual_seed(0))
    assert len(cpu_reads.found) >= 1


@pytest.mark.parametrize("d", [2, 3, 8, 64, 512, 1024])
def test_a_wood_round_accepts_often_enough_for_the_accelerators_fixed_rounds(d):
    """The accelerator's sampler draws ACCELERATOR_ROUNDS rounds and never asks whether one
    accepted; that is the exact law except with probability (1 − p)^rounds, p a round's
    acceptance. p falls with κ towards about 0.68-0.70 for every d: measured here from κ = 1e-3
    to 1e5, p ≥ 0.6, so the rounds reject together with probability below 0.4^32 ≈ 2e-13."""
    from engram_audio_mimi.distributions import ACCELERATOR_ROUNDS, _beta_symmetric

    g = torch.Generator().manual_seed(0)
    k = torch.logspace(-3, 5, 17, dtype=torch.float64).repeat_interleave(4000)
    m1 = d - 1.0
    b = m1 / (2 * k + torch.sqrt(4 * k * k + m1 * m1))
    x0 = (1 - b) / (1 + b)
    c = k * x0 + m1 * torch.log1p(-x0 * x0)
    e = _beta_symmetric(m1 / 2, k.shape, g, "cpu")
    u = torch.rand(k.shape, generator=g, dtype=torch.float64)
    cand = (1 - (1 + b) * e) / (1 - (1 - b) * e)
    accept = ((k * cand + m1 * torch.log1p(-x0 * cand) - c) >= torch.log(u)).double().view(17, 4000)
    p = accept.mean(1)
    assert float(p.min()) >= 0.6, p
    assert (1 - 0.6) ** ACCELERATOR_ROUNDS < 1e-12
