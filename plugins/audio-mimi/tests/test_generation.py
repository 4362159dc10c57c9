"""engram_audio_mimi.generation: whole-sequence rollouts and the `generate` metric on toy heads."""

from __future__ import annotations

import math

import torch
from engram_audio_mimi.generation import (
    GenerationConfig,
    GenerationMetric,
    log_spectral_distance,
    power_spectrum,
    rollout,
    trajectory_figure,
)
from torch import nn

from engram_core.components import EvalContext


class Seqs:
    """Sequences z_t = (0.9)^t-free sinusoids: a data set with utterances() and a Δz baseline."""

    def __init__(self, n=6, t=40, d=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        phase = torch.rand(n, 1, d, generator=g) * 6.28
        time = torch.arange(t, dtype=torch.float32)[None, :, None]
        self.z = torch.sin(0.3 * time + phase)
        dz = self.z[:, 1:] - self.z[:, :-1]

        class Spec:
            pass

        self.spec = Spec()
        self.spec.dz_mean = dz.reshape(-1, d).mean(0)
        self.spec.dz_log_std = dz.reshape(-1, d).std(0).log()

    def utterances(self, split):
        return list(self.z)


class ScaleHead(nn.Module):
    """Gaussian head with μ(z) = a·z, σ = 0.1: a = 0 stands still, a = 1 doubles each step."""

    def __init__(self, a):
        super().__init__()
        self.a = a

    def predict(self, z):
        return self.a * z, torch.full_like(z, math.log(0.1))


class M:
    def __init__(self, head):
        self.head = head


def run_metric(head, data, **kw):
    m = GenerationMetric(GenerationConfig(**kw), build=type("B", (), {"dataset": data})())
    model = M(head)
    m.bind(EvalContext(model, data, "eval", 0, "s", None, 8, torch.device("cpu")))
    m.reset()
    with torch.no_grad():
        for b in m.batches(data, "eval", 8):
            m.update(model, b)
    return m, m.compute()


def test_still_head_generates_constant_sequences():
    data = Seqs()
    _, out = run_metric(ScaleHead(0.0), data, rollout="mean")
    assert out["generate/mean_step_norm"] == 0.0
    assert out["generate/step_ratio"] == 0.0
    assert out["generate/nonfinite"] == 0.0
    assert out["generate/outside_range"] == 0.0
    assert out["generate/true_step_norm"] > 0.2
    assert out["generate/spectral_distance"] > 20  # a flat trajectory has no power at all


def test_doubling_head_explodes_and_is_reported():
    data = Seqs()
    _, out = run_metric(ScaleHead(1.0), data, rollout="mean")  # ‖ẑ‖ doubles: 2^39 in 40 frames
    assert out["generate/max_norm"] > 1e10
    assert out["generate/outside_range"] > 0.9
    assert out["generate/dnll"] > 1e6


def test_sampled_generation_is_seeded():
    data = Seqs()
    a = run_metric(ScaleHead(0.0), data, rollout="sample", seed=3)[1]
    b = run_metric(ScaleHead(0.0), data, rollout="sample", seed=3)[1]
    c = run_metric(ScaleHead(0.0), data, rollout="sample", seed=4)[1]
    assert a == b and a != c
    assert abs(a["generate/mean_step_norm"] - 0.1 * math.sqrt(4) * 0.94) < 0.05  # E‖N(0, 0.01 I_4)‖ ≈ 0.188


def test_spectral_distance_is_zero_for_the_same_spectra():
    x = torch.randn(5, 32, 3)
    p = power_spectrum(x).mean(0)
    assert log_spectral_distance(p, p) == 0.0
    assert abs(log_spectral_distance(10 * p, p) - 10.0) < 1e-9


def test_rollout_clip_noise_and_scheduled_sampling():
    head = ScaleHead(1.0)
    z0 = torch.ones(3, 2)
    dz = torch.zeros(3, 5, 2)
    out = rollout(head, z0, dz, "mean", clip_norm=4.0, keep_states=True)
    assert float(out["norm"].max()) <= 4.0 + 1e-5 and bool(out["clipped"][:, -1].all())
    true_next = torch.zeros(3, 5, 2)
    out = rollout(head, z0, dz, "mean", true_next=true_next, teacher_prob=1.0, keep_states=True)
    assert float(out["states"].abs().max()) == 0.0  # every step replaced by the true (zero) state
    g = torch.Generator().manual_seed(0)
    noisy = rollout(ScaleHead(0.0), z0, dz, "mean", generator=g, noise_std=0.5, keep_states=True)
    assert float((noisy["states"] - 1).abs().mean()) > 0.1


def test_pictures_and_audio_go_to_the_logger():
    data = Seqs()
    data.can_decode = True
    data.decode = lambda z: (torch.zeros(10 * z.shape[0]), 100)
    m, _ = run_metric(ScaleHead(0.0), data, rollout="mean", audio=1)
    calls = []

    class Logger:
        def figure(self, tag, fig, step):
            calls.append(("figure", tag))

        def audio(self, tag, wave, step, rate):
            calls.append(("audio", tag, wave.shape[0], rate))

    m.on_eval_end(type("E", (), {"logger": Logger(), "stage": "post", "step": 7})())
    assert ("figure", "generate/post/trajectories") in calls
    assert ("audio", "generate/post/audio_gen_0", 400, 100) in calls
    assert ("audio", "generate/post/audio_true_0", 400, 100) in calls
    fig = trajectory_figure({"true": data.z[:1], "gen": data.z[:1]})
    assert len(fig.axes) == 3


def test_generate_is_audio_mimis_metric_and_declares_its_directions(tmp_path):
    from engram_core.registry import load_registry
    from engram_core.run.metric_info import LOWER, MetricInfo, for_run

    comp = load_registry().resolve("metrics", "generate", "metric")
    assert comp.plugin == "audio-mimi" and comp.factory is GenerationMetric
    info = MetricInfo.from_classes([GenerationMetric])
    assert info.of("generate_mean/spectral_distance").direction == LOWER  # a glob over the configurable prefix
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.toml").write_text('[[metrics]]\ntype = "audio-mimi:generate"\nprefix = "generate"\n')
    assert for_run(run).of("generate/dnll").direction == LOWER  # found through the registry from recipe.toml
