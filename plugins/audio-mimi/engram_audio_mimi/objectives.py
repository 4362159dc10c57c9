"""Objectives: one-step NLL, K-step rollout NLL, and their mix.

Rollout (the seed's Phase 4.5): from a true z_0, ẑ_{t+1} = ẑ_t + μ(ẑ_t) (mean rollout) or
ẑ_t + Δ̃ with Δ̃ a reparameterised draw (sampled rollout); at every step the *true* Δz_t
is scored under the model conditioned on ẑ_t (`engram_audio_mimi.generation.rollout`).

Stabilisers of the training rollout (seed 001's list): the clip rescales ẑ to norm ≤
`clip_norm` after each step (on by default at the train split's largest ‖z‖; the share of
clipped steps is logged as `train/rollout_clip_rate`); `noise_std` adds Gaussian noise to
ẑ after each step (noise injection); `teacher_prob` replaces ẑ_{t+1} by the true z_{t+1}
with that probability per item and step (scheduled sampling).
"""

from __future__ import annotations

import attrs
import torch

from engram_core.components import BuildContext, Objective
from engram_core.config import ConfigError, field, in_range, non_negative, one_of
from engram_core.run.accel import host_reads_free

from .generation import rollout
from .heads import step_nll


def _clip_value(instance, attribute, value) -> None:
    if value < 0 and value != -1:
        raise ConfigError(attribute.name, f"must be >= 0 (0 = off) or -1 (the data's largest ‖z‖), got {value}")


def resolve_clip(clip_norm: float, build: BuildContext) -> float:
    """-1 = the train split's largest ‖z‖ (the data's range); off without a data set that knows it."""
    if clip_norm != -1:
        return clip_norm
    data = build.dataset
    return float(data.max_norm("train")) if data is not None and hasattr(data, "max_norm") else 0.0


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
        -1.0,
        help="clip stabiliser: rescale ẑ to norm <= this after each step; -1 = the train split's largest ‖z‖; 0 = off",
        validator=_clip_value,
    )
    noise_std: float = field(0.0, help="noise injection: std of Gaussian noise added to ẑ after each step", validator=non_negative)
    teacher_prob: float = field(
        0.0, help="scheduled sampling: probability that ẑ_{t+1} is replaced by the true z_{t+1}", validator=in_range(0.0, 1.0)
    )
    target: str = field(
        "step",
        help="what is scored at ẑ_t: step (the true Δz_t, seed 000) | next (z_{t+1} − ẑ_t, the step back onto the "
        "data: teaches the model to return from its own errors)",
        validator=one_of("step", "next"),
    )


class RolloutNLL(Objective):
    """K-step unrolled NLL of the true Δz_t under the model conditioned on its own ẑ_t."""

    def __init__(self, cfg: RolloutNLLConfig, build: BuildContext):
        super().__init__()
        self.cfg = cfg
        self.clip_norm = resolve_clip(cfg.clip_norm, build)
        _check_segments(build, cfg.horizon)

    def sample(self, dataset, split, batch_size, generator):
        batch = dataset.sample_segments(split, batch_size, self.cfg.horizon, generator)
        # the sampled rollout's noise seed, drawn here so that resume is exact: a 0-d tensor (kept
        # whole when a batch is cut into micro-batches or rank shards; a batch of tensors only,
        # as a CUDA-graphed step needs), read only where reading is free (`_generator`)
        batch["noise_seed"] = torch.randint(0, 2**62, (1,), generator=generator)[0]
        return batch

    def _generator(self, batch, device) -> torch.Generator | None:
        """The rollout's noise: on the CPU a generator seeded by the batch's `noise_seed` (the
        stream every published CPU row was made with); on an accelerator the device's default
        generator, because reading the seed there waits for the device and a CUDA graph cannot
        take a generator seeded anew each step. The default generator is seeded by
        `run.seed`, saved in checkpoints (resume stays exact) and advanced by a replayed graph."""
        if self.cfg.rollout != "sample" and self.cfg.noise_std == 0 and self.cfg.teacher_prob == 0:
            return None
        if not host_reads_free(torch.device(device)):
            return None
        seed = batch.get("noise_seed", 0)
        return torch.Generator(device=device).manual_seed(int(seed))

    def rollout_loss(self, model, batch) -> tuple[torch.Tensor, dict]:
        true_next = None
        if self.cfg.teacher_prob > 0 or self.cfg.target == "next":
            true_next = batch["z0"].unsqueeze(1) + batch["dz"].cumsum(1)  # z_1 .. z_K
        out = rollout(
            model.head,
            batch["z0"],
            batch["dz"],
            self.cfg.rollout,
            self.clip_norm,
            self._generator(batch, batch["z0"].device),
            noise_std=self.cfg.noise_std,
            true_next=true_next,
            teacher_prob=self.cfg.teacher_prob,
            target=self.cfg.target,
        )
        loss = out["nll"].mean()
        terms = {
            "rollout_nll": loss.detach(),
            "rollout_max_norm": out["norm"].max().detach(),
            "rollout_n_clipped": out["clipped"].sum().detach().float(),
            "rollout_clip_rate": out["clipped"].float().mean().detach(),
        }
        return loss, terms

    def forward(self, model, batch):
        return self.rollout_loss(model, batch)


@attrs.frozen
class MixedConfig:
    horizon: int = field(16, help="K of the rollout term", validator=in_range(1, None))
    lam: float = field(1.0, help="λ in L = L_1step + λ·L_rollout", validator=non_negative)
    rollout: str = field("mean", help="mean | sample (see rollout_nll)", validator=one_of("mean", "sample"))
    clip_norm: float = field(
        -1.0, help="clip stabiliser of the rollout term; -1 = the train split's largest ‖z‖; 0 = off", validator=_clip_value
    )
    noise_std: float = field(0.0, help="noise injection (see rollout_nll)", validator=non_negative)
    teacher_prob: float = field(0.0, help="scheduled sampling (see rollout_nll)", validator=in_range(0.0, 1.0))
    target: str = field("step", help="step | next (see rollout_nll)", validator=one_of("step", "next"))


class MixedObjective(RolloutNLL):
    """L = L_1step + λ·L_rollout on the same K-step segments (the one-step term uses every
    true pair (z_t, Δz_t) of the segment)."""

    def __init__(self, cfg: MixedConfig, build: BuildContext):
        Objective.__init__(self)
        self.cfg = cfg
        self.lam = cfg.lam
        self.clip_norm = resolve_clip(cfg.clip_norm, build)
        _check_segments(build, cfg.horizon)

    def forward(self, model, batch):
        z, dz = batch["z"], batch["dz"]
        one = step_nll(model.head, z.reshape(-1, z.shape[-1]), dz.reshape(-1, dz.shape[-1])).mean()
        roll, terms = self.rollout_loss(model, batch)
        loss = one + self.lam * roll
        terms["nll"] = one.detach()
        return loss, terms
