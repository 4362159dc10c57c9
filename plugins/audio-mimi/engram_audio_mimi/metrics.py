"""Metrics: teacher-forced dnll and direction cosine, rollout diagnostics, gate, κ, archetypes.

dnll = NLL[p(Δz | z)] − NLL[p(Δz)] in nats per frame, where p(Δz) is the unconditional
diagonal Gaussian fitted on the train split (negative: better than the baseline).
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F

from engram_core.components import BuildContext, Metric
from engram_core.config import ConfigError, field, in_range, non_negative, one_of, positive

from .heads import baseline_nll, mean_step, step_nll
from .memories import kmeans
from .objectives import rollout


def _spec(metric: Metric):
    return metric.ctx.dataset.spec


@attrs.frozen
class DnllConfig:
    """No keys: teacher-forced dnll over every pair of the eval split."""


class DnllMetric(Metric):
    """`dnll` and `nll`: teacher-forced NLL of Δz_t | z_t, relative to the unconditional baseline."""

    directions = {"dnll": "lower", "nll": "lower"}
    references = {"dnll": {"baseline": 0.0}}  # 0: no better than the baseline model

    def __init__(self, cfg: DnllConfig, build: BuildContext):
        self.cfg = cfg
        self.add_state("sum_nll", 0.0, dist_reduce_fx="sum")
        self.add_state("sum_base", 0.0, dist_reduce_fx="sum")
        self.add_state("count", 0, dist_reduce_fx="sum")

    def update(self, model, batch):
        nll = step_nll(model.head, batch["z"], batch["dz"])
        base = baseline_nll(_spec(self), batch["dz"])
        self.sum_nll += float(nll.double().sum())
        self.sum_base += float(base.double().sum())
        self.count += nll.shape[0]

    def compute(self):
        n = max(self.count, 1)
        return {"dnll": (self.sum_nll - self.sum_base) / n, "nll": self.sum_nll / n}


@attrs.frozen
class DirectionCosConfig:
    """No keys: mean cosine between the predicted mean step μ(z_t) and the true Δz_t."""


class DirectionCosMetric(Metric):
    """`direction_cos`: mean cos(E[Δz | z_t], Δz_t) over the eval split."""

    directions = {"direction_cos": "higher"}
    references = {"direction_cos": {"chance": 0.0}}  # a random direction

    def __init__(self, cfg: DirectionCosConfig, build: BuildContext):
        self.add_state("total", 0.0, dist_reduce_fx="sum")
        self.add_state("count", 0, dist_reduce_fx="sum")

    def update(self, model, batch):
        cos = F.cosine_similarity(mean_step(model.head, batch["z"]), batch["dz"], dim=-1)
        self.total += float(cos.double().sum())
        self.count += cos.shape[0]

    def compute(self):
        return {"direction_cos": self.total / max(self.count, 1)}


@attrs.frozen
class RolloutMetricConfig:
    horizon: int = field(16, help="K: steps rolled out from each true z_0", validator=in_range(1, None))
    segments: int = field(512, help="eval segments (fixed, spread over the split)", validator=positive)
    rollout: str = field("mean", help="mean | sample (sampled with a fixed seed)", validator=one_of("mean", "sample"))
    clip_norm: float = field(
        0.0, help="clip stabiliser: rescale ẑ to norm <= this after each step; 0 = off", validator=non_negative
    )
    seed: int = field(0, help="seed choosing the segments (and sampled-rollout noise)")
    prefix: str = field("rollout", help="tag group: <prefix>/dnll, <prefix>/max_norm, ...")


class RolloutMetric(Metric):
    """Free-running diagnostics over K-step eval segments, logged as `rollout/<name>`:
    dnll (finite steps only), nll, nonfinite (fraction of segments that produced a
    non-finite NLL or state), max_norm (max ‖ẑ‖), n_clipped (clip events), mean_step_norm
    (mean ‖Δẑ‖, the mean-shrinkage diagnostic) next to true_step_norm (mean ‖Δz‖)."""

    directions = {"*/dnll": "lower", "*/nll": "lower", "*/nonfinite": "lower", "*/n_clipped": "lower", "*/clip_rate": "lower"}
    groups = {"*/true_step_norm": "reference"}
    references = {"*/dnll": {"baseline": 0.0}}

    def __init__(self, cfg: RolloutMetricConfig, build: BuildContext):
        self.cfg = cfg
        for name in ("sum_d", "sum_nll", "step_norm", "true_norm"):
            self.add_state(name, 0.0, dist_reduce_fx="sum")
        for name in ("finite_count", "nonfinite_segments", "segments", "n_clipped", "steps"):
            self.add_state(name, 0, dist_reduce_fx="sum")
        self.add_state("max_norm", 0.0, dist_reduce_fx="max")  # distributed eval: the largest norm over ranks, not their sum
        self.generator = None
        if build.dataset is not None:
            if not hasattr(build.dataset, "eval_segments"):
                raise ConfigError(
                    None, f"needs a data set with rollout segments (zdyn), got {type(build.dataset).__name__}"
                )
            build.dataset.check_horizon(cfg.horizon, "horizon")

    def batches(self, dataset, split, batch_size):
        return dataset.eval_segments(split, self.cfg.horizon, self.cfg.segments, batch_size, self.cfg.seed)

    def reset(self):
        super().reset()
        self.generator = None  # scratch, not a state: each evaluation samples the same noise from `seed` again

    def update(self, model, batch):
        z0, dz = batch["z0"], batch["dz"]
        gen = None
        if self.cfg.rollout == "sample":
            if self.generator is None:
                self.generator = torch.Generator(device=z0.device).manual_seed(self.cfg.seed)
            gen = self.generator
        out = rollout(model.head, z0, dz, self.cfg.rollout, self.cfg.clip_norm, gen)
        base = baseline_nll(_spec(self), dz)
        nll = out["nll"].double()
        finite = torch.isfinite(nll) & torch.isfinite(out["norm"]).double().bool()
        bad_seg = (~finite).any(1) | ~torch.isfinite(out["step_norm"]).all(1)
        self.nonfinite_segments += int(bad_seg.sum())
        self.segments += z0.shape[0]
        self.sum_d += float((nll - base.double())[finite].sum())
        self.sum_nll += float(nll[finite].sum())
        self.finite_count += int(finite.sum())
        norms = out["norm"][torch.isfinite(out["norm"])]
        if norms.numel():
            self.max_norm = max(self.max_norm, float(norms.max()))
        steps = out["step_norm"][torch.isfinite(out["step_norm"])]
        self.step_norm += float(steps.double().sum())
        self.steps += steps.numel()
        self.true_norm += float(dz.norm(dim=-1).double().sum())
        self.n_clipped += int(out["clipped"].sum())

    def compute(self):
        p = self.cfg.prefix
        fc = self.finite_count
        return {
            f"{p}/dnll": self.sum_d / fc if fc else math.inf,
            f"{p}/nll": self.sum_nll / fc if fc else math.inf,
            f"{p}/nonfinite": self.nonfinite_segments / max(self.segments, 1),
            f"{p}/max_norm": self.max_norm,
            f"{p}/n_clipped": float(self.n_clipped),
            f"{p}/clip_rate": self.n_clipped / max(self.segments * self.cfg.horizon, 1),
            f"{p}/mean_step_norm": self.step_norm / max(self.steps, 1),
            f"{p}/true_step_norm": self.true_norm / max(self.segments * self.cfg.horizon, 1),
        }


@attrs.frozen
class GateMeanConfig:
    """No keys: the mean gate g(z) of a gated memory over the eval split."""


class GateMeanMetric(Metric):
    """`memory/gate_mean` (and `memory/gate_std`) of a memory with a gate (gated_residual, hybrid)."""

    def __init__(self, cfg: GateMeanConfig, build: BuildContext):
        self.add_state("s", 0.0, dist_reduce_fx="sum")
        self.add_state("s2", 0.0, dist_reduce_fx="sum")
        self.add_state("n", 0, dist_reduce_fx="sum")

    def update(self, model, batch):
        mem = model.memory
        if mem is None or not hasattr(mem, "gate") or not getattr(mem, "enabled", True):
            return  # no gate, or the memory is knocked out in this stage
        g = mem.gate(batch["z"]).double()
        self.s += float(g.sum())
        self.s2 += float((g * g).sum())
        self.n += g.numel()

    def compute(self):
        if not self.n:
            return {}
        mean = self.s / self.n
        return {"memory/gate_mean": mean, "memory/gate_std": math.sqrt(max(self.s2 / self.n - mean * mean, 0.0))}


@attrs.frozen
class KappaStatsConfig:
    """No keys: statistics of the vMF head's κ(z) and magnitude over the eval split."""


class KappaStatsMetric(Metric):
    """`vmf/kappa_mean`, `vmf/kappa_median`, `vmf/log_kappa_std`, `vmf/expected_cos` (mean A_D(κ)),
    `vmf/log_m_error` (mean |E[log m] − log ‖Δz‖|). Compare `vmf/expected_cos` with
    `eval/direction_cos` (the measured cosine of μ_dir with Δz) to check κ's calibration."""

    directions = {"vmf/log_m_error": "lower"}

    def __init__(self, cfg: KappaStatsConfig, build: BuildContext):
        head = build.head
        if head is not None and not hasattr(head, "components"):
            raise ConfigError(None, "kappa_stats needs the vmf_magnitude head")
        self.add_state("log_kappa", [], dist_reduce_fx="cat")  # one tensor per batch, in split order
        self.add_state("expected", 0.0, dist_reduce_fx="sum")
        self.add_state("log_m_err", 0.0, dist_reduce_fx="sum")
        self.add_state("n", 0, dist_reduce_fx="sum")

    def update(self, model, batch):
        from .distributions import vmf_mean_resultant

        head = model.head
        c = head.components(batch["z"])
        dz = batch["dz"]
        self.log_kappa.append(c["log_kappa"].detach().double().cpu())
        self.expected += float(vmf_mean_resultant(getattr(head, "sphere_dim", head.dim), c["kappa"]).sum())
        m = head.step_magnitude(dz) if hasattr(head, "step_magnitude") else dz.norm(dim=-1)
        self.log_m_err += float((c["mu_log_m"] - m.clamp_min(1e-12).log()).abs().double().sum())
        self.n += dz.shape[0]

    def compute(self):
        lk = torch.cat(self.log_kappa)
        n = max(self.n, 1)
        return {
            "vmf/kappa_mean": float(lk.exp().mean()),
            "vmf/kappa_median": float(lk.exp().median()),
            "vmf/log_kappa_std": float(lk.std()) if lk.numel() > 1 else 0.0,
            "vmf/expected_cos": self.expected / n,
            "vmf/log_m_error": self.log_m_err / n,
        }


@attrs.frozen
class ArchetypesConfig:
    k: int = field(16, help="number of direction archetypes (spherical k-means clusters)", validator=positive)
    iters: int = field(30, help="spherical k-means iterations", validator=positive)
    max_items: int = field(50000, help="train pairs used to fit the archetypes", validator=positive)
    min_step: float = field(
        0.0, help="ignore steps with ‖Δz‖ below this (their direction is noise)", validator=non_negative
    )
    seed: int = field(0, help="seed of the k-means initialisation")


class ArchetypesMetric(Metric):
    """Seed 001's direction-archetype diagnostics, logged as `archetypes/<name>`.

    Spherical k-means of train Δz directions gives k archetypes (train speakers only). On
    the eval split (held-out speakers):
    - tightness: mean cosine of each Δz direction to its archetype (train: tightness_train);
    - membership_acc: how often the archetype nearest the predicted mean step μ(z_t) is the
      archetype of the true Δz_t (chance_acc: always guessing the most common archetype);
    - centroid_match: archetypes re-fitted on the eval speakers alone, each matched to its
      closest train archetype; the mean cosine (1 = the same directions, cross-speaker).
    The seed's decision rule: membership_acc > 0.6 and tightness > 0.75 and they generalise.
    """

    directions = {"archetypes/membership_acc": "higher", "archetypes/centroid_match": "higher"}
    groups = {"archetypes/chance_acc": "reference"}
    references = {"archetypes/membership_acc": {"chance": "archetypes/chance_acc"}}

    def __init__(self, cfg: ArchetypesConfig, build: BuildContext):
        self.cfg = cfg
        self._centroids = None
        self._tight_train = None
        self.add_state("u", [], dist_reduce_fx="cat")  # unit true steps, one tensor per batch, in split order
        self.add_state("pred", [], dist_reduce_fx="cat")  # unit predicted mean steps, likewise

    def _fit_train(self, device) -> torch.Tensor:
        if self._centroids is None:
            data = self.ctx.dataset
            z, dz, _ = data.pairs("train")
            keep = dz.norm(dim=-1) > self.cfg.min_step
            dz = dz[keep]
            g = torch.Generator().manual_seed(self.cfg.seed)
            if dz.shape[0] > self.cfg.max_items:
                dz = dz[torch.randperm(dz.shape[0], generator=g)[: self.cfg.max_items]]
            c, labels = kmeans(dz, self.cfg.k, self.cfg.iters, g, spherical=True)
            u = F.normalize(dz, dim=-1)
            self._tight_train = float((u * c[labels]).sum(-1).mean())
            self._centroids = c
        return self._centroids.to(device)

    def update(self, model, batch):
        keep = batch["dz"].norm(dim=-1) > self.cfg.min_step
        self.u.append(F.normalize(batch["dz"][keep], dim=-1).detach().cpu())
        self.pred.append(F.normalize(mean_step(model.head, batch["z"][keep]), dim=-1).detach().cpu())

    def compute(self):
        c = self._fit_train(torch.device("cpu"))
        u = torch.cat(self.u)
        pred = torch.cat(self.pred)
        true_lab = (u @ c.T).argmax(-1)
        pred_lab = (pred @ c.T).argmax(-1)
        tight = (u * c[true_lab]).sum(-1).mean()
        freq = torch.bincount(true_lab, minlength=self.cfg.k).float() / max(true_lab.numel(), 1)
        g = torch.Generator().manual_seed(self.cfg.seed + 1)
        sub = (
            u if u.shape[0] <= self.cfg.max_items else u[torch.randperm(u.shape[0], generator=g)[: self.cfg.max_items]]
        )
        ce, _ = kmeans(sub, self.cfg.k, self.cfg.iters, g, spherical=True)
        match = (ce @ c.T).max(-1).values.mean()
        return {
            "archetypes/tightness": float(tight),
            "archetypes/tightness_train": float(self._tight_train),
            "archetypes/membership_acc": float((true_lab == pred_lab).float().mean()),
            "archetypes/chance_acc": float(freq.max()),
            "archetypes/centroid_match": float(match),
        }
