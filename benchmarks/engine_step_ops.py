"""Operators one eager training step dispatches: the engine against the hand-written loop of
`engine_gpu.py` (the zoo's backbone on mqar), counted with torch.profiler on the CPU.

An eager step of a small model on a GPU is its kernel launches (a few tens of microseconds
each from Python), so the engine's own bookkeeping is counted here, where it is exact and
needs no GPU: operators that launch a kernel (views, detaches and host reads left out), with
the head's host-side checks off as they are on a GPU after the first batch. The optimiser is
torch's for-loop AdamW on both sides (the CPU's default); a GPU's foreach AdamW launches
fewer, equally on both sides.

    python benchmarks/engine_step_ops.py
    PYTHONPATH=<a checkout of another commit> python benchmarks/engine_step_ops.py --out F   # that commit's engine

Prints and saves JSON to benchmarks/results/engine_step_ops-cpu.json.
"""

from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import engine_gpu  # noqa: E402
from bench_common import write_result  # noqa: E402

NO_KERNEL = {"view", "detach", "slice", "select", "expand", "_unsafe_view", "alias", "t", "transpose", "unsqueeze", "squeeze",
             "as_strided", "split", "permute", "_local_scalar_dense", "split_with_sizes", "unbind", "lift_fresh", "reshape",
             "_reshape_alias",
             # allocations, host reads, and a `to` or `contiguous` that had nothing to do
             "empty", "empty_strided", "empty_like", "resize_", "to", "contiguous", "item"}


def launching(ops: collections.Counter) -> int:
    return sum(n for name, n in ops.items() if name not in NO_KERNEL)


def counted(step) -> collections.Counter:
    """The aten operators one call of `step` asks for, after three warm-up calls: the
    profiler's outermost aten events (what Python code and autograd's backward nodes call;
    the operators those call in turn are one request's implementation, not more requests)."""
    for _ in range(3):
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return outermost_aten(prof)


def outermost_aten(prof) -> collections.Counter:
    """The aten operators a profiled region asked for: events with no aten parent."""
    ops = collections.Counter()
    for ev in prof.events():
        parent = ev.cpu_parent
        if ev.name.startswith("aten::") and not (parent is not None and parent.name.startswith("aten::")):
            ops[ev.name.removeprefix("aten::")] += 1
    return ops


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/engine_step_ops-cpu.json)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    setting = dict(engine_gpu.SETTING, n_train=2000, batch=64)
    engine_gpu.SETTING.update(setting)
    tmp = Path(tempfile.mkdtemp())
    recipe = tmp / "zoo.toml"
    recipe.write_text(engine_gpu.recipe_text("eager", 10, 5))

    import engram_core.builtin.backbone as backbone
    from engram_core.builtin.mqar import MQARConfig, generate_mqar
    from engram_core.recipe import load_recipe
    from engram_core.train.engine import Engine

    backbone.CausalBackbone._checks_due = lambda self, t: False  # as on a GPU after the first batch
    r = load_recipe(recipe)
    engine = Engine(r, tmp / "run", device="cpu", show_progress=False)
    engine.build()
    run = engine._start_stage(0, r.stages[0], None)
    engine_ops = counted(lambda: engine.train_step(run, engine._next_batch(run, 5)))

    model = engine.head.lm  # the same model, driven by the hand-written loop of engine_gpu.py
    s = setting
    data = generate_mqar(MQARConfig(n_pairs=s["n_pairs"], seq_len=s["seq_len"], vocab_size=s["vocab"], query_spacing="power",
                                    n_train=s["n_train"]), s["n_train"], 1)
    pos_all, target_all = engine_gpu.scored_positions_and_targets(data["labels"], s["n_pairs"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=s["wd"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
    positions = torch.arange(s["seq_len"])
    gen = torch.Generator().manual_seed(0)

    def hand_step():
        idx = torch.randint(0, s["n_train"], (s["batch"],), generator=gen)
        engine_gpu.hand_train_step(model, opt, lambda *b: engine_gpu.scored_loss(model, positions, *b),
                                   data["input_ids"][idx], pos_all[idx], target_all[idx])
        sched.step()

    hand_ops = counted(hand_step)
    extra = {k: engine_ops[k] - hand_ops[k] for k in sorted(set(engine_ops) | set(hand_ops))
             if k not in NO_KERNEL and engine_ops[k] != hand_ops[k]}
    info = {"benchmark": "engine_step_ops", "engine_launching_ops": launching(engine_ops), "hand_launching_ops": launching(hand_ops),
            "engine_extra": launching(engine_ops) - launching(hand_ops), "extra_by_operator": extra,
            "engram_core": str(Path(backbone.__file__).resolve().parents[2])}
    print(f"kernel-launching operators per eager step: engine {info['engine_launching_ops']}, hand {info['hand_launching_ops']}, "
          f"engine's own {info['engine_extra']}")
    print("  by operator (engine - hand): " + ", ".join(f"{k} {v:+d}" for k, v in extra.items()))
    write_result(info, args.out, "engine_step_ops-cpu")
    return 0


if __name__ == "__main__":
    sys.exit(main())
