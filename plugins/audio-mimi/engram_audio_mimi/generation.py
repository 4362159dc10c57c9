"""Whole-sequence generation: free-running rollouts of a dynamics head, and what they produce.

A dynamics head models p(Δz | z). Judged only teacher-forced (or over the short rollouts a
fine-tune optimises), a model can look good and still generate garbage. `GenerationMetric`
starts at each eval sequence's first true frame and lets the model run for the sequence's
full length, either drawing each step from the model (`sample`) or taking its mean
(`mean`), and reports, under ``<prefix>/<name>``:

- nonfinite       share of sequences whose generation produced a non-finite state or NLL;
- max_norm        largest ‖ẑ‖ generated (finite states); data_max_norm: the largest ‖z‖ of
                  the train split, the data's range;
- outside_range   share of generated frames with ‖ẑ‖ above data_max_norm (non-finite count);
- clip_rate       share of generated frames the clip rescaled (`clip_norm`; 0 when off);
- mean_step_norm  mean ‖Δẑ‖ generated, beside true_step_norm (mean ‖Δz‖ of the same
                  sequences) and step_ratio = mean_step_norm / true_step_norm;
- dnll / nll      NLL of each true Δz_t under the model at the generated ẑ_t ("along the
                  way"), finite steps only, relative to the data's unconditional Gaussian
                  of Δz when the data spec has one (`dz_mean`, `dz_log_std`);
- spectral_distance  log-spectral distance (dB) between the power spectra over time of the
                  generated and the true sequences, per dimension (Hann-windowed periodogram
                  of the first `spectrum_frames` frames, averaged over sequences), then
                  averaged over dimensions; 0 = the same temporal texture.

Several sampled paths (`paths` = k > 1, sample mode only). An extreme statistic of one
random generation (its max ‖ẑ‖) is itself random; to put a spread beside it, each eval
sequence is generated k times, independently, from the metric's own seeded generator (the
k copies of a batch are rolled out together, so the draws are reproducible and path p of
sequence i is the same at every evaluation). *Path p* is the p-th generation of every
eval sequence: one sampled generation of the whole split. Then the keys above pool all k
paths (nonfinite, outside_range, clip_rate: shares over all N·k generated sequences or all
their frames; max_norm: the largest over all paths; step, NLL and spectra: means over all
paths; true_step_norm: over the N true sequences, as before), and these are added:

- max_norm_path_mean, max_norm_path_sd   mean and sample sd (n − 1) over the k paths of
                  each path's max ‖ẑ‖ over the whole split (M_p = max over sequences and
                  frames of path p; max_norm = max_p M_p);
- outside_range_path_sd   sample sd over the k paths of each path's share of frames outside
                  the range (their mean is outside_range, every path has the same frames);
- paths_outside   share of the k paths with at least one frame, of any sequence, outside
                  the range (non-finite counts as outside): the share M_p > data_max_norm;
- sequences_outside  share of the N·k generated sequences with at least one frame outside.

With paths = 1 (the default) the draws and every key are exactly those of a single path,
and the keys above are not reported (a spread of one path is undefined).

Any head works that has `nll_and_step(z, dz, mode, generator)` or the Gaussian
`predict(z) -> (μ, log σ)`; any data set with `utterances(split)` (a list of (T, D)
tensors). At each eval `on_eval_end` draws generated vs true trajectories and spectra to
TensorBoard, and, when the data set can decode latents (`decode(z) -> (wave, rate)`),
the generated and the true audio of the first sequences.
"""

from __future__ import annotations

import math

import attrs
import torch

from engram_core.components import BuildContext, Metric
from engram_core.config import field, in_range, non_negative, one_of, positive
from engram_core.errors import ConfigError
from engram_core.nn import diagonal_gaussian_nll_per_item


def nll_and_step(head, z: torch.Tensor, dz: torch.Tensor, mode: str = "mean", generator: torch.Generator | None = None):
    """(per-item NLL of dz | z, the rollout step from z: the mean or a reparameterised draw).

    Heads with their own `nll_and_step` (e.g. a vMF head) use it; a Gaussian head with
    `predict(z) -> (μ, log σ)` gets the diagonal Gaussian's."""
    if hasattr(head, "nll_and_step"):
        return head.nll_and_step(z, dz, mode, generator)
    mu, log_sigma = head.predict(z)
    nll = diagonal_gaussian_nll_per_item(mu, log_sigma, dz)
    if mode == "mean":
        return nll, mu
    return nll, mu + log_sigma.exp() * torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)


def rollout(
    head,
    z0: torch.Tensor,
    dz: torch.Tensor,
    mode: str = "mean",
    clip_norm: float = 0.0,
    generator: torch.Generator | None = None,
    noise_std: float = 0.0,
    keep_states: bool = False,
    true_next: torch.Tensor | None = None,
    teacher_prob: float = 0.0,
    target: str = "step",
) -> dict[str, torch.Tensor]:
    """Unroll K = dz.shape[1] steps from z0: ẑ_{t+1} = ẑ_t + step(ẑ_t) (+ noise_std · ε).

    Scores every true Δz_t under the model at ẑ_t. Returns per (item, step): nll, the state
    norm ‖ẑ_{t+1}‖, the predicted step norm ‖Δẑ_t‖, whether the clip fired (ẑ rescaled to
    norm `clip_norm`; 0 = off), and with `keep_states` the states ẑ_1..ẑ_K (B, K, D).
    Scheduled sampling: with `true_next` (B, K, D), each ẑ_{t+1} is replaced by the true
    z_{t+1} with probability `teacher_prob` (per item and step). `target = "next"` scores
    z_{t+1} − ẑ_t (the step back onto the data) instead of the true Δz_t (needs `true_next`)."""
    z = z0
    nlls, norms, steps, clipped, states = [], [], [], [], []
    if target not in ("step", "next") or (target == "next" and true_next is None):
        raise ValueError(f"target must be 'step' or 'next' (with true_next), got {target!r}")
    for t in range(dz.shape[1]):
        goal = dz[:, t] if target == "step" else true_next[:, t] - z
        nll, step = nll_and_step(head, z, goal, mode, generator)
        nlls.append(nll)
        steps.append(step.norm(dim=-1))
        z = z + step
        if noise_std > 0:
            z = z + noise_std * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        if clip_norm > 0:
            n = z.norm(dim=-1, keepdim=True)
            over = n > clip_norm
            z = torch.where(over, z * (clip_norm / n.clamp_min(1e-12)), z)
            clipped.append(over.squeeze(-1))
        else:
            clipped.append(torch.zeros(z.shape[0], dtype=torch.bool, device=z.device))
        if true_next is not None and teacher_prob > 0:
            take = torch.rand(z.shape[0], generator=generator, device=z.device) < teacher_prob
            z = torch.where(take[:, None], true_next[:, t], z)
        norms.append(z.norm(dim=-1))  # ‖ẑ_{t+1}‖: the states the rollout produced
        if keep_states:
            states.append(z.detach())
    out = {
        "nll": torch.stack(nlls, 1),
        "norm": torch.stack(norms, 1),
        "step_norm": torch.stack(steps, 1),
        "clipped": torch.stack(clipped, 1),
    }
    if keep_states:
        out["states"] = torch.stack(states, 1)
    return out


def power_spectrum(x: torch.Tensor) -> torch.Tensor:
    """Hann-windowed periodogram over time of (B, T, D) sequences, mean removed: (B, T//2+1, D)."""
    x = x.double()
    x = x - x.mean(1, keepdim=True)
    w = torch.hann_window(x.shape[1], periodic=False, dtype=x.dtype, device=x.device)
    f = torch.fft.rfft(x * w[None, :, None], dim=1)
    return f.real**2 + f.imag**2


def log_spectral_distance(p_gen: torch.Tensor, p_true: torch.Tensor) -> float:
    """RMS over frequencies of 10·log10(P_gen / P_true) in dB, averaged over dimensions.

    p_*: (F, D) mean power spectra. The DC bin is left out (the mean is removed)."""
    eps = 1e-12 * float(p_true.max().clamp_min(1e-30))
    ratio = 10 * torch.log10((p_gen[1:] + eps) / (p_true[1:] + eps))
    return float(ratio.pow(2).mean(0).sqrt().mean())


@attrs.frozen
class GenerationConfig:
    rollout: str = field(
        "sample", help="sample: each step drawn from the model; mean: ẑ += E[Δz | ẑ]", validator=one_of("sample", "mean")
    )
    sequences: int = field(0, help="eval sequences generated (the first ones); 0 = all", validator=non_negative)
    spectrum_frames: int = field(
        64, help="frames (from each sequence's start) in the power spectra; shorter sequences are left out", validator=in_range(4, None)
    )
    clip_norm: float = field(
        0.0,
        help="rescale ẑ to norm <= this after each step; -1 = the train split's largest ‖z‖; 0 = off (the model as it is)",
        validator=in_range(-1.0, None),
    )
    seed: int = field(0, help="seed of the sampled steps (the same draws at every evaluation)")
    paths: int = field(
        1,
        help="sample mode: independent sampled generations of each eval sequence; > 1 adds their spread "
        "(max_norm_path_mean/_sd, outside_range_path_sd, paths_outside, sequences_outside)",
        validator=positive,
    )
    batch_size: int = field(256, help="sequences generated at once", validator=positive)
    prefix: str = field("generate", help="tag group: <prefix>/nonfinite, <prefix>/max_norm, ...")
    pictures: bool = field(True, help="draw generated vs true trajectories and spectra to TensorBoard at each eval")
    audio: int = field(2, help="sequences decoded to audio for TensorBoard when the data set has a decoder; 0 = none", validator=non_negative)

    def __attrs_post_init__(self):
        if self.paths != 1 and self.rollout == "mean":
            raise ConfigError(
                "paths",
                f"mean rollouts are deterministic, so every path would be the same: set paths = 1 or rollout = \"sample\", got {self.paths}",
            )


class GenerationMetric(Metric):
    """Whole-sequence generation from each eval sequence's first frame (see the module docstring)."""

    directions = {"*/nonfinite": "lower", "*/outside_range": "lower", "*/clip_rate": "lower", "*/nll": "lower",
                  "*/dnll": "lower", "*/spectral_distance": "lower", "*/paths_outside": "lower",
                  "*/sequences_outside": "lower",
                  # like max_norm: nearer the data's range is better, neither way; an sd is the
                  # noise of a value, not an outcome
                  "*/max_norm_path_mean": "unknown", "*/max_norm_path_sd": "unknown",
                  "*/outside_range_path_sd": "unknown"}
    groups = {"*/data_max_norm": "reference", "*/true_step_norm": "reference",
              "*/max_norm_path_sd": "spread", "*/outside_range_path_sd": "spread"}

    # distributed eval: every rank generates the whole split (seeded draws in a fixed order,
    # pooled spectra and the example sequences for the pictures would not shard exactly)
    shardable = False

    def __init__(self, cfg: GenerationConfig, build: BuildContext):
        self.cfg = cfg
        for name in ("n_seq", "bad_seq", "frames", "outside", "clipped", "steps", "true_steps", "nll_count", "spec_count"):
            self.add_state(name, 0)
        for name in ("max_norm", "step_sum", "true_sum", "nll_sum", "dnll_sum"):
            self.add_state(name, 0.0)
        for name in ("p_gen", "p_true", "example"):
            self.add_state(name, None)
        # per sampled path p (the p-th generation of every sequence): its max ‖ẑ‖ and its
        # frames outside the range, over the whole split; sequences that leave the range
        paths = cfg.paths
        self.add_state("path_max", torch.zeros(paths, dtype=torch.float64), dist_reduce_fx="max")
        self.add_state("path_outside", torch.zeros(paths, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("seq_outside", 0, dist_reduce_fx="sum")
        self.generator = None
        data = build.dataset
        if data is not None and not hasattr(data, "utterances"):
            raise ConfigError(None, f"needs a data set with whole sequences (utterances(split)), got {type(data).__name__}")
        self._data_max_norm: float | None = None
        self._last: dict | None = None

    def batches(self, dataset, split, batch_size):
        seqs = dataset.utterances(split)
        if self.cfg.sequences:
            seqs = seqs[: self.cfg.sequences]
        # group equal lengths so a batch needs no padding (real corpora vary; synthetic ones do not)
        order = sorted(range(len(seqs)), key=lambda i: (seqs[i].shape[0], i))
        batch: list[int] = []
        for i in order:
            if batch and (seqs[i].shape[0] != seqs[batch[0]].shape[0] or len(batch) == self.cfg.batch_size):
                yield {"z": torch.stack([seqs[j] for j in batch]), "index": torch.tensor(batch)}
                batch = []
            batch.append(i)
        if batch:
            yield {"z": torch.stack([seqs[j] for j in batch]), "index": torch.tensor(batch)}

    def _range(self) -> float:
        if self._data_max_norm is None:
            train = self.ctx.dataset.utterances("train")
            self._data_max_norm = max(float(u.norm(dim=-1).max()) for u in train)
        return self._data_max_norm

    def reset(self):
        super().reset()
        self.generator = None  # scratch of one evaluation, not a state

    def generate(self, head, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """The `paths` generations of the (B, T, D) sequences z, path-major: row p·B + i is
        path p of sequence i. `rollout`'s output, with "states" (paths·B, T, D) from the
        true first frame. Sampled draws come from the metric's generator, seeded at the
        first batch of each evaluation, so the paths are the same at every evaluation."""
        gen = None
        if self.cfg.rollout == "sample":
            if self.generator is None:
                self.generator = torch.Generator(device=z.device).manual_seed(self.cfg.seed)
            gen = self.generator
        if self.cfg.paths > 1:  # one rollout of the k copies: one draw per copy and step
            z = z.repeat(self.cfg.paths, 1, 1)
        dz = z[:, 1:] - z[:, :-1]
        clip = self._range() if self.cfg.clip_norm == -1 else max(self.cfg.clip_norm, 0.0)
        out = rollout(head, z[:, 0], dz, self.cfg.rollout, clip, gen, keep_states=True)
        out["states"] = torch.cat([z[:, :1], out["states"]], 1)
        return out

    def update(self, model, batch):
        z = batch["z"]  # (B, T, D) true sequences
        dz = z[:, 1:] - z[:, :-1]
        paths = self.cfg.paths
        out = self.generate(model.head, z)
        states = out["states"]  # (paths·B, T, D) generated, from the true first frame
        z_of_state = z.repeat(paths, 1, 1) if paths > 1 else z  # the true sequence beside each
        nll = out["nll"].double()
        finite_state = torch.isfinite(states).all(-1)
        finite = torch.isfinite(nll) & finite_state[:, 1:]
        bad = ~(finite.all(1) & torch.isfinite(out["step_norm"]).all(1))
        self.n_seq += states.shape[0]
        self.bad_seq += int(bad.sum())
        norms = states.norm(dim=-1)
        fin_norms = norms[finite_state]
        if fin_norms.numel():
            self.max_norm = max(self.max_norm, float(fin_norms.max()))
        limit = self._range()
        self.frames += states.shape[0] * (states.shape[1] - 1)
        out_of_range = (norms[:, 1:] > limit * (1 + 1e-6)) | ~finite_state[:, 1:]
        self.outside += int(out_of_range.sum())
        self.seq_outside += int(out_of_range.any(1).sum())
        per_path_norms = torch.where(finite_state, norms, torch.zeros_like(norms)).double().reshape(paths, -1)
        self.path_max = torch.maximum(self.path_max, per_path_norms.max(1).values.cpu())
        self.path_outside += out_of_range.reshape(paths, -1).sum(1).cpu()
        self.clipped += int(out["clipped"].sum())
        st = out["step_norm"][torch.isfinite(out["step_norm"])]
        self.step_sum += float(st.double().sum())
        self.steps += st.numel()
        self.true_sum += float(dz.norm(dim=-1).double().sum())
        self.true_steps += dz.shape[0] * dz.shape[1]
        self.nll_sum += float(nll[finite].sum())
        self.nll_count += int(finite.sum())
        spec = getattr(self.ctx.dataset, "spec", None)
        if spec is not None and getattr(spec, "dz_mean", None) is not None:
            base = diagonal_gaussian_nll_per_item(
                spec.dz_mean.to(dz.device, dz.dtype), spec.dz_log_std.to(dz.device, dz.dtype), dz
            ).double()
            if paths > 1:
                base = base.repeat(paths, 1)
            self.dnll_sum += float((nll - base)[finite].sum())
        else:
            self.dnll_sum = math.nan
        n = self.cfg.spectrum_frames
        ok = ~bad
        if states.shape[1] >= n and bool(ok.any()):
            pg = power_spectrum(states[ok, :n]).sum(0)
            pt = power_spectrum(z_of_state[ok, :n]).sum(0)
            self.p_gen = pg if self.p_gen is None else self.p_gen + pg
            self.p_true = pt if self.p_true is None else self.p_true + pt
            self.spec_count += int(ok.sum())
        if self.example is None:
            shown = min(max(self.cfg.audio, 1), z.shape[0])  # path 0 of the first sequences
            self.example = {"true": z[:shown].detach().cpu(), "gen": states[:shown].detach().cpu()}

    def compute(self):
        p = self.cfg.prefix
        true_step = self.true_sum / max(self.true_steps, 1)
        mean_step = self.step_sum / max(self.steps, 1)
        out = {
            f"{p}/nonfinite": self.bad_seq / max(self.n_seq, 1),
            f"{p}/max_norm": self.max_norm,
            f"{p}/data_max_norm": self._range(),
            f"{p}/outside_range": self.outside / max(self.frames, 1),
            f"{p}/clip_rate": self.clipped / max(self.frames, 1),
            f"{p}/mean_step_norm": mean_step,
            f"{p}/true_step_norm": true_step,
            f"{p}/step_ratio": mean_step / true_step if true_step > 0 else math.nan,
            f"{p}/nll": self.nll_sum / self.nll_count if self.nll_count else math.inf,
            f"{p}/dnll": self.dnll_sum / self.nll_count if self.nll_count else math.inf,
            f"{p}/spectral_distance": (
                log_spectral_distance(self.p_gen / self.spec_count, self.p_true / self.spec_count) if self.spec_count else math.inf
            ),
        }
        if self.cfg.paths > 1:
            out.update(self.path_spread())
        if self.p_gen is not None:
            self._last = {"p_gen": (self.p_gen / self.spec_count).cpu(), "p_true": (self.p_true / self.spec_count).cpu(), **(self.example or {})}
        else:
            self._last = dict(self.example or {})
        return out

    def path_spread(self) -> dict[str, float]:
        """The spread over the k sampled paths (the module docstring defines each key)."""
        p = self.cfg.prefix
        k = self.cfg.paths
        frames_per_path = self.frames // k
        share_outside = self.path_outside.double() / max(frames_per_path, 1)
        return {
            f"{p}/max_norm_path_mean": float(self.path_max.mean()),
            f"{p}/max_norm_path_sd": float(self.path_max.std(correction=1)),
            f"{p}/outside_range_path_sd": float(share_outside.std(correction=1)),
            f"{p}/paths_outside": float((self.path_outside > 0).double().mean()),
            f"{p}/sequences_outside": self.seq_outside / max(self.n_seq, 1),
        }

    # ---- pictures and audio ------------------------------------------------------------

    def on_eval_end(self, event) -> None:
        if self._last is None or event.logger is None:
            return
        tag = f"{self.cfg.prefix}/{event.stage}"
        if self.cfg.pictures and "gen" in self._last:
            fig = trajectory_figure(self._last, title=f"{self.cfg.prefix} ({self.cfg.rollout}) at {event.stage}, step {event.step}")
            try:
                event.logger.figure(f"{tag}/trajectories", fig, event.step)
            finally:
                import matplotlib.pyplot as plt

                plt.close(fig)
        data = self.ctx.dataset if self.ctx is not None else None
        if self.cfg.audio and data is not None and getattr(data, "can_decode", False) and "gen" in self._last:
            for i in range(min(self.cfg.audio, self._last["gen"].shape[0])):
                for kind in ("gen", "true"):
                    seq = self._last[kind][i]
                    if not bool(torch.isfinite(seq).all()):
                        continue
                    wave, rate = data.decode(seq)
                    event.logger.audio(f"{tag}/audio_{kind}_{i}", wave, event.step, rate)
        self._last = None


def trajectory_figure(last: dict, title: str = "", dims: int = 3):
    """Generated vs true: the first `dims` dimensions and ‖z‖ of the first sequence over time,
    and the power spectra (mean over dimensions) of all generated vs all true sequences."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    true, gen = last["true"][0].float(), last["gen"][0].float()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    t = torch.arange(true.shape[0])
    for d in range(min(dims, true.shape[1])):
        (line,) = axes[0].plot(t, true[:, d], lw=1.0, label=f"true z[{d}]")
        axes[0].plot(t, gen[:, d], lw=1.0, ls="--", color=line.get_color(), label=f"generated z[{d}]")
    axes[0].set_xlabel("frame")
    axes[0].set_title("trajectory (first sequence)")
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].plot(t, true.norm(dim=-1), label="true ‖z‖")
    axes[1].plot(t, gen.norm(dim=-1), ls="--", label="generated ‖ẑ‖")
    axes[1].set_xlabel("frame")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=7)
    axes[1].set_title("norm")
    if "p_gen" in last:
        f = torch.arange(1, last["p_true"].shape[0])
        axes[2].semilogy(f, last["p_true"][1:].mean(-1), label="true")
        axes[2].semilogy(f, last["p_gen"][1:].mean(-1), ls="--", label="generated")
        axes[2].set_xlabel("frequency bin")
        axes[2].legend(fontsize=7)
    axes[2].set_title("power spectrum (mean over dims)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
