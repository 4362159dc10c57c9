"""Shared helpers of the audio-mimi tests (imported explicitly; not a pytest conftest)."""

from __future__ import annotations

from pathlib import Path

import torch
from engram_audio_mimi.data import ZdynConfig, ZdynDataset
from engram_audio_mimi.heads import GaussianMLPConfig, GaussianMLPHead
from engram_audio_mimi.synthetic import SyntheticZdynConfig

from engram_core.components import BuildContext, DataSpec, FitContext, Model


def tiny_synthetic(
    dim: int = 16, speakers: int = 6, utterances: int = 3, frames: int = 40, **kw
) -> SyntheticZdynConfig:
    return SyntheticZdynConfig(dim=dim, speakers=speakers, utterances=utterances, frames=frames, **kw)


def tiny_dataset(tmp_path: Path, dim: int = 16, **kw) -> ZdynDataset:
    cfg = ZdynConfig(eval_fraction=0.34, synthetic=tiny_synthetic(dim=dim, **kw))
    return ZdynDataset(cfg, BuildContext(cache_dir=tmp_path))


class PairData:
    """A minimal data set of random pairs (for memory fitting in contract tests)."""

    def __init__(self, dim: int, n: int = 200, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.z = torch.randn(n, dim, generator=g)
        self.dz = 0.3 * torch.tanh(self.z.roll(1, -1)) + 0.05 * torch.randn(n, dim, generator=g)
        self.spec = spec(dim)

    def pairs(self, split):
        return self.z, self.dz, torch.zeros(self.z.shape[0], dtype=torch.long)


def spec(dim: int) -> DataSpec:
    return DataSpec("test", dim=dim, dz_mean=torch.zeros(dim), dz_log_std=torch.zeros(dim), min_frames=40)


def tiny_head(dim: int, seed: int = 0) -> GaussianMLPHead:
    torch.manual_seed(seed)
    return GaussianMLPHead(GaussianMLPConfig(hidden=16, layers=1), BuildContext(spec=spec(dim)))


def fit_context(model: Model, data, seed: int = 0) -> FitContext:
    return FitContext(model, data, torch.device("cpu"), torch.Generator().manual_seed(seed), 64, "train", None, 0)
