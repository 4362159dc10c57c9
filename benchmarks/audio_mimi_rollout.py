"""Rollout-objective cost of the audio-mimi heads (forward + backward of one K-step batch).

    python benchmarks/audio_mimi_rollout.py [--device cpu|cuda] [--out bench.json]

Prints a table and writes JSON: seconds per rollout-training iteration for gaussian_mlp
and vmf_magnitude at D = 64 and 512 (batch 64, K = 16, hidden 256 × 2), and
VonMisesFisher.log_prob throughput.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from engram_audio_mimi.distributions import VonMisesFisher
from engram_audio_mimi.heads import GaussianMLPConfig, GaussianMLPHead, VMFMagnitudeConfig, VMFMagnitudeHead
from engram_audio_mimi.objectives import rollout

from engram_core.components import BuildContext, DataSpec


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    rows = []
    for dim in (64, 512):
        spec = DataSpec("bench", dim=dim)
        for name, head in (
            ("gaussian_mlp", GaussianMLPHead(GaussianMLPConfig(), BuildContext(spec=spec))),
            ("vmf_magnitude", VMFMagnitudeHead(VMFMagnitudeConfig(kappa_coupling="learned"), BuildContext(spec=spec))),
        ):
            head = head.to(device)
            z0 = torch.randn(64, dim, device=device)
            dz = 0.3 * torch.randn(64, 16, dim, device=device)

            def step(head=head, z0=z0, dz=dz):
                head.zero_grad(set_to_none=True)
                rollout(head, z0, dz)["nll"].mean().backward()

            sec = timed(step, args.repeats, device)
            rows.append({"head": name, "dim": dim, "batch": 64, "K": 16, "s_per_iter": sec})
            print(f"{name:14s} D={dim:4d}  {sec * 1e3:8.1f} ms per rollout iteration (B=64, K=16, fwd+bwd)")
    for dim in (64, 512, 1024):
        loc = torch.randn(4096, dim, device=device)
        kappa = torch.exp(torch.empty(4096, device=device).uniform_(-6.9, 11.5))
        x = torch.nn.functional.normalize(torch.randn(4096, dim, device=device), dim=-1)

        def log_prob(loc=loc, kappa=kappa, x=x):
            return VonMisesFisher(loc, kappa, validate_args=False).log_prob(x)

        sec = timed(log_prob, args.repeats, device)
        rows.append({"op": "vmf_log_prob", "dim": dim, "n": 4096, "s": sec})
        print(f"vMF log_prob   D={dim:4d}  {4096 / sec / 1e6:8.2f} M evaluations/s")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": str(device), "torch": torch.__version__, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
