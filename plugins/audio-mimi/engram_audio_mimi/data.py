"""`zdyn`: per-utterance latent sequences with speakers, split speaker-disjointly.

Views of a split:
- one-step pairs `{"z": z_t, "dz": Δz_t}` (`sample`, `eval_batches`);
- K-step rollout segments `{"z0": z_s, "dz": Δz[s:s+K]}` (`sample_segments`,
  `eval_segments`), never crossing an utterance boundary.

z is normalised with statistics fitted on the train split only (`normalize`). The spec
carries `dim`, the unconditional Gaussian baseline of Δz fitted on train
(`dz_mean`, `dz_log_std`, used by the dnll metrics) and `min_frames`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import numpy as np
import torch

from engram_core.components import BuildContext, Dataset, DataSpec, default_cache_dir
from engram_core.config import ConfigError, field, in_range, one_of

from .store import read_store
from .synthetic import SyntheticZdynConfig, cached_store


@attrs.frozen
class ZdynConfig:
    """A zdyn zarr store (or the embedded synthetic default) split by speaker."""

    path: str = field("", help="zdyn zarr store written by engram-audio-export; empty = the embedded synthetic default")
    split_file: str = field(
        "",
        help='JSON file {"train": (speaker ids), "eval": (speaker ids)} as lists; empty = random speaker split from split_seed',
    )
    eval_fraction: float = field(
        0.2, help="fraction of speakers held out for eval (without split_file)", validator=in_range(0.0, 1.0)
    )
    split_seed: int = field(0, help="seed of the random speaker split")
    val_fraction: float = field(
        0.0,
        help="share of the train speakers moved to a 'val' split (speaker-disjoint from both), for choosing "
        "steps and hyperparameters without looking at the eval speakers; 0 = no val split",
        validator=in_range(0.0, 1.0),
    )
    normalize: str = field(
        "per_dim",
        help="z normalisation fitted on train: per_dim | global | none",
        validator=one_of("per_dim", "global", "none"),
    )
    synthetic: SyntheticZdynConfig = field(
        factory=SyntheticZdynConfig, help="the embedded synthetic process (when path is empty)"
    )
    decoder: str = field(
        "",
        help="local directory of the transformers MimiModel that made the store: generated latents are "
        "decoded to audio for TensorBoard; empty = no audio (pictures only)",
    )


class _Split:
    """Concatenated frames of one split, with utterance offsets and speaker indices."""

    def __init__(self, arrays: list[np.ndarray], speakers: list[int]):
        lengths = [a.shape[0] for a in arrays]
        self.frames = torch.from_numpy(np.concatenate(arrays, 0))
        self.offsets = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.long)
        self.lengths = torch.tensor(lengths, dtype=torch.long)
        self.speakers = torch.tensor(speakers, dtype=torch.long)
        # one-step pair t -> t+1 inside each utterance
        starts = [torch.arange(int(o), int(o) + n - 1) for o, n in zip(self.offsets[:-1], lengths)]
        self.pair_index = torch.cat(starts) if starts else torch.zeros(0, dtype=torch.long)
        utt = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths) - 1)
        self.pair_speaker = self.speakers[utt]
        self._segment_starts: dict[int, torch.Tensor] = {}
        self._utterances: list[torch.Tensor] | None = None

    def utterances(self) -> list[torch.Tensor]:
        if self._utterances is None:
            self._utterances = [self.frames[int(o) : int(o) + int(n)] for o, n in zip(self.offsets[:-1], self.lengths)]
        return self._utterances

    def segment_starts(self, k: int) -> torch.Tensor:
        if k not in self._segment_starts:
            parts = [
                torch.arange(int(o), int(o) + int(n) - k) for o, n in zip(self.offsets[:-1], self.lengths) if n > k
            ]
            self._segment_starts[k] = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        return self._segment_starts[k]


class ZdynDataset(Dataset):
    """Speaker-disjoint split of a zdyn store; one-step pairs and K-step rollout segments."""

    splits: tuple[str, ...] = ("train", "eval")

    def __init__(self, cfg: ZdynConfig, build: BuildContext | None = None):
        self.cfg = cfg
        cache = build.cache_dir if build is not None else default_cache_dir()
        if cfg.path:
            path, key = Path(cfg.path).expanduser(), "path"
        else:
            path, key = cached_store(cfg.synthetic, cache), "synthetic"
        self.store_path = path
        self._decoder = None
        if cfg.decoder and not Path(cfg.decoder).expanduser().is_dir():
            raise ConfigError("decoder", f"not a directory: {cfg.decoder} (a saved transformers MimiModel)")
        self._warned: set[tuple[str, int]] = set()
        ids, speakers, arrays, attrs_ = read_store(path, key)
        self.frame_rate = attrs_.get("frame_rate")
        train_spk, eval_spk = self._split_speakers(sorted(set(speakers)))
        val_spk = self._val_speakers(train_spk)
        train_spk = train_spk - val_spk
        self.splits = ("train", "eval", "val") if val_spk else ("train", "eval")
        spk_index = {s: i for i, s in enumerate(sorted(set(speakers)))}
        self.speaker_names = sorted(set(speakers))
        by_split: dict[str, tuple[list, list]] = {name: ([], []) for name in self.splits}
        for _utt, spk, arr in zip(ids, speakers, arrays):
            if arr.shape[0] < 2:
                continue
            side = "train" if spk in train_spk else "eval" if spk in eval_spk else "val" if spk in val_spk else None
            if side is not None:
                by_split[side][0].append(arr)
                by_split[side][1].append(spk_index[spk])
        for side in self.splits:
            if not by_split[side][0]:
                raise ConfigError(
                    "split_file" if cfg.split_file else "eval_fraction",
                    f"the {side} split has no utterances of at least 2 frames",
                )
        train_frames = np.concatenate(by_split["train"][0], 0).astype(np.float64)
        mean = train_frames.mean(0)
        if cfg.normalize == "per_dim":
            std = train_frames.std(0)
        elif cfg.normalize == "global":
            std = np.full(train_frames.shape[1], train_frames.std(0).mean())
        else:
            mean, std = np.zeros(train_frames.shape[1]), np.ones(train_frames.shape[1])
        std = np.where(std > 1e-8, std, 1.0)
        self.z_mean = torch.tensor(mean, dtype=torch.float32)
        self.z_std = torch.tensor(std, dtype=torch.float32)
        self._splits = {
            side: _Split([((a - mean) / std).astype(np.float32) for a in arrs], spks)
            for side, (arrs, spks) in by_split.items()
        }
        tr = self._splits["train"]
        dz = tr.frames[tr.pair_index + 1] - tr.frames[tr.pair_index]
        dz64 = dz.double()
        self.dim = int(tr.frames.shape[1])
        self.min_frames = int(min(int(s.lengths.min()) for s in self._splits.values()))
        self.spec = DataSpec(
            "zdyn",
            dim=self.dim,
            dz_mean=dz64.mean(0).float(),
            dz_log_std=dz64.std(0).clamp_min(1e-6).log().float(),
            dz_max_norm=float(dz64.norm(dim=-1).max()),
            dz_cov=torch.cov(dz64.T).float(),  # its principal subspace: the vMF head's `subspace`
            min_frames=self.min_frames,
            frame_rate=self.frame_rate,
            n_speakers=len(self.speaker_names),
        )

    # ---- split ---------------------------------------------------------------------

    def _split_speakers(self, speakers: list[str]) -> tuple[set[str], set[str]]:
        cfg = self.cfg
        if cfg.split_file:
            p = Path(cfg.split_file).expanduser()
            if not p.exists():
                raise ConfigError("split_file", f"file does not exist: {p}")
            try:
                table = json.loads(p.read_text())
                train, evals = set(map(str, table["train"])), set(map(str, table["eval"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(
                    "split_file", f'{p}: expected JSON {{"train": [...], "eval": [...]}} ({exc})'
                ) from None
            both = sorted(train & evals)
            if both:
                raise ConfigError(
                    "split_file",
                    f"speakers on both sides of the split: {', '.join(both[:5])}"
                    + (f" and {len(both) - 5} more" if len(both) > 5 else ""),
                )
            unknown = sorted((train | evals) - set(speakers))
            if unknown:
                raise ConfigError("split_file", f"speakers not in the store: {', '.join(unknown[:5])}")
            return train, evals
        if len(speakers) < 2:
            raise ConfigError(
                "path", f"a speaker-disjoint split needs at least 2 speakers, the store has {len(speakers)}"
            )
        rng = np.random.default_rng(cfg.split_seed)
        order = [speakers[i] for i in rng.permutation(len(speakers))]
        n_eval = min(len(speakers) - 1, max(1, round(cfg.eval_fraction * len(speakers))))
        return set(order[n_eval:]), set(order[:n_eval])

    def _val_speakers(self, train_spk: set[str]) -> set[str]:
        """`val_fraction` of the train speakers (seeded by split_seed), at least one, never all."""
        frac = self.cfg.val_fraction
        if frac <= 0:
            return set()
        if len(train_spk) < 2:
            raise ConfigError("val_fraction", f"a val split needs at least 2 train speakers, the split has {len(train_spk)}")
        order = sorted(train_spk)
        rng = np.random.default_rng(self.cfg.split_seed + 1)
        order = [order[i] for i in rng.permutation(len(order))]
        n_val = min(len(order) - 1, max(1, round(frac * len(order))))
        return set(order[:n_val])

    def split(self, name: str) -> _Split:
        if name not in self._splits:
            raise ConfigError("split", f"zdyn has splits {', '.join(map(repr, self.splits))}, got {name!r}")
        return self._splits[name]

    # ---- one-step pairs --------------------------------------------------------------

    def pairs(self, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All one-step pairs of a split: z (N, D), Δz (N, D), speaker index (N,)."""
        s = self.split(split)
        z = s.frames[s.pair_index]
        return z, s.frames[s.pair_index + 1] - z, s.pair_speaker

    def sample(self, split: str, batch_size: int, generator: torch.Generator) -> dict:
        s = self.split(split)
        pick = s.pair_index[torch.randint(0, len(s.pair_index), (batch_size,), generator=generator)]
        z = s.frames[pick]
        return {"z": z, "dz": s.frames[pick + 1] - z}

    def eval_batches(self, split: str, batch_size: int) -> Iterator[dict]:
        s = self.split(split)
        for i in range(0, len(s.pair_index), batch_size):
            pick = s.pair_index[i : i + batch_size]
            z = s.frames[pick]
            yield {"z": z, "dz": s.frames[pick + 1] - z, "speaker": s.pair_speaker[i : i + batch_size]}

    # ---- rollout segments ------------------------------------------------------------

    def check_horizon(self, k: int, key: str = "horizon") -> None:
        """K-step segments need utterances of at least K + 1 frames. Shorter ones are skipped
        (with a count on stderr, once per split and K); no long-enough utterance in a split
        is an error."""
        for name, s in self._splits.items():
            short = int((s.lengths <= k).sum())
            if short == len(s.lengths):
                raise ConfigError(
                    key,
                    f"K = {k} is longer than every {name} utterance allows "
                    f"(longest {int(s.lengths.max())} frames, so K <= {int(s.lengths.max()) - 1})",
                )
            if short and (name, k) not in self._warned:
                self._warned.add((name, k))
                print(
                    f"zdyn: {short} of {len(s.lengths)} {name} utterances are shorter than K + 1 = {k + 1} frames "
                    f"and are skipped for {k}-step segments",
                    file=sys.stderr,
                )

    # ---- whole utterances (generation) -----------------------------------------------

    def utterances(self, split: str) -> list[torch.Tensor]:
        """Every utterance of a split, (T, D) normalised frames each."""
        return self.split(split).utterances()

    def max_norm(self, split: str = "train") -> float:
        """The largest ‖z‖ (normalised) of a split: the data's range."""
        return float(self.split(split).frames.norm(dim=-1).max())

    @property
    def can_decode(self) -> bool:
        return bool(self.cfg.decoder)

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Normalised latents (T, D) → (waveform (samples,), sampling rate) through the Mimi decoder."""
        from .decode import decode_latents, load_decoder

        if self._decoder is None:
            self._decoder = load_decoder(Path(self.cfg.decoder).expanduser())
        raw = z.detach().float().cpu() * self.z_std + self.z_mean
        return decode_latents(self._decoder, raw), int(self._decoder.config.sampling_rate)

    def _segments(self, s: _Split, starts: torch.Tensor, k: int) -> dict:
        idx = starts[:, None] + torch.arange(k + 1)[None, :]
        win = s.frames[idx]  # (B, K+1, D)
        return {"z0": win[:, 0], "dz": win[:, 1:] - win[:, :-1], "z": win[:, :-1]}

    def sample_segments(self, split: str, batch_size: int, k: int, generator: torch.Generator) -> dict:
        """Random K-step segments: z0 (B, D), dz (B, K, D), and the true states z (B, K, D)."""
        self.check_horizon(k)
        s = self.split(split)
        starts = s.segment_starts(k)
        pick = starts[torch.randint(0, len(starts), (batch_size,), generator=generator)]
        return self._segments(s, pick, k)

    def eval_segments(self, split: str, k: int, count: int, batch_size: int, seed: int = 0) -> Iterator[dict]:
        """`count` segments spread evenly over the split (the same ones at every evaluation)."""
        self.check_horizon(k)
        s = self.split(split)
        starts = s.segment_starts(k)
        if count >= len(starts):
            chosen = starts
        else:
            g = torch.Generator().manual_seed(seed)
            chosen = starts[torch.randperm(len(starts), generator=g)[:count]].sort().values
        for i in range(0, len(chosen), batch_size):
            yield self._segments(s, chosen[i : i + batch_size], k)
