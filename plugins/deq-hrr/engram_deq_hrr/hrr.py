"""Holographic reduced representations (Plate 1995): binding by circular convolution.

All functions act on the last dimension and accept any leading batch shape. Binding and
unbinding go through the real FFT, so they cost O(d log d) per pair instead of O(d^2).

    bind(a, b)          a ⊛ b            (commutative, associative)
    unbind(trace, key)  key # trace      circular correlation, the involution "approximate inverse"
    unbind(..., mode="inverse")          regularised exact inverse  F⁻¹(F(m)·conj(F(k)) / (|F(k)|²+ε))
    make_unitary(k)                      |F(k)_f| = 1 for every frequency: k # (k ⊛ v) = v exactly
"""

from __future__ import annotations

import math

import torch

from engram_core.config import ConfigError

# Prime factors the FFT handles with its fast kernels; a dimension made only of these
# (and even, so the unitary projection has a real Nyquist bin) is "suited to the FFT path".
_SMOOTH_PRIMES = (2, 3, 5, 7)


def check_fft_dim(dim: int, key: str = "dim") -> None:
    """Raise ConfigError unless `dim` is even, >= 4 and has no prime factor above 7."""
    if dim < 4 or dim % 2:
        raise ConfigError(key, f"HRR dimension {dim} is not suited to the FFT path: it must be even and >= 4 (e.g. 64, 96, 128, 256)")
    rest = dim
    for p in _SMOOTH_PRIMES:
        while rest % p == 0:
            rest //= p
    if rest != 1:
        raise ConfigError(
            key,
            f"HRR dimension {dim} is not suited to the FFT path: it has the prime factor {rest if _is_prime(rest) else _largest_prime(rest)} "
            "(allowed: products of 2, 3, 5, 7, e.g. 64, 96, 128, 256)",
        )


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % i for i in range(2, int(math.isqrt(n)) + 1))


def _largest_prime(n: int) -> int:
    best, i = 1, 2
    while i * i <= n:
        while n % i == 0:
            best, n = i, n // i
        i += 1
    return max(best, n)


def bind(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Circular convolution a ⊛ b along the last dimension."""
    d = a.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(a, dim=-1) * torch.fft.rfft(b, dim=-1), n=d, dim=-1)


def unbind(trace: torch.Tensor, key: torch.Tensor, mode: str = "correlation", eps: float = 1e-3) -> torch.Tensor:
    """Recover the value bound to `key` in `trace`.

    ``correlation``: key # trace, i.e. binding with the involution of the key (Plate's
    approximate inverse); noisy but stable for any key. ``inverse``: a Wiener-regularised
    exact inverse, exact for keys with no near-zero frequency, unstable otherwise (eps guards).
    """
    d = trace.shape[-1]
    m = torch.fft.rfft(trace, dim=-1)
    k = torch.fft.rfft(key, dim=-1)
    if mode == "correlation":
        out = m * k.conj()
    elif mode == "inverse":
        out = m * k.conj() / (k.abs().pow(2) + eps)
    else:
        raise ConfigError("unbind", f"must be 'correlation' or 'inverse', got {mode!r}")
    return torch.fft.irfft(out, n=d, dim=-1)


def involution(a: torch.Tensor) -> torch.Tensor:
    """a†: a†[i] = a[-i mod d]; bind(a†, m) == unbind(m, a) (correlation)."""
    return torch.roll(torch.flip(a, dims=(-1,)), shifts=1, dims=-1)


def make_unitary(key: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Project onto unitary vectors: every Fourier coefficient gets modulus 1.

    The result has unit L2 norm and k # (k ⊛ v) = v exactly. The DC (and, for even d,
    Nyquist) bins are real; they become ±1.
    """
    d = key.shape[-1]
    f = torch.fft.rfft(key, dim=-1)
    f = f / (f.abs() + eps)
    return torch.fft.irfft(f, n=d, dim=-1)


def random_keys(shape: tuple[int, ...], dim: int, generator: torch.Generator | None = None, unitary: bool = False) -> torch.Tensor:
    """Plate's random vectors: i.i.d. N(0, 1/d) (unit norm in expectation), optionally unitary."""
    k = torch.randn(*shape, dim, generator=generator) / math.sqrt(dim)
    return make_unitary(k) if unitary else k


def expected_recall_cosine(n_pairs: int, unitary: bool = False) -> float:
    """Expected cosine between the value unbound from a trace of n superposed pairs and the true value.

    With unitary keys the self term is exact and each of the other n-1 pairs adds noise
    of the value's norm: cos ≈ 1/√n. With Gaussian keys the self term k#k ≈ δ carries
    about one extra pair's worth of noise: cos ≈ 1/√(n+1). Nearly independent of d
    (d matters for clean-up among many items, not for this cosine).
    """
    if n_pairs < 1:
        raise ValueError("n_pairs must be >= 1")
    return 1.0 / math.sqrt(n_pairs if unitary else n_pairs + 1)


def cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=eps)


def dft_matrices(dim: int, dtype=torch.float32, device=None) -> dict[str, torch.Tensor]:
    """Real DFT matrices of an even `dim`, so binding runs as dense matmuls.

    ``x @ cos`` and ``-(x @ sin)`` are the real and imaginary parts of ``rfft(x)``;
    ``re @ icos + im @ isin`` is ``irfft(re + i·im)``. On CPU, autograd through
    ``torch.fft.rfft`` is several times slower than the forward (its backward runs a
    full complex FFT on a padded copy); for d <= a few hundred the matmul form is
    faster in both directions and computes exactly the same circular convolution.
    """
    n = torch.arange(dim, dtype=torch.float64)
    k = torch.arange(dim // 2 + 1, dtype=torch.float64)
    ang = 2 * math.pi * n[:, None] * k[None, :] / dim  # (d, d/2+1)
    w = torch.full((dim // 2 + 1,), 2.0, dtype=torch.float64)
    w[0] = 1.0
    if dim % 2 == 0:
        w[-1] = 1.0
    out = {
        "cos": torch.cos(ang),
        "sin": torch.sin(ang),
        "icos": (w[:, None] * torch.cos(ang.T)) / dim,
        "isin": (-w[:, None] * torch.sin(ang.T)) / dim,
    }
    return {key: v.to(dtype=dtype, device=device) for key, v in out.items()}


def bind_dft(a: torch.Tensor, b: torch.Tensor, m: dict[str, torch.Tensor]) -> torch.Tensor:
    """`bind` through dense DFT matrices (see `dft_matrices`)."""
    ar, ai = a @ m["cos"], -(a @ m["sin"])
    br, bi = b @ m["cos"], -(b @ m["sin"])
    return (ar * br - ai * bi) @ m["icos"] + (ar * bi + ai * br) @ m["isin"]


def unbind_dft(trace: torch.Tensor, key: torch.Tensor, m: dict[str, torch.Tensor], mode: str = "correlation",
               eps: float = 1e-3) -> torch.Tensor:
    """`unbind` through dense DFT matrices (see `dft_matrices`)."""
    tr, ti = trace @ m["cos"], -(trace @ m["sin"])
    kr, ki = key @ m["cos"], -(key @ m["sin"])
    re, im = kr * tr + ki * ti, kr * ti - ki * tr  # conj(K)·M
    if mode == "inverse":
        power = kr * kr + ki * ki + eps
        re, im = re / power, im / power
    elif mode != "correlation":
        raise ConfigError("unbind", f"must be 'correlation' or 'inverse', got {mode!r}")
    return re @ m["icos"] + im @ m["isin"]
