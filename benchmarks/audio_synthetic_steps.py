"""How the true steps of audio-mimi's synthetic presets behave from one frame to the next.

    python benchmarks/audio_synthetic_steps.py [--out benchmarks/results/audio_synthetic_steps.json]

For each preset (docs/plugins/audio-mimi.md), with and without its noise (state and
off-manifold noise set to 0), on z standardised per dimension as the zdyn data set does:
the mean cosine between consecutive step directions, cos(Δz_t, Δz_{t−1}), and the share of
consecutive steps that point more than 90° apart. Why: in the archetype control the
archetype is the one whose key is nearest the state, and the push it gives often carries
the state over a key boundary, where the next archetype pushes it back — the step
direction then flips frame by frame, which caps how often μ(z_t)'s archetype can be the
true step's (seed 001's membership term). White observation noise alone gives −0.5.

`ideal_membership`: the `archetypes` metric's membership term (k = 16 spherical k-means of
the Δz directions; how often the archetype of the predicted mean step is the true step's)
with the noise-free expected step E[Δ | s_t] of the process itself as the prediction — what
a model that knew the hidden state exactly would score (an upper guide for the metric; it
does not know the observation noise of z_t). No training: the process itself, in seconds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from engram_audio_mimi.memories import kmeans
from engram_audio_mimi.synthetic import SyntheticZdynConfig, generate_with_expected_steps

PRESETS = {
    "default": {},
    "exploding": {"archetype_choice": "state", "state_noise": 0.001, "off_manifold_noise": 0.001, "magnitude_spread": 0.05},
    "archetype control": {"archetype_choice": "state", "pull": 0.4, "rotation_scale": 0.2},
}


def step_turns(cfg: SyntheticZdynConfig, k: int = 16) -> dict[str, float]:
    utts = generate_with_expected_steps(cfg)
    z = np.stack([u[2] for u in utts]).astype(np.float64)  # (utterances, frames, D)
    flat = z.reshape(-1, z.shape[-1])
    std = np.where(flat.std(0) > 1e-8, flat.std(0), 1.0)
    dz = np.diff(z, axis=1) / std  # steps of the per-dimension standardised z
    ideal = np.stack([u[3] for u in utts]).astype(np.float64) / std
    u = dz / np.maximum(np.linalg.norm(dz, axis=-1, keepdims=True), 1e-12)
    cos = (u[:, 1:] * u[:, :-1]).sum(-1)
    steps = torch.from_numpy(dz.reshape(-1, dz.shape[-1]))
    centroids, labels = kmeans(steps, k, 30, torch.Generator().manual_seed(0), spherical=True)
    ideal_labels = (torch.from_numpy(ideal.reshape(-1, ideal.shape[-1])) @ centroids.T).argmax(-1)
    return {"mean_cos_consecutive": float(cos.mean()), "share_reversed": float((cos < 0).mean()),
            "ideal_membership": float((ideal_labels == labels).double().mean())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/audio_synthetic_steps.json")
    args = p.parse_args()
    rows = []
    print(f"{'preset':20s} {'noise':>6s} {'mean cos(Δz_t, Δz_t-1)':>24s} {'share > 90°':>12s} {'ideal membership':>17s}")
    for name, keys in PRESETS.items():
        for noise in (True, False):
            kw = dict(keys) if noise else {**keys, "state_noise": 0.0, "off_manifold_noise": 0.0}
            r = {"preset": name, "noise": noise, **step_turns(SyntheticZdynConfig(**kw))}
            rows.append(r)
            print(f"{name:20s} {'yes' if noise else 'no':>6s} {r['mean_cos_consecutive']:24.3f} {r['share_reversed']:12.3f} {r['ideal_membership']:17.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
