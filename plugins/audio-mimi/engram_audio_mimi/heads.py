"""Dynamics heads for p(Δz | z): a diagonal Gaussian MLP and vMF direction × log-normal magnitude.

Both implement the protocol the objectives and metrics of this plugin use:

    head.nll(z, dz)            per-item NLL of Δz in nats (summed over D), shape (B,)
    head.mean_step(z)          E[Δz | z], the step of a mean rollout, (B, D)
    head.sample_step(z, g)     a reparameterised draw of Δz (g: torch.Generator or None)

The NLLs of both heads are densities of Δz in R^D, so they compare directly (the vMF
head includes the Jacobian of the polar change of variables, D·log m).
"""

from __future__ import annotations

import math

import attrs
import torch
from torch import nn

from engram_core.builtin.dynamics import MLPGaussianConfig, MLPGaussianHead
from engram_core.components import BuildContext, Head
from engram_core.config import ConfigError, field, non_negative, positive
from engram_core.nn import diagonal_gaussian_nll_per_item

from .distributions import VonMisesFisher, vmf_log_normalizer_and_resultant, vmf_mean_resultant
from .generation import nll_and_step  # noqa: F401  (the protocol helper, re-exported)

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _check_dim(cfg_dim: int, build: BuildContext) -> int:
    data_dim = int(build.spec.dim)
    if cfg_dim and cfg_dim != data_dim:
        raise ConfigError(
            "dim",
            f"head dimension {cfg_dim} does not match the data's D = {data_dim} (leave dim = 0 to take it from the data)",
        )
    return data_dim


def _mlp(d_in: int, hidden: int, layers: int) -> tuple[nn.Sequential, int]:
    mods: list[nn.Module] = []
    width = d_in
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.GELU()]
        width = hidden
    return nn.Sequential(*mods), width


@attrs.frozen
class GaussianMLPConfig:
    hidden: int = field(256, help="width of each hidden layer", validator=positive)
    layers: int = field(2, help="number of hidden layers", validator=positive)
    min_log_sigma: float = field(-7.0, help="floor on predicted log σ (keeps the NLL finite)")
    dim: int = field(
        0, help="D of z; 0 = take it from the data (a different value is an error)", validator=non_negative
    )


class GaussianMLPHead(MLPGaussianHead):
    """μ(z) and diagonal log σ(z) of Δz from an MLP. A `residual` memory edits (μ, log σ)."""

    def __init__(self, cfg: GaussianMLPConfig, build: BuildContext):
        _check_dim(cfg.dim, build)
        super().__init__(
            MLPGaussianConfig(hidden=cfg.hidden, layers=cfg.layers, min_log_sigma=cfg.min_log_sigma), build
        )
        self.dim = int(build.spec.dim)

    def predict_param(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The parametric prediction alone (no memory)."""
        h = self.trunk(z)
        return self.mu(h), self.log_sigma(h).clamp_min(self.min_log_sigma)

    def predict(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_sigma = self.predict_param(z)
        if self.memory_active:
            mu, log_sigma = self.memory.apply_residual(z, mu, log_sigma)
        return mu, log_sigma

    def nll(self, z: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
        mu, log_sigma = self.predict(z)
        return diagonal_gaussian_nll_per_item(mu, log_sigma, dz)

    def mean_step(self, z: torch.Tensor) -> torch.Tensor:
        return self.predict(z)[0]

    def nll_and_step(self, z, dz, mode: str = "mean", generator=None):
        """(NLL of dz | z, the rollout step from z) from one forward pass."""
        mu, log_sigma = self.predict(z)
        nll = diagonal_gaussian_nll_per_item(mu, log_sigma, dz)
        if mode == "mean":
            return nll, mu
        return nll, mu + log_sigma.exp() * torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)

    def sample_step(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mu, log_sigma = self.predict(z)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + log_sigma.exp() * eps


@attrs.frozen
class VMFMagnitudeConfig:
    hidden: int = field(256, help="width of each hidden layer of the shared trunk", validator=positive)
    layers: int = field(2, help="number of hidden layers", validator=positive)
    min_log_kappa: float = field(math.log(1e-3), help="floor on log κ")
    max_log_kappa: float = field(math.log(1e5), help="ceiling on log κ")
    init_log_kappa: float = field(0.0, help="initial log κ offset; 0 = log D (a moderate concentration)")
    min_log_sigma: float = field(-5.0, help="floor on the log-normal magnitude's log σ")
    kappa_coupling: str = field(
        "none",
        help="couple log κ to the predicted log magnitude: none | learned "
        "(log κ += c · E(log m), c a learned scalar, so small steps get vaguer directions)",
        validator=lambda i, a, v: _choice(a, v, ("none", "learned")),
    )
    min_magnitude: float = field(
        1e-6, help="‖Δz‖ below this is clamped before taking its direction", validator=positive
    )
    magnitude_ceiling: float = field(
        2.0,
        help="soft ceiling on the predicted log magnitude μ_m at log(this × the largest train ‖Δz‖), and "
        "σ_m <= 1: off the data, a linear extrapolation of log m would grow steps exponentially; 0 = off",
        validator=non_negative,
    )
    subspace: int = field(
        0,
        help="model the step's direction on the sphere of the r-dimensional principal subspace of the train "
        "Δz (r = this; the data must provide dz_cov) and the rest of Δz as an isotropic Gaussian around a "
        "linear prediction; 0 = the direction lives in all D dimensions",
        validator=non_negative,
    )
    dim: int = field(0, help="D of z; 0 = take it from the data", validator=non_negative)


def _choice(attribute, value, choices):
    if value not in choices:
        raise ConfigError(attribute.name, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")


class VMFMagnitudeHead(Head):
    """Δz = m·u: u ~ vMF(μ_dir(z), κ(z)) on S^{D−1}, log m ~ N(μ_m(z), σ_m(z)²).

    With `subspace = r`: Δz = U a + b, U (D × r) the top principal directions of the train
    Δz (fixed at build, a buffer), a = m·u with u ~ vMF on S^{r−1} and log m as above, and b
    in the orthogonal complement ~ N(P⊥ (W z + c), σ⊥² I) with a learned linear mean (the
    observation-noise cancellation a one-step model learns) and one σ⊥. A sampled step then
    puts its direction noise inside the data's subspace instead of spreading it over all D
    directions (docs/results/audio-mimi.md, stable generation).

    Offers the `direction` attachment point: a memory's `direction(z, μ_dir, log κ)`
    returns the edited pair (memory-as-basis); not with `subspace`."""

    def attach_memory(self, memory, point):
        if self.basis is not None:
            raise ConfigError("memory", "a direction memory needs the vMF head's direction in all D dimensions: set head.subspace = 0")
        if not hasattr(memory, "direction"):
            raise ConfigError(
                "memory", f"the vMF head takes only a memory with a 'direction' attachment (basis), got {type(memory).__name__}"
            )
        super().attach_memory(memory, "direction")

    def __init__(self, cfg: VMFMagnitudeConfig, build: BuildContext):
        super().__init__()
        d = _check_dim(cfg.dim, build)
        self.cfg = cfg
        self.dim = d
        self.trunk, width = _mlp(d, cfg.hidden, cfg.layers)
        self.sphere_dim = self._build_subspace(cfg.subspace, d, build)
        self.direction = nn.Linear(width, self.sphere_dim)
        self.log_kappa = nn.Linear(width, 1)
        self.log_m = nn.Linear(width, 2)  # (μ_m, log σ_m)
        nn.init.constant_(self.log_kappa.bias, cfg.init_log_kappa or math.log(self.sphere_dim))
        max_step = build.spec.get("dz_max_norm") if hasattr(build.spec, "get") else None
        self.max_log_m = math.log(cfg.magnitude_ceiling * max_step) if cfg.magnitude_ceiling and max_step else None
        if cfg.kappa_coupling == "learned":
            self.coupling = nn.Parameter(torch.zeros(()))
        else:
            self.register_parameter("coupling", None)

    def _build_subspace(self, r: int, d: int, build: BuildContext) -> int:
        """The sphere's dimension; with r > 0 the basis U, the complement's linear mean and σ⊥."""
        if not r:
            self.register_buffer("basis", None)
            return d
        if r >= d:
            raise ConfigError("subspace", f"must be below the data's D = {d} (0 = all of it), got {r}")
        cov = build.spec.get("dz_cov") if hasattr(build.spec, "get") else None
        if cov is None:
            raise ConfigError("subspace", "needs the train Δz covariance from the data set (spec field dz_cov; zdyn provides it)")
        evals, evecs = torch.linalg.eigh(cov.double())  # ascending
        self.register_buffer("basis", evecs[:, -r:].flip(-1).float().contiguous())
        self.off_mean = nn.Linear(d, d)  # P⊥ (W z + c): starts at 0
        nn.init.zeros_(self.off_mean.weight)
        nn.init.zeros_(self.off_mean.bias)
        off_var = float(evals[:-r].clamp_min(0).sum()) / (d - r)  # the complement's variance per dimension
        self.log_sigma_off = nn.Parameter(torch.tensor(0.5 * math.log(max(off_var, 1e-12))))
        return r

    def _split(self, dz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the subspace coordinates a = Uᵀ Δz, the complement b = Δz − U a)."""
        a = dz @ self.basis
        return a, dz - a @ self.basis.T

    def _off_mean(self, z: torch.Tensor) -> torch.Tensor:
        mu = self.off_mean(z)
        return mu - (mu @ self.basis) @ self.basis.T

    def _off_nll(self, c: dict, b: torch.Tensor) -> torch.Tensor:
        ls = self.log_sigma_off.clamp_min(self.cfg.min_log_sigma)
        free = self.dim - self.sphere_dim
        return 0.5 * (b - c["mu_off"]).pow(2).sum(-1) * torch.exp(-2 * ls) + free * (ls + _HALF_LOG_2PI)

    def step_magnitude(self, dz: torch.Tensor) -> torch.Tensor:
        """m, the magnitude the log-normal models: ‖Δz‖, or ‖Uᵀ Δz‖ with a subspace."""
        return (dz if self.basis is None else dz @ self.basis).norm(dim=-1)

    def raw_outputs(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(unnormalised direction, log κ, μ_m, log σ_m) before the ceilings, coupling and memory."""
        h = self.trunk(z)
        # this order of the three layers (direction, magnitude, κ) fixes the order in which the
        # backward sums their gradients into h: the published results were made with it
        direction = self.direction(h)
        mu_m, log_sigma_m = self.log_m(h).unbind(-1)
        return direction, self.log_kappa(h).squeeze(-1), mu_m, log_sigma_m

    def components(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        direction, log_kappa, mu_m, log_sigma_m = self.raw_outputs(z)
        if self.max_log_m is not None:  # soft ceiling, identity well below it
            mu_m = self.max_log_m - nn.functional.softplus(self.max_log_m - mu_m)
            log_sigma_m = log_sigma_m.clamp_max(0.0)
        if self.coupling is not None:
            log_kappa = log_kappa + self.coupling * mu_m
        if self.memory_active:  # a `direction` memory (basis) edits the direction and κ
            direction, log_kappa = self.memory.direction(z, direction, log_kappa)
        log_kappa = log_kappa.clamp(self.cfg.min_log_kappa, self.cfg.max_log_kappa)
        unit = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        out = {
            "direction": unit,  # μ_dir in R^D (U μ_dir with a subspace: still a unit vector)
            "sphere_direction": unit,  # μ_dir on the vMF's own sphere
            "kappa": log_kappa.exp(),
            "log_kappa": log_kappa,
            "mu_log_m": mu_m,
            "log_sigma_log_m": log_sigma_m.clamp_min(self.cfg.min_log_sigma),
        }
        if self.basis is not None:
            out["direction"] = unit @ self.basis.T
            out["mu_off"] = self._off_mean(z)
        return out

    def distribution(self, z: torch.Tensor) -> tuple[VonMisesFisher, torch.distributions.Normal, dict]:
        c = self.components(z)
        vmf = VonMisesFisher(c["sphere_direction"], c["kappa"], validate_args=False)
        lognorm = torch.distributions.Normal(c["mu_log_m"], c["log_sigma_log_m"].exp(), validate_args=False)
        return vmf, lognorm, c

    def _nll(self, vmf, lognorm, dz, c):
        a, off = (dz, 0.0) if self.basis is None else self._split(dz)
        m = a.norm(dim=-1).clamp_min(self.cfg.min_magnitude)
        u = a / m.unsqueeze(-1)
        log_m = m.log()
        # density of Δz in R^D: p(log m) · p(u) / m^r (polar Jacobian m^{r−1} and d log m = dm / m,
        # r = D without a subspace), times the complement's Gaussian density
        nll = -lognorm.log_prob(log_m) - vmf.log_prob(u) + self.sphere_dim * log_m
        return nll if self.basis is None else nll + self._off_nll(c, off)

    def nll(self, z: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
        vmf, lognorm, c = self.distribution(z)
        return self._nll(vmf, lognorm, dz, c)

    def _mean_step(self, c):
        mean_m = torch.exp(c["mu_log_m"] + 0.5 * (2 * c["log_sigma_log_m"]).exp())
        resultant = vmf_mean_resultant(self.sphere_dim, c["kappa"]).to(c["direction"].dtype)
        step = (mean_m * resultant).unsqueeze(-1) * c["direction"]
        return step if self.basis is None else step + c["mu_off"]

    def mean_step(self, z: torch.Tensor) -> torch.Tensor:
        return self._mean_step(self.components(z))

    def _sample_step(self, vmf, c, generator):
        u = vmf.rsample(generator=generator)
        eps = torch.randn(c["mu_log_m"].shape, generator=generator, device=u.device, dtype=u.dtype)
        m = torch.exp(c["mu_log_m"] + c["log_sigma_log_m"].exp() * eps)
        step = m.unsqueeze(-1) * u
        if self.basis is None:
            return step
        noise = torch.randn(c["mu_off"].shape, generator=generator, device=u.device, dtype=u.dtype)
        noise = noise - (noise @ self.basis) @ self.basis.T
        sigma = self.log_sigma_off.clamp_min(self.cfg.min_log_sigma).exp()
        return step @ self.basis.T + c["mu_off"] + sigma * noise

    def nll_and_step(self, z, dz, mode: str = "mean", generator=None):
        """(NLL of dz | z, the rollout step from z) from one forward pass."""
        if mode == "mean":  # share the Bessel evaluation between log C_r(κ) and A_r(κ)
            c = self.components(z)
            log_c, resultant = vmf_log_normalizer_and_resultant(self.sphere_dim, c["kappa"])
            a, off = (dz, None) if self.basis is None else self._split(dz)
            m = a.norm(dim=-1).clamp_min(self.cfg.min_magnitude)
            log_m = m.log()
            cos = (c["sphere_direction"] * a).sum(-1) / m
            sigma_m = c["log_sigma_log_m"].exp()
            nll_m = 0.5 * ((log_m - c["mu_log_m"]) / sigma_m) ** 2 + c["log_sigma_log_m"] + _HALF_LOG_2PI
            nll = nll_m - (log_c.to(z.dtype) + c["kappa"] * cos) + self.sphere_dim * log_m
            mean_m = torch.exp(c["mu_log_m"] + 0.5 * sigma_m**2)
            step = (mean_m * resultant.to(z.dtype)).unsqueeze(-1) * c["direction"]
            if off is not None:
                nll, step = nll + self._off_nll(c, off), step + c["mu_off"]
            return nll, step
        vmf, lognorm, c = self.distribution(z)
        step = self._mean_step(c) if mode == "mean" else self._sample_step(vmf, c, generator)
        return self._nll(vmf, lognorm, dz, c), step

    def sample_step(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        vmf, lognorm, c = self.distribution(z)
        return self._sample_step(vmf, c, generator)

    def forward(self, z):
        return self.mean_step(z)


# ---- protocol helpers that also accept the core's mlp_gaussian head -----------------------


def step_nll(head: nn.Module, z: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    if hasattr(head, "nll"):
        return head.nll(z, dz)
    mu, log_sigma = head.predict(z)
    return diagonal_gaussian_nll_per_item(mu, log_sigma, dz)


def mean_step(head: nn.Module, z: torch.Tensor) -> torch.Tensor:
    if hasattr(head, "mean_step"):
        return head.mean_step(z)
    return head.predict(z)[0]


def sample_step(head: nn.Module, z: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if hasattr(head, "sample_step"):
        return head.sample_step(z, generator)
    mu, log_sigma = head.predict(z)
    return mu + log_sigma.exp() * torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)


def baseline_nll(spec, dz: torch.Tensor) -> torch.Tensor:
    """Per-item NLL of Δz under the unconditional diagonal Gaussian fitted on train."""
    mu = spec.dz_mean.to(dz.device, dz.dtype)
    ls = spec.dz_log_std.to(dz.device, dz.dtype)
    return diagonal_gaussian_nll_per_item(mu, ls, dz)
