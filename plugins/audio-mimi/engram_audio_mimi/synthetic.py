"""The embedded default: a synthetic speech-like latent process, written as a zdyn store.

Per speaker and utterance an 8-dimensional state s_t evolves as

    s_{t+1} = s_t + (R(ω_spk) − I) s_t − γ s_t³ + β_spk · m_t · a_{c_t} + σ_s ε_t

- R(ω_spk): rotations in four 2-D planes at speaker-specific frequencies;
- a_c: one of `archetypes` shared unit directions, the current one c_t switching with
  probability `switch_prob` per frame (to a draw from a speaker-specific preference);
- m_t ~ LogNormal(0, `magnitude_spread`): the step size is much less predictable than
  its direction;
- −γ s³: cubic damping keeps the true process bounded;
- options: `growth` α adds +α·s (a limit cycle held by the damping), `rotation_scale`
  scales ω, `archetype_choice = "state"` picks the archetype from the state (the key
  nearest s_t) instead of a hidden Markov switch, so the step direction is readable from z_t.

The state is embedded in D dimensions by a random orthonormal map Q (D × 8), and
`off_manifold_noise` i.i.d. Gaussian noise is added to z in all D dimensions. A
one-step model learns to cancel that noise (a large teacher-forced gain) but, rolled
out freely, steers off the 8-dimensional manifold it never saw.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import attrs
import numpy as np

from engram_core import cache
from engram_core.config import ConfigError, field, in_range, non_negative, one_of, positive

from .store import write_store


@attrs.frozen
class SyntheticZdynConfig:
    """Parameters of the embedded synthetic latent process (used when `path` is empty)."""

    dim: int = field(64, help="latent dimension D of z (Mimi's is 512)", validator=in_range(8, 4096))
    speakers: int = field(40, help="number of speakers", validator=in_range(2, None))
    utterances: int = field(12, help="utterances per speaker", validator=positive)
    frames: int = field(160, help="frames per utterance", validator=in_range(4, None))
    archetypes: int = field(16, help="shared step-direction archetypes", validator=positive)
    switch_prob: float = field(
        0.1, help="per-frame probability that the archetype switches", validator=in_range(0.0, 1.0)
    )
    pull: float = field(0.3, help="mean strength β of the push along the current archetype", validator=non_negative)
    magnitude_spread: float = field(0.4, help="σ of the log-normal step magnitude m_t", validator=non_negative)
    damping: float = field(0.3, help="cubic damping γ", validator=non_negative)
    state_noise: float = field(0.01, help="σ_s of the process noise on the 8-d state", validator=non_negative)
    off_manifold_noise: float = field(
        0.01, help="std of i.i.d. noise added to z in all D dimensions", validator=non_negative
    )
    archetype_choice: str = field(
        "markov",
        help="how the current archetype is chosen: markov (switches with switch_prob, hidden from z) | "
        "state (the archetype whose key is nearest the current state: readable from z_t)",
        validator=one_of("markov", "state"),
    )
    rotation_scale: float = field(1.0, help="scale of the speaker rotation frequencies ω", validator=non_negative)
    growth: float = field(
        0.0, help="linear growth α (s += α·s each frame), balanced by the cubic damping: a limit cycle", validator=non_negative
    )
    seed: int = field(0, help="seed of the process (independent of run.seed)")


STATE_DIM = 8


def generate(cfg: SyntheticZdynConfig) -> list[tuple[str, str, np.ndarray]]:
    """(utterance id, speaker id, z (frames, dim) float32) for every utterance."""
    with np.errstate(over="ignore", invalid="ignore"):  # a diverging process is reported as a ConfigError
        return _generate(cfg)


def generate_with_expected_steps(cfg: SyntheticZdynConfig) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """As `generate`, plus per utterance the noise-free expected step E[s_{t+1} − s_t | s_t]
    embedded in D dimensions, (frames − 1, dim): what an ideal one-step model's mean
    direction would be (diagnostics only, e.g. benchmarks/audio_synthetic_steps.py)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return _generate(cfg, expected=True)


def _generate(cfg: SyntheticZdynConfig, expected: bool = False) -> list:
    rng = np.random.default_rng(cfg.seed)
    arche = rng.standard_normal((cfg.archetypes, STATE_DIM))
    arche /= np.linalg.norm(arche, axis=1, keepdims=True)
    q, _ = np.linalg.qr(rng.standard_normal((cfg.dim, STATE_DIM)))  # D × 8, orthonormal columns
    base_omega = rng.uniform(0.1, 0.4, STATE_DIM // 2) * cfg.rotation_scale
    keys = None
    if cfg.archetype_choice == "state":  # drawn last, so the markov process is unchanged
        keys = rng.standard_normal((cfg.archetypes, STATE_DIM))
        keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    out = []
    burn_in = 20
    for spk in range(cfg.speakers):
        omega = base_omega * rng.uniform(0.75, 1.25, STATE_DIM // 2)
        beta = cfg.pull * rng.uniform(0.8, 1.2)
        pref = rng.dirichlet(np.full(cfg.archetypes, 0.7))
        cos, sin = np.cos(omega), np.sin(omega)
        n = cfg.utterances
        s = 0.5 * rng.standard_normal((n, STATE_DIM))
        c = rng.choice(cfg.archetypes, size=n, p=pref)
        frames, means = [], []
        mean_m = np.exp(0.5 * cfg.magnitude_spread**2)  # E[m_t] of the log-normal magnitude
        for t in range(burn_in + cfg.frames):
            a, b = s[:, 0::2], s[:, 1::2]
            rot = np.empty_like(s)
            rot[:, 0::2] = cos * a - sin * b
            rot[:, 1::2] = sin * a + cos * b
            if keys is None:
                switch = rng.random(n) < cfg.switch_prob
                c = np.where(switch, rng.choice(cfg.archetypes, size=n, p=pref), c)
            else:
                c = np.argmax(s @ keys.T, axis=1)
            m = np.exp(cfg.magnitude_spread * rng.standard_normal(n))
            if expected and t >= burn_in:
                means.append(rot + cfg.growth * s - cfg.damping * s**3 + beta * mean_m * arche[c] - s)
            s = (
                rot + cfg.growth * s - cfg.damping * s**3 + beta * m[:, None] * arche[c]
                + cfg.state_noise * rng.standard_normal(s.shape)
            )
            if t >= burn_in:
                frames.append(s)
        states = np.stack(frames, 1)  # (n, frames, 8)
        if not np.isfinite(states).all() or np.abs(states).max() > 1e3:
            raise ConfigError(
                "synthetic",
                f"the process diverges with these parameters (speaker {spk}): the explicit cubic damping "
                f"overshoots; lower pull ({cfg.pull}), growth ({cfg.growth}) or damping ({cfg.damping})",
            )
        z = states @ q.T + cfg.off_manifold_noise * rng.standard_normal((n, cfg.frames, cfg.dim))
        steps = (np.stack(means[1:], 1) @ q.T).astype(np.float32) if expected else None  # E[Δ] from frame t, t < T − 1
        for u in range(n):
            item = (f"spk{spk:03d}_utt{u:03d}", f"spk{spk:03d}", z[u].astype(np.float32))
            out.append(item + (steps[u],) if expected else item)
    return out


# bump when `generate` (or the store layout it is written in) produces something else; the
# cache key also holds the source of this module and of `store`
VERSION = 1


def cached_store(cfg: SyntheticZdynConfig, cache_dir: Path | None) -> Path:
    """The synthetic store for `cfg` under `<cache_dir>/audio-mimi/`, generated once.

    Keyed (`engram_core.cache`) by the full config, its seed, `VERSION` and the source of
    this module and `store.py`. Without a cache folder it is generated into a temporary one.
    """
    if cache_dir is None:
        path = Path(tempfile.mkdtemp(prefix="engram-zdyn-")) / "zdyn-synthetic.zarr"
        write_store(path, generate(cfg), frame_rate=12.5, source="synthetic (uncached)")
        return path
    from . import store

    e = cache.entry(cache_dir, plugin="audio-mimi", kind="zdyn-synthetic", config=cfg, seed=cfg.seed,
                    version=VERSION, builder=[sys.modules[__name__], store], ext="zarr")

    def load(path: Path) -> Path:
        if not (path / "zarr.json").is_file():
            raise FileNotFoundError("no zarr.json in the store")
        return path

    cache.load_or_build(  # the value is the utterances when built, the path when loaded: use the path
        e, lambda: generate(cfg),
        save_fn=lambda utts, tmp: write_store(tmp, utts, frame_rate=12.5, source=f"synthetic {e.key[:16]}"),
        load_fn=load,
    )
    return e.path
