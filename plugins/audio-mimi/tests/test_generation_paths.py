"""engram_audio_mimi.generation: several sampled paths per sequence (`paths`) and their spread (issue 30)."""

from __future__ import annotations

import math

import pytest
import torch
from engram_audio_mimi.generation import GenerationConfig, GenerationMetric, rollout
from test_generation import M, ScaleHead, Seqs, run_metric

from engram_core.components import EvalContext
from engram_core.errors import ConfigError

SPREAD_KEYS = ("max_norm_path_mean", "max_norm_path_sd", "outside_range_path_sd", "paths_outside", "sequences_outside")


class NoiseHead(torch.nn.Module):
    """Gaussian head with μ = 0 and a fixed σ: ẑ is a random walk from the first true frame."""

    def __init__(self, sigma):
        super().__init__()
        self.log_sigma = math.log(sigma)

    def predict(self, z):
        return torch.zeros_like(z), torch.full_like(z, self.log_sigma)


class WideTrain(Seqs):
    """Seqs whose train split is 15 % wider than the eval split: eval sequences start inside the range."""

    def utterances(self, split):
        return [1.15 * u for u in self.z] if split == "train" else list(self.z)


def bound_metric(data, **kw) -> GenerationMetric:
    m = GenerationMetric(GenerationConfig(**kw), build=type("B", (), {"dataset": data})())
    m.bind(EvalContext(M(None), data, "eval", 0, "s", None, 8, torch.device("cpu")))
    m.reset()
    return m


def test_one_path_is_the_single_sampled_generation():
    """paths = 1 (the default): the one rollout of the seeded generator, scored as before, and
    no spread keys (a spread of one path is undefined)."""
    data = Seqs(n=5, t=30)
    head = ScaleHead(0.5)
    default = run_metric(head, data, rollout="sample", seed=7)[1]
    one = run_metric(head, data, rollout="sample", seed=7, paths=1)[1]
    assert default == one
    assert not any(k.endswith(SPREAD_KEYS) for k in one)
    z = torch.stack(data.utterances("eval"))  # Seqs: equal lengths, one batch in order
    with torch.no_grad():
        ref = rollout(
            head, z[:, 0], z[:, 1:] - z[:, :-1], "sample", generator=torch.Generator().manual_seed(7), keep_states=True
        )
    norms = torch.cat([z[:, :1], ref["states"]], 1).norm(dim=-1)
    limit = max(float(u.norm(dim=-1).max()) for u in data.utterances("train"))
    assert one["generate/max_norm"] == float(norms.max())
    assert one["generate/outside_range"] == float((norms[:, 1:] > limit * (1 + 1e-6)).double().mean())
    assert one["generate/mean_step_norm"] == pytest.approx(float(ref["step_norm"].double().mean()), rel=1e-12)


def test_k_paths_are_distinct_reproducible_and_start_at_the_true_frame():
    data = Seqs(n=4, t=20)
    z = torch.stack(data.utterances("eval"))
    head = NoiseHead(0.1)
    with torch.no_grad():
        a = bound_metric(data, paths=3, seed=1).generate(head, z)["states"].reshape(3, 4, 20, -1)
        b = bound_metric(data, paths=3, seed=1).generate(head, z)["states"].reshape(3, 4, 20, -1)
        c = bound_metric(data, paths=3, seed=2).generate(head, z)["states"].reshape(3, 4, 20, -1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    for p in range(3):
        assert torch.equal(a[p, :, 0], z[:, 0])
        for q in range(p):
            # every sequence of every pair of paths differs after its first frame
            assert bool((a[p, :, 1:] - a[q, :, 1:]).abs().amax((1, 2)).gt(1e-3).all())


def test_pooled_and_per_path_keys_are_their_definitions_over_the_paths():
    """The metric's keys against the definitions (module docstring) applied to its own k paths."""
    data = WideTrain(n=6, t=40)
    head = NoiseHead(0.04)  # a random walk that leaves the data's range on some paths only
    k = 6
    m, out = run_metric(head, data, rollout="sample", seed=0, paths=k, batch_size=8)
    z = torch.stack(data.utterances("eval"))
    with torch.no_grad():
        states = bound_metric(data, paths=k, seed=0).generate(head, z)["states"]
    norms = states.norm(dim=-1).double().reshape(k, 6, 40)
    limit = max(float(u.norm(dim=-1).max()) for u in data.utterances("train"))
    outside = norms[:, :, 1:] > limit * (1 + 1e-6)  # (path, sequence, frame)
    per_path_max = norms.amax((1, 2))
    per_path_share = outside.double().mean((1, 2))
    assert out["generate/max_norm"] == pytest.approx(float(per_path_max.max()), rel=1e-6)
    assert out["generate/max_norm_path_mean"] == pytest.approx(float(per_path_max.mean()), rel=1e-6)
    assert out["generate/max_norm_path_sd"] == pytest.approx(float(per_path_max.std()), rel=1e-5)
    assert out["generate/outside_range"] == pytest.approx(float(per_path_share.mean()), rel=1e-12)
    assert out["generate/outside_range_path_sd"] == pytest.approx(float(per_path_share.std()), rel=1e-9)
    assert out["generate/paths_outside"] == float(outside.any(2).any(1).double().mean())
    assert out["generate/sequences_outside"] == float(outside.any(2).double().mean())
    assert 0 < out["generate/paths_outside"] < 1, "the test wants some paths in and some out of range"
    assert out["generate/nonfinite"] == 0.0
    assert m.n_seq == k * 6


def test_spread_keys_in_the_cases_with_a_known_answer():
    data = Seqs(n=5, t=30)
    limit = max(float(u.norm(dim=-1).max()) for u in data.utterances("train"))
    # σ ≈ 0: every path stands still at the first true frame, all paths the same
    _, still = run_metric(NoiseHead(1e-30), data, rollout="sample", paths=4)
    first_max = float(torch.stack(data.utterances("eval"))[:, 0].norm(dim=-1).max())
    assert still["generate/max_norm_path_mean"] == pytest.approx(first_max, rel=1e-6)
    assert still["generate/max_norm_path_sd"] == 0.0
    assert still["generate/outside_range_path_sd"] == 0.0
    assert still["generate/paths_outside"] == 0.0 and still["generate/sequences_outside"] == 0.0
    # σ = 1000 on a range of ≈ 2: every generated frame of every path is outside
    _, wild = run_metric(NoiseHead(1e3), data, rollout="sample", paths=4)
    assert wild["generate/outside_range"] == 1.0 and wild["generate/outside_range_path_sd"] == 0.0
    assert wild["generate/paths_outside"] == 1.0 and wild["generate/sequences_outside"] == 1.0
    assert wild["generate/max_norm_path_mean"] > 100 * limit


def test_path_spread_on_hand_made_accumulators():
    """Four paths with per-path maxima 1, 2, 3, 4 and 0, 0, 1, 3 of 10 frames outside."""
    m = bound_metric(Seqs(), paths=4)
    m.path_max = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    m.path_outside = torch.tensor([0, 0, 1, 3])
    m.frames, m.n_seq, m.seq_outside = 40, 8, 3
    spread = m.path_spread()
    assert spread["generate/max_norm_path_mean"] == 2.5
    assert spread["generate/max_norm_path_sd"] == pytest.approx(math.sqrt(5 / 3), rel=1e-12)  # n − 1
    assert spread["generate/outside_range_path_sd"] == pytest.approx(
        float(torch.tensor([0, 0, 0.1, 0.3]).double().std())
    )
    assert spread["generate/paths_outside"] == 0.5
    assert spread["generate/sequences_outside"] == 3 / 8


@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(paths=0), "paths: must be > 0, got 0"),
        (dict(paths=-3), "paths: must be > 0, got -3"),
        (dict(paths=5, rollout="mean"), "paths: mean rollouts are deterministic"),
    ],
)
def test_bad_paths_is_one_clear_error(kw, expected):
    with pytest.raises(ConfigError) as err:
        GenerationConfig(**kw)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


def test_bad_paths_in_a_recipe_exits_2_with_one_line(tmp_path):
    from pathlib import Path

    from engram_core.testing.cli import run_cli

    recipe = Path(__file__).resolve().parents[3] / "recipes" / "stable_linear.toml"
    r = run_cli(
        str(recipe),
        "metrics.4.paths=3",
        "--dry-run",
        "--quiet",
        "--out",
        str(tmp_path / "runs"),
        plugins="audio-mimi",
        env={"ENGRAM_CACHE": str(tmp_path / "cache")},
    )
    lines = [ln for ln in (r.stdout + r.stderr).strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stdout + r.stderr
    assert "metrics" in lines[0] and "paths" in lines[0] and "deterministic" in lines[0]


def test_new_keys_declare_their_directions():
    from engram_core.run.metric_info import LOWER, UNKNOWN, MetricInfo

    info = MetricInfo.from_classes([GenerationMetric])
    assert info.of("generate/paths_outside").direction == LOWER
    assert info.of("generate/sequences_outside").direction == LOWER
    assert info.of("generate/max_norm_path_sd").direction == UNKNOWN
    assert info.of("generate/max_norm_path_sd").group == "spread"
