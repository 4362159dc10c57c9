"""The von Mises–Fisher distribution on the unit sphere S^{d-1}, stable in high dimension.

    p(x; μ, κ) = C_d(κ) exp(κ μᵀx),   log C_d(κ) = ν log κ − (d/2) log 2π − log I_ν(κ),  ν = d/2 − 1

torch has Bessel functions of order 0 and 1 only, and scipy's `ive` underflows for large
orders at small κ, so log I_ν is computed from the uniform asymptotic (Debye) expansion
with four correction terms, rewritten so that the ν log κ terms cancel analytically:
log C_d is then finite at κ → 0 and smooth in κ (autograd gives ∂/∂κ). d = 2 uses the
exact `i0e`, d = 3 the closed form κ / (4π sinh κ). Internals run in float64.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Distribution, constraints

from engram_core.run.accel import host_reads_free

# Wood's sampler on an accelerator: rounds drawn together, with no host check. A round accepts
# with probability >= 0.68 for every d and κ (the limit as κ grows; measured from d = 3 to 512
# and κ = 1e-3 to 1e5, tests/test_audio_distributions.py), so all 32 rounds reject with
# probability below 0.32**32 ≈ 1.5e-16: such a draw keeps its last candidate.
ACCELERATOR_ROUNDS = 32

_LOG_2PI = math.log(2 * math.pi)
_DEBYE_MIN_ORDER = 20.0  # below this order the 4-term Debye series loses digits


def _debye_series(nu: float, t: torch.Tensor) -> torch.Tensor:
    """log(1 + u1(t)/ν + u2(t)/ν² + u3(t)/ν³ + u4(t)/ν⁴) of the Debye expansion (Horner form)."""
    p = t * t
    u1 = t * (3 - 5 * p) / (24 * nu)
    u2 = p * (81 + p * (-462 + 385 * p)) / (1152 * nu**2)
    u3 = t * p * (30375 + p * (-369603 + p * (765765 - 425425 * p))) / (414720 * nu**3)
    u4 = p * p * (4465125 + p * (-94121676 + p * (349922430 + p * (-446185740 + 185910725 * p)))) / (39813120 * nu**4)
    return torch.log1p(u1 + u2 + u3 + u4)


def log_bessel_iv_scaled(nu: float, kappa: torch.Tensor) -> torch.Tensor:
    """g_ν(κ) = log I_ν(κ) − ν log κ, finite at κ = 0 (order ν ≥ 1/2 by Debye, ν = 0 exactly).

    Debye: log I_ν(νx) ≈ νη − ½log(2πν) − ¼log(1+x²) + series, with
    νη = √(ν²+κ²) + ν log κ − ν log(ν + √(ν²+κ²)).
    """
    k = kappa.to(torch.float64)
    if nu == 0:
        return torch.log(torch.special.i0e(k)) + k
    if nu < _DEBYE_MIN_ORDER:
        # Low orders: Debye at order ν+M (accurate) and Miller's downward recurrence on
        # s_μ = I_{μ+1}/(κ I_μ):  s_{μ−1} = 1 / (2μ + κ² s_μ), which is stable downward.
        m = math.ceil(_DEBYE_MIN_ORDER - nu)
        top = log_bessel_iv_scaled(nu + m, k)
        s = torch.exp(log_bessel_iv_scaled(nu + m + 1, k) - top)
        total = top
        for j in range(m - 1, -1, -1):
            s = 1.0 / (2 * (nu + j + 1) + k * k * s)
            total = total - torch.log(s)
        return total
    root = torch.sqrt(nu * nu + k * k)
    t = nu / root
    return (
        root
        - nu * torch.log(nu + root)
        - 0.5 * math.log(2 * math.pi * nu)
        + 0.5 * torch.log(t)  # −¼ log(1 + x²) with 1 + x² = 1/t²
        + _debye_series(nu, t)
    )


def log_vmf_normalizer(dim: int, kappa: torch.Tensor) -> torch.Tensor:
    """log C_d(κ) in float64, finite for κ ≥ 0."""
    k = kappa.to(torch.float64)
    if dim == 3:
        # C_3 = κ / (4π sinh κ); log(κ / sinh κ) computed without overflow or 0/0.
        small = k < 1e-4
        ks = torch.where(small, torch.ones_like(k), k)
        log_sinh = ks + torch.log(-torch.expm1(-2 * ks)) - math.log(2.0)
        ratio = torch.where(small, -k * k / 6, torch.log(ks) - log_sinh)
        return ratio - math.log(4 * math.pi)
    nu = dim / 2 - 1
    return -(dim / 2) * _LOG_2PI - log_bessel_iv_scaled(nu, k)


def vmf_mean_resultant(dim: int, kappa: torch.Tensor) -> torch.Tensor:
    """A_d(κ) = I_{d/2}(κ) / I_{d/2−1}(κ) = E[μᵀx], in float64."""
    k = kappa.to(torch.float64)
    if dim == 3:
        small = k < 1e-3
        ks = torch.where(small, torch.ones_like(k), k)
        exact = 1.0 / torch.tanh(ks) - 1.0 / ks
        return torch.where(small, k / 3, exact)
    nu = dim / 2 - 1
    return k * torch.exp(log_bessel_iv_scaled(nu + 1, k) - log_bessel_iv_scaled(nu, k))


def vmf_log_normalizer_and_resultant(dim: int, kappa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log C_d(κ), A_d(κ)) sharing the log I_ν evaluation (what a rollout step needs)."""
    if dim == 3:
        return log_vmf_normalizer(dim, kappa), vmf_mean_resultant(dim, kappa)
    k = kappa.to(torch.float64)
    nu = dim / 2 - 1
    g_nu = log_bessel_iv_scaled(nu, k)
    log_c = -(dim / 2) * _LOG_2PI - g_nu
    return log_c, k * torch.exp(log_bessel_iv_scaled(nu + 1, k) - g_nu)


class VonMisesFisher(Distribution):
    """vMF(loc, concentration) on the unit sphere of R^d.

    loc: (…, d), unit norm (normalised here). concentration: (…) κ ≥ 0.
    `log_prob` is stable for d ≤ 1024 and κ in [1e-3, 1e5]. `rsample` uses Wood's (1994)
    rejection sampler; gradients flow to `loc` through the Householder reflection, not
    to `concentration` (the accepted w is treated as a constant).
    """

    arg_constraints = {"loc": constraints.real_vector, "concentration": constraints.nonnegative}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: torch.Tensor, concentration: torch.Tensor, validate_args: bool | None = None):
        self.loc = loc / loc.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.concentration = concentration
        self.dim = loc.shape[-1]
        if self.dim < 2:
            raise ValueError(f"the vMF needs dimension >= 2, got {self.dim}")
        batch_shape = torch.broadcast_shapes(loc.shape[:-1], concentration.shape)
        super().__init__(batch_shape, torch.Size([self.dim]), validate_args=validate_args)

    def log_normalizer(self) -> torch.Tensor:
        return log_vmf_normalizer(self.dim, self.concentration).to(self.loc.dtype)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        cos = (self.loc * value).sum(-1)
        return self.log_normalizer() + self.concentration * cos

    @property
    def mean(self) -> torch.Tensor:
        return vmf_mean_resultant(self.dim, self.concentration).to(self.loc.dtype).unsqueeze(-1) * self.loc

    @property
    def mode(self) -> torch.Tensor:
        return self.loc

    def entropy(self) -> torch.Tensor:
        k = self.concentration.to(torch.float64)
        h = -log_vmf_normalizer(self.dim, k) - k * vmf_mean_resultant(self.dim, k)
        return h.to(self.loc.dtype)

    def _sample_w(self, shape: torch.Size, generator: torch.Generator | None) -> torch.Tensor:
        """Wood's rejection sampler for w = μᵀx, vectorised; float64 on the loc's device.

        On the CPU one round is drawn at a time until every draw is accepted (the random
        stream every published CPU row was made with). On an accelerator asking the host
        whether all were accepted is a synchronisation (and a CUDA graph cannot record it), so
        `ACCELERATOR_ROUNDS` independent rounds are drawn at once and each draw keeps its first
        accepted candidate: the same law except for the draws no round accepts, which keep the
        last candidate (probability below 1.5e-16 a draw; see ACCELERATOR_ROUNDS)."""
        d = self.dim
        dev = self.loc.device
        k = self.concentration.detach().to(torch.float64).expand(self.batch_shape).expand(shape)
        m1 = d - 1.0
        b = m1 / (2 * k + torch.sqrt(4 * k * k + m1 * m1))  # stable form of (−2κ + √(4κ²+(d−1)²))/(d−1)
        x0 = (1 - b) / (1 + b)
        c = k * x0 + m1 * torch.log1p(-x0 * x0)

        def round_of(draw_shape):
            # Beta((d−1)/2, (d−1)/2) from normal draws (honours the generator), then Wood's test
            e = _beta_symmetric(m1 / 2, draw_shape, generator, dev)
            u = torch.rand(draw_shape, generator=generator, dtype=torch.float64, device=dev)
            cand = (1 - (1 + b) * e) / (1 - (1 - b) * e)
            return cand, (k * cand + m1 * torch.log1p(-x0 * cand) - c) >= torch.log(u)

        if not host_reads_free(dev):
            cand, accept = round_of((ACCELERATOR_ROUNDS, *k.shape))
            # each draw's first accepted round (argmax returns the first maximum); none: the last
            first = torch.where(accept.any(0), accept.to(torch.uint8).argmax(0), ACCELERATOR_ROUNDS - 1)
            return cand.gather(0, first.unsqueeze(0)).squeeze(0)
        w = torch.zeros_like(k)
        done = torch.zeros_like(k, dtype=torch.bool)
        for i in range(200):
            # nothing is accepted before the first round: no need to ask then (unless empty)
            if (i > 0 or k.numel() == 0) and bool(done.all()):
                break
            cand, accept = round_of(k.shape)
            w = torch.where(accept & ~done, cand, w)
            done = done | accept
        return w

    def rsample(
        self, sample_shape: torch.Size = torch.Size(), generator: torch.Generator | None = None
    ) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)[:-1]
        d = self.dim
        dev = self.loc.device
        w = self._sample_w(torch.Size(shape), generator)
        v = torch.randn(tuple(shape) + (d - 1,), generator=generator, dtype=torch.float64, device=dev)
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        x = torch.cat([w.unsqueeze(-1), torch.sqrt((1 - w * w).clamp_min(0)).unsqueeze(-1) * v], -1)
        x = x.to(self.loc.dtype)
        # Householder reflection that maps e1 onto loc (differentiable in loc).
        loc = self.loc.expand(tuple(shape) + (d,))
        e1 = torch.zeros_like(loc)
        e1[..., 0] = 1
        h = e1 - loc
        hn = h.norm(dim=-1, keepdim=True)
        h = torch.where(hn > 1e-6, h / hn.clamp_min(1e-12), torch.zeros_like(h))
        return x - 2 * (x * h).sum(-1, keepdim=True) * h

    def sample(self, sample_shape: torch.Size = torch.Size(), generator: torch.Generator | None = None) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape, generator)


def _beta_symmetric(a: float, shape: torch.Size, generator: torch.Generator | None, device) -> torch.Tensor:
    """Beta(a, a) draws that honour `generator`.

    torch's Beta/Gamma samplers take no generator; for a ≥ 1 (every d ≥ 3), the Beta(a, a)
    variable equals (1 + cos θ)/2 of a uniform direction on S^{2a}, which only needs normal
    draws: the first coordinate x1 of a uniform point on S^{2a} satisfies (1 + x1)/2 ~ Beta(a, a)
    when 2a is an integer (d − 1 = 2a). d = 2 gives a = 1/2: the arcsine law, (1 + cos πU)/2.
    """
    two_a = int(round(a * 2))
    if two_a <= 1:
        u = torch.rand(shape, generator=generator, dtype=torch.float64, device=device)
        return (1 + torch.cos(math.pi * u)) / 2
    g = torch.randn(tuple(shape) + (two_a + 1,), generator=generator, dtype=torch.float64, device=device)
    x1 = g[..., 0] / g.norm(dim=-1).clamp_min(1e-30)
    return (1 + x1) / 2
