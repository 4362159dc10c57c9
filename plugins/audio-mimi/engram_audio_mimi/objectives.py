"""Objectives: one-step NLL, K-step rollout NLL, and their mix.

Rollout (the seed's Phase 4.5): from a true z_0, ẑ_{t+1} = ẑ_t + μ(ẑ_t) (mean rollout) or
ẑ_t + Δ̃ with Δ̃ a reparameterised draw (sampled rollout); at every step the *true* Δz_t
is scored under the model conditioned on ẑ_t. An optional clip stabiliser rescales ẑ to
norm ≤ `clip_norm` after each step.
"""

from __future__ import annotations

import attrs
import torch

from engram_core.components import BuildContext, Objective
from engram_core.config import ConfigError, field, in_range, non_negative, one_of

from .heads import nll_and_step, step_nll


def rollout(
    head,
    z0: torch.Tensor,
    dz: torch.Tensor,
    mode: str = "mean",
    clip_norm: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Unroll K = dz.shape[1] steps from z0. Returns per (item, step): nll, state norm ‖ẑ_{t+1}‖,
    predicted step norm ‖Δẑ_t‖ and whether the clip fired after the step."""
    z = z0
    nlls, norms, steps, clipped = [], [], [], []
    for t in range(dz.shape[1]):
        nll, step = nll_and_step(head, z, dz[:, t], mode, generator)
        nlls.append(nll)
        steps.append(step.norm(dim=-1))
        z = z + step
        if clip_norm > 0:
            n = z.norm(dim=-1, keepdim=True)
            over = n > clip_norm
            z = torch.where(over, z * (clip_norm / n.clamp_min(1e-12)), z)
            clipped.append(over.squeeze(-1))
        else:
            clipped.append(torch.zeros(z.shape[0], dtype=torch.bool, device=z.device))
        norms.append(z.norm(dim=-1))  # ‖ẑ_{t+1}‖: the states the rollout produced
    return {
        "nll": torch.stack(nlls, 1),
        "norm": torch.stack(norms, 1),
        "step_norm": torch.stack(steps, 1),
        "clipped": torch.stack(clipped, 1),
    }


def _check_segments(build: BuildContext, horizon: int) -> None:
    data = build.dataset
    if data is None:
        return
    if not hasattr(data, "sample_segments"):
        raise ConfigError(None, f"needs a data set with rollout segments (zdyn), got {type(data).__name__}")
    data.check_horizon(horizon, "horizon")


@attrs.frozen
class OneStepNLLConfig:
    """No keys: mean NLL (nats per frame) of Δz_t given the true z_t."""


class OneStepNLL(Objective):
    """Teacher-forced NLL of Δz_t given z_t (nats per frame, summed over D)."""

    def __init__(self, cfg: OneStepNLLConfig, build: BuildContext):
        super().__init__()

    def forward(self, model, batch):
        z, dz = batch["z"], batch["dz"]
        if z.dim() == 3:  # segment batches (from `mixed`-style sampling) flatten to pairs
            z, dz = z.reshape(-1, z.shape[-1]), dz.reshape(-1, dz.shape[-1])
        nll = step_nll(model.head, z, dz).mean()
        return nll, {"nll": nll.detach()}


@attrs.frozen
class RolloutNLLConfig:
    horizon: int = field(16, help="K: steps unrolled from each true z_0", validator=in_range(1, None))
    rollout: str = field(
        "mean", help="mean: ẑ += μ(ẑ); sample: ẑ += a reparameterised draw of Δz", validator=one_of("mean", "sample")
    )
    clip_norm: float = field(
        0.0, help="clip stabiliser: rescale ẑ to norm <= this after each step; 0 = off", validator=non_negative
    )


class RolloutNLL(Objective):
    """K-step unrolled NLL of the true Δz_t under the model conditioned on its own ẑ_t."""

    def __init__(self, cfg: RolloutNLLConfig, build: BuildContext):
        super().__init__()
        self.cfg = cfg
        _check_segments(build, cfg.horizon)

    def sample(self, dataset, split, batch_size, generator):
        batch = dataset.sample_segments(split, batch_size, self.cfg.horizon, generator)
        # the sampled rollout's noise seed is drawn here so that resume is exact
        batch["noise_seed"] = torch.randint(0, 2**62, (1,), generator=generator)
        return batch

    def _generator(self, batch, device) -> torch.Generator | None:
        if self.cfg.rollout != "sample":
            return None
        seed = int(batch["noise_seed"][0]) if "noise_seed" in batch else 0
        return torch.Generator(device=device).manual_seed(seed)

    def rollout_loss(self, model, batch) -> tuple[torch.Tensor, dict]:
        out = rollout(
            model.head,
            batch["z0"],
            batch["dz"],
            self.cfg.rollout,
            self.cfg.clip_norm,
            self._generator(batch, batch["z0"].device),
        )
        loss = out["nll"].mean()
        terms = {
            "rollout_nll": loss.detach(),
            "rollout_max_norm": out["norm"].max().detach(),
            "rollout_n_clipped": out["clipped"].sum().detach().float(),
        }
        return loss, terms

    def forward(self, model, batch):
        return self.rollout_loss(model, batch)


@attrs.frozen
class MixedConfig:
    horizon: int = field(16, help="K of the rollout term", validator=in_range(1, None))
    lam: float = field(1.0, help="λ in L = L_1step + λ·L_rollout", validator=non_negative)
    rollout: str = field("mean", help="mean | sample (see rollout_nll)", validator=one_of("mean", "sample"))
    clip_norm: float = field(0.0, help="clip stabiliser of the rollout term; 0 = off", validator=non_negative)


class MixedObjective(RolloutNLL):
    """L = L_1step + λ·L_rollout on the same K-step segments (the one-step term uses every
    true pair (z_t, Δz_t) of the segment)."""

    def __init__(self, cfg: MixedConfig, build: BuildContext):
        Objective.__init__(self)
        self.cfg = cfg
        self.lam = cfg.lam
        _check_segments(build, cfg.horizon)

    def forward(self, model, batch):
        z, dz = batch["z"], batch["dz"]
        one = step_nll(model.head, z.reshape(-1, z.shape[-1]), dz.reshape(-1, dz.shape[-1])).mean()
        roll, terms = self.rollout_loss(model, batch)
        loss = one + self.lam * roll
        terms["nll"] = one.detach()
        return loss, terms
