"""What training several seeds of the zoo model together in one process would buy (issue 32).

Processes time-slice a GPU: four compiled and graphed zoo runs at once trained about 190
steps/s together on an H100 against 568 for one alone. The issue's next step is "several
seeds of one recipe trained together in one process (stacked parameters with torch.func)".
Before the engine grows that, this script measures it with the hand-written loop of
`engine_gpu.py` (the memory zoo's backbone on mqar at Zoology's first setting):

* **one**: one model, the hand loop's step (AdamW, weight decay 0.1, clipping at 1.0);
* **stacked K**: K models of seeds 0..K-1 as one set of stacked parameters
  (`torch.func.stack_module_state`), the scored loss of each on its own batch under
  `torch.func.vmap`, summed and backpropagated once, each member's gradient clipped by its own
  norm, one AdamW over the stacked tensors (elementwise, so each member's update is its own).

Each figure is member-steps/s (K × steps/s for a stack), eager, compiled, graphed (the whole
stacked step recorded once as a CUDA graph and replayed, with a capturable AdamW: the PyTorch
docs' whole-step capture, as `engine_gpu.py`'s hand loop) or compiled and graphed,
alternating which K runs first and repeating `--repeats` times; "vs_one" is the stack's
member-steps/s over one model's through the same code. The fair baseline for a stack is the
fastest single run, the hand loop compiled and graphed (`engine_gpu.py --modes
compiled+graphed`). `--check` (also on a CPU) trains K = 2 stacked and two separate models
for a few steps and prints the largest difference of their parameters; on a GPU it also
compares the graphed stack with the eager one.

    python benchmarks/stacked_zoo.py [--k 1 2 4 8 16] [--modes eager compiled graphed compiled+graphed] [--steps 300]

Prints and saves JSON to benchmarks/results/stacked_zoo-<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import engine_gpu  # noqa: E402
from bench_common import write_result  # noqa: E402


class ScoredLoss(nn.Module):
    """The hand loop's loss as a module, so that torch.func can call it with any parameters."""

    def __init__(self, model: nn.Module, positions: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("positions", positions, persistent=False)

    def forward(self, ids, pos, target):
        return engine_gpu.scored_loss(self.model, self.positions, ids, pos, target)


def make_model(seed: int, device, setting) -> nn.Module:
    from engram_core.nn import CausalTransformer, CausalTransformerConfig

    torch.manual_seed(seed)
    cfg = CausalTransformerConfig(vocab_size=setting["vocab"], dim=setting["dim"], n_layers=setting["layers"], n_heads=setting["heads"],
                                  max_len=setting["seq_len"] + 16 + 64)
    return ScoredLoss(CausalTransformer(cfg), torch.arange(setting["seq_len"])).to(device)


class Stack:
    """K members' parameters stacked along a new first dimension, trained as one."""

    def __init__(self, members: list[nn.Module], lr: float, wd: float, fused: bool = False, capturable: bool = False):
        self.k = len(members)
        params, buffers = torch.func.stack_module_state(members)
        self.params = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        self.buffers = buffers
        # the module whose code runs with the stacked parameters (not moved to "meta": that
        # would untie the embedding and the output projection, which functional_call keeps tied)
        self.base = copy.deepcopy(members[0])
        self.opt = torch.optim.AdamW(self.params.values(), lr=lr, weight_decay=wd, capturable=capturable,
                                     **({"fused": True} if fused else {}))

        def one(p, b, ids, pos, target):
            return torch.func.functional_call(self.base, (p, b), (ids, pos, target))

        self.losses = torch.func.vmap(one, in_dims=(0, 0, 0, 0, 0), randomness="different")

    def step(self, ids, pos, target, loss_fn=None) -> torch.Tensor:
        """ids, pos, target: (K, batch, ...) — each member's own batch. Returns the K losses."""
        self.opt.zero_grad(set_to_none=True)
        # the math attention: under vmap, the memory-efficient kernel's backward fails on the
        # batched layout ("LSE is not correctly aligned (strideH)", torch 2.11, H100); at
        # length 64 the math path costs little, and K = 1 runs the same code
        with sdpa_kernel(SDPBackend.MATH):
            losses = (loss_fn or self.losses)(self.params, self.buffers, ids, pos, target)
            losses.sum().backward()  # members share nothing: each gets its own loss's gradient
        self.clip_(1.0)
        self.opt.step()
        return losses.detach()

    def clip_(self, max_norm: float) -> None:
        """Each member's gradient scaled to norm <= max_norm, as clip_grad_norm_ does for one model."""
        grads = [p.grad for p in self.params.values()]
        norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()  # (K,)
        coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(coef.view(-1, *([1] * (g.dim() - 1))))


def data(setting, device, seed: int = 1):
    from engram_core.builtin.mqar import MQARConfig, generate_mqar

    cfg = MQARConfig(n_pairs=setting["n_pairs"], seq_len=setting["seq_len"], vocab_size=setting["vocab"], query_spacing="power",
                     n_train=setting["n_train"])
    d = generate_mqar(cfg, setting["n_train"], seed)
    ids = d["input_ids"].to(device)
    pos, target = engine_gpu.scored_positions_and_targets(d["labels"].to(device), setting["n_pairs"])
    return ids, pos, target


def check(setting, device, k: int = 2, steps: int = 3) -> float:
    """Largest |difference| of parameters between K stacked members and K models trained
    separately on the same batches (the stack must train each member as one model alone)."""
    ids, pos, target = data(setting, device)
    members = [make_model(s, device, setting) for s in range(k)]
    alone = [copy.deepcopy(m) for m in members]
    stack = Stack(members, setting["lr"], setting["wd"])
    opts = [torch.optim.AdamW(m.parameters(), lr=setting["lr"], weight_decay=setting["wd"]) for m in alone]
    gen = torch.Generator(device=device).manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, ids.shape[0], (k, setting["batch"]), device=device, generator=gen)
        stack.step(ids[idx], pos[idx], target[idx])
        for i, (m, opt) in enumerate(zip(alone, opts)):
            engine_gpu.hand_train_step(m, opt, m, ids[idx[i]], pos[idx[i]], target[idx[i]])
    return max(float((stack.params[n][i] - p).detach().abs().max()) for i, m in enumerate(alone) for n, p in m.named_parameters())


class Stepper:
    """A stack's training step as the mode runs it: called as is (eager, compiled) or, graphed,
    the first `WARM_STEPS` steps on a side stream, then the step recorded once as a CUDA graph
    whose input buffers each later batch is copied into."""

    WARM_STEPS = 3

    def __init__(self, stack: Stack, mode: str):
        self.stack, self.graphed = stack, "graphed" in mode
        self.loss_fn = torch.compile(stack.losses) if "compiled" in mode else None
        self.calls, self.graph, self.inputs, self.losses = 0, None, None, None

    def __call__(self, ids, pos, target) -> torch.Tensor:
        self.calls += 1
        if not self.graphed:
            return self.stack.step(ids, pos, target, self.loss_fn)
        if self.calls <= self.WARM_STEPS:  # the docs' warm-up on a side stream before capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                losses = self.stack.step(ids, pos, target, self.loss_fn)
            torch.cuda.current_stream().wait_stream(side)
            return losses
        if self.graph is None:
            self.inputs = [x.clone() for x in (ids, pos, target)]
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.losses = self.stack.step(*self.inputs, self.loss_fn)
        else:
            for dst, src in zip(self.inputs, (ids, pos, target)):
                dst.copy_(src)
        self.graph.replay()
        return self.losses


def check_graphed(setting, device, k: int = 2, steps: int = 6) -> float:
    """Largest |difference| of parameters between a stack trained eagerly and the same stack
    trained with its step replayed as a CUDA graph, on the same batches (CUDA only)."""
    ids, pos, target = data(setting, device)
    stacks = [Stack([make_model(s, device, setting) for s in range(k)], setting["lr"], setting["wd"], capturable=True)
              for _ in range(2)]
    steppers = [Stepper(stacks[0], "eager"), Stepper(stacks[1], "graphed")]
    gen = torch.Generator(device=device).manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, ids.shape[0], (k, setting["batch"]), device=device, generator=gen)
        for step in steppers:
            step(ids[idx], pos[idx], target[idx])
    torch.cuda.synchronize()
    return max(float((stacks[0].params[n] - stacks[1].params[n]).abs().max()) for n in stacks[0].params)


def timed_run(k: int, mode: str, setting, device, steps: int, fused: bool) -> float:
    """Member-steps/s of K stacked members (K = 1: one model through the same code)."""
    ids, pos, target = data(setting, device)
    stack = Stack([make_model(s, device, setting) for s in range(k)], setting["lr"], setting["wd"], fused=fused,
                  capturable="graphed" in mode)
    step = Stepper(stack, mode)
    gen = torch.Generator(device=device).manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    warm = max(Stepper.WARM_STEPS + 2, steps // 10)  # the capture and a first replay happen before the clock starts
    for i in range(steps + warm):
        if i == warm:
            sync()
            t0 = time.perf_counter()
        idx = torch.randint(0, ids.shape[0], (k, setting["batch"]), device=device, generator=gen)
        step(ids[idx], pos[idx], target[idx])
    sync()
    return k * steps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=list(engine_gpu.MODES))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--precision", default="tf32", choices=["fp32", "tf32"])
    p.add_argument("--fused", action="store_true", help="AdamW(fused=True)")
    p.add_argument("--check", action="store_true", help="only the correctness check (K = 2, a few steps, fp32 matmuls; runs on a CPU)")
    p.add_argument("--tiny", action="store_true", help="a small setting (a CPU smoke run)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    setting = dict(engine_gpu.SETTING)
    if args.tiny:
        setting.update(vocab=64, seq_len=16, n_pairs=2, batch=8, n_train=256)
    if args.precision == "tf32" and not args.check:
        # not for --check: TF32 rounds a batched matmul differently from K separate ones, and
        # Adam's normalised first steps can turn such roundings into differences of up to lr
        # (an H100 check under TF32 gave 5.8e-3 at lr 3e-3), which would hide a real error
        torch.set_float32_matmul_precision("high")
    if any("graphed" in m for m in args.modes) and device.type != "cuda" and not args.check:
        print("error: --modes graphed / compiled+graphed record the step as a CUDA graph and need a CUDA GPU; "
              "on this machine use --modes eager compiled", file=sys.stderr)
        return 2
    if args.check:
        diff = check(setting, device)
        print(f"stacked K = 2 against two models trained alone, 3 steps: largest parameter difference {diff:.3g}")
        if device.type == "cuda":
            graphed = check_graphed(setting, device)
            print(f"stacked K = 2 graphed against eager, 6 steps: largest parameter difference {graphed:.3g}")
            diff = max(diff, graphed)
        return 0 if diff < 1e-4 else 1
    info = {"benchmark": "stacked_zoo", "command": "python benchmarks/stacked_zoo.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "setting": setting, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "precision": args.precision, "fused_adamw": args.fused, "steps": args.steps, "repeats": args.repeats,
            "commit": engine_gpu.clean_commit(), "source_digest": engine_gpu.source_digest(), "runs": {}}
    for mode in args.modes:
        for r in range(args.repeats):
            for k in (args.k if r % 2 == 0 else args.k[::-1]):  # which K goes first alternates
                rate = timed_run(k, mode, setting, device, args.steps, args.fused)
                info["runs"].setdefault(f"{mode}/{k}", []).append(round(rate, 1))
                print(f"{mode:>8} K = {k:2d}: {rate:9.1f} member-steps/s", flush=True)
                write_result(info, args.out, f"stacked_zoo-{device.type}")  # after each: a time limit keeps what ran
    for mode in args.modes:
        one = statistics.median(info["runs"].get(f"{mode}/1", [0])) or None
        for k in args.k:
            med = statistics.median(info["runs"][f"{mode}/{k}"])
            info.setdefault("summary", {})[f"{mode}/{k}"] = {"member_steps_per_s": med, "vs_one": round(med / one, 2) if one else None}
    write_result(info, args.out, f"stacked_zoo-{device.type}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
