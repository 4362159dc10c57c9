"""What the Engram benchmarks share: the Qwen2-shaped model's flags, `--tiny`, and the JSON.

The scripts run as `python benchmarks/<name>.py` (and are loaded from their files by the
smoke tests), so each puts this folder on `sys.path` before importing this module.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def add_lm_args(p, *, memory_size: int, precisions: tuple[str, ...], precision_help: str) -> None:
    """The flags of the Qwen2.5-0.5B-shaped model, its batch, its Engram layers and the timing."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--precision", default="autocast", choices=list(precisions), help=precision_help)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=4864)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--engram-layers", type=int, nargs="+", default=[1, 12])
    p.add_argument("--memory-size", type=int, default=memory_size, help="rows of each layer's table")
    p.add_argument("--slot-dim", type=int, default=64)
    p.add_argument("--heads-per-order", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    p.add_argument("--lr", type=float, default=1e-4)


def apply_tiny(args, argv, tiny: dict) -> None:
    """With `--tiny`, the tiny sizes for every flag not given explicitly (on the command line
    when `argv` is None)."""
    if not args.tiny:
        return
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
    for k, v in tiny.items():
        if k not in given:
            setattr(args, k, v)


def write_result(info: dict, out: str | None, name: str) -> Path:
    """Write the benchmark's JSON to `out`, or to benchmarks/results/<name>.json."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2))
    print(f"wrote {path}")
    return path


def cuda_kernels(averages) -> list:
    """The kernel rows of a torch.profiler `key_averages()` (an operator's row repeats the
    time of the kernels it launched, so a step's device time is the sum over these only)."""
    from torch.autograd import DeviceType

    return [e for e in averages if getattr(e, "device_type", None) == DeviceType.CUDA]
