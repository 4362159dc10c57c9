"""The engine against a hand-written PyTorch loop on one GPU: the memory zoo's backbone on
mqar at Zoology's first setting (vocab 8192, length 64, 4 pairs, batch 512, 100k sequences).

    python benchmarks/engine_gpu.py [--steps 600] [--repeats 2] [--modes eager compiled graphed compiled+graphed]
                                    [--concurrent 1 2 4 8 16] [--full-run] [--rollout]

* **hand**: a plain loop a PyTorch user would write for the same model (the core
  `CausalTransformer`, 2 blocks, width 64, full attention), the data set on the GPU and
  indices drawn there, logits only at the 4 scored positions of each sequence, AdamW
  (weight decay 0.1), cosine schedule, gradient clipping at 1.0 — eager, `torch.compile`d
  (the loss function), CUDA-graphed (the PyTorch docs' whole-step capture with a
  capturable AdamW), or compiled and graphed.
* **engine**: `python -m engram_core.run` on the same recipe (`run.compile`,
  `run.cuda_graphs`), steps/s read from the run's own `throughput/steps_per_s`.
* Each (mode, hand/engine) runs in its own process, in the order hand, engine, engine,
  hand, ... (alternated and repeated `--repeats` times); a figure is the median over the
  steady-state log windows (the first `--skip` windows — start-up, compile, capture — are
  dropped) and over repeats, with every value kept in the JSON.
* `--concurrent N ...`: N engine runs started together (eager unless `--concurrent-mode`),
  threads left to the engine's default sharing; aggregate steps/s = the sum of each run's
  median. With `--mps`, each N runs twice, alternating which goes first: as plain processes
  (which time-slice the GPU) and as clients of an NVIDIA MPS server this script starts for
  them in a private pipe folder and stops after (kernels of several processes then run on
  the GPU at once; no device setting is changed).
* `--full-run`: the zoo setting's 3,000 steps in one `engram-run` (graphed), wall time from
  launch to exit and the test accuracy it reaches.
* `--rollout`: `recipes/rollout_vmf.toml` on CUDA against one CPU core (`OMP_NUM_THREADS=1`).

Prints and saves JSON to benchmarks/results/engine_gpu-<device>.json. Needs CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_common import write_result  # noqa: E402

SETTING = dict(vocab=8192, seq_len=64, n_pairs=4, batch=512, n_train=100_000, dim=64, layers=2, heads=4, lr=3e-3, wd=0.1)
MODES = ("eager", "compiled", "graphed", "compiled+graphed")

RECIPE = """
[run]
name = "zoo_gpu"
seed = {seed}
device = "cuda"
compile = {compile}{graphs}{run_extra}
[data]
type = "mqar"
n_pairs = {n_pairs}
seq_len = {seq_len}
vocab_size = {vocab}
query_spacing = "power"
n_train = {n_train}
n_eval = 3000
[head]
type = "causal_backbone"
dim = {dim}
n_layers = {layers}
n_heads = {heads}
window = 0
[[stages]]
name = "train"
objective = {{ type = "token_lm" }}
steps = {steps}
batch_size = {batch}
lr = {lr}
optimizer = "adamw"
weight_decay = {wd}
schedule = "cosine"
warmup_steps = {warmup}
grad_clip = 1.0{stage_extra}
eval_every = 0
log_every = {log_every}
[[metrics]]
type = "completion_accuracy"
"""


# ---- the hand-written loop ------------------------------------------------------------------

def scored_positions_and_targets(labels, n_pairs: int):
    """(positions, targets), each (N, n_pairs): the positions whose next token is scored, in
    order, and those tokens (mqar scores n_pairs per sequence; the hand loop knows it)."""
    scored = labels[:, 1:] != -100
    pos = scored.int().argsort(dim=1, descending=True, stable=True)[:, :n_pairs].sort(dim=1).values
    return pos, labels.gather(1, pos + 1)


def scored_loss(model, positions, ids, pos, target):
    """The hand loop's loss: the core CausalTransformer's blocks, logits only at the scored
    positions `pos`, cross-entropy against `target`."""
    import torch.nn.functional as F

    x = model.tok(ids) + model.pos(positions)[None]
    for block in model.blocks:
        x, _ = block(x, None, None)
    hidden = model.ln_f(x)
    h = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))  # only the scored positions
    logits = model.lm_head(h)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1))


def hand_train_step(model, opt, loss_fn, ids, pos, target):
    """One step as a PyTorch user writes it: zero, loss, backward, clip at 1.0, optimiser step."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss = loss_fn(ids, pos, target)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()


def hand_loop(mode: str, steps: int, log_every: int, seed: int = 0, precision: str = "fp32", fused: bool = False,
              profile: int = 0) -> dict:
    """steps/s of each log window of a plain PyTorch loop (one process). `precision`: fp32,
    tf32 (fp32 matmuls on TF32 tensor cores) or bf16 (autocast); `fused`: AdamW(fused=True);
    `profile` > 0: the last `profile` steps run under torch.profiler (see `kernel_table`)."""
    import contextlib

    import torch

    if precision == "tf32":
        torch.set_float32_matmul_precision("high")

    from engram_core.builtin.mqar import MQARConfig, generate_mqar
    from engram_core.nn import CausalTransformer, CausalTransformerConfig

    s = SETTING
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU only to try the script out
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    torch.manual_seed(seed)
    cfg = MQARConfig(n_pairs=s["n_pairs"], seq_len=s["seq_len"], vocab_size=s["vocab"], query_spacing="power", n_train=s["n_train"])
    data = generate_mqar(cfg, s["n_train"], seed * 2 + 1)
    ids_all = data["input_ids"].to(dev)
    labels_all = data["labels"].to(dev)
    pos_all, target_all = scored_positions_and_targets(labels_all, s["n_pairs"])
    model = CausalTransformer(CausalTransformerConfig(vocab_size=s["vocab"], dim=s["dim"], n_layers=s["layers"], n_heads=s["heads"],
                                                      max_len=s["seq_len"] + 16 + 64)).to(dev)
    graphed = "graphed" in mode
    lr = torch.tensor(s["lr"], device=dev) if graphed else s["lr"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=s["wd"], capturable=graphed, **({"fused": True} if fused else {}))
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, cache_enabled=False) if precision == "bf16" else contextlib.nullcontext()
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (t + 1) / warm if t < warm else 0.5 * (1 + math.cos(math.pi * (t - warm) / max(1, steps - warm))))

    positions = torch.arange(s["seq_len"], device=dev)

    def loss_fn(ids, pos, target):
        with amp:
            return scored_loss(model, positions, ids, pos, target)

    if "compiled" in mode:
        loss_fn = torch.compile(loss_fn)
    gen = torch.Generator(device=dev).manual_seed(seed)
    n = ids_all.shape[0]

    def step(ids, pos, target):
        return hand_train_step(model, opt, loss_fn, ids, pos, target)

    def batch():
        idx = torch.randint(0, n, (s["batch"],), device=dev, generator=gen)
        return ids_all[idx], pos_all[idx], target_all[idx]

    graph = static = None
    windows, losses = [], []
    t = time.perf_counter()
    loss_sum = torch.zeros((), device=dev)
    prof = None
    for i in range(steps):
        if profile and i == steps - profile:
            sync()
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
            prof.__enter__()
            t_prof = time.perf_counter()
        b = batch()
        if not graphed or i < 3:
            if graphed:  # the docs' warm-up on a side stream
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    loss = step(*b)
                torch.cuda.current_stream().wait_stream(side)
            else:
                loss = step(*b)
        elif graph is None:
            static = [x.clone() for x in b]
            graph = torch.cuda.CUDAGraph()
            opt.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                static_loss = step(*static)
            graph.replay()
            loss = static_loss
        else:
            for dst, src in zip(static, b):
                dst.copy_(src)
            graph.replay()
            loss = static_loss
        loss_sum += loss
        sched.step()
        if (i + 1) % log_every == 0:
            losses.append(float(loss_sum) / log_every)  # one sync per window, as the engine's log step
            loss_sum.zero_()
            now = time.perf_counter()
            windows.append(log_every / (now - t))
            t = now
    out = {"windows": windows, "loss": losses}
    if prof is not None:
        sync()
        wall = (time.perf_counter() - t_prof) / profile
        prof.__exit__(None, None, None)
        out["profile"] = kernel_table(prof, profile, wall)
    return out


def kernel_table(prof, steps: int, wall_s: float, top: int = 18) -> dict:
    """Per step: wall ms, GPU kernel ms (the sum of kernel durations), kernel launches, and
    the kernels that take the most GPU time (name cut to 90 characters)."""
    kernels: dict[str, list[float]] = {}
    for ev in prof.events():
        if "CUDA" in str(getattr(ev, "device_type", "")) and ev.device_time > 0:
            kernels.setdefault(ev.name[:90], []).append(ev.device_time)  # µs
    total = sum(sum(v) for v in kernels.values())
    rows = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {"wall_ms_per_step": round(wall_s * 1e3, 3), "gpu_ms_per_step": round(total / steps / 1e3, 3),
            "kernels_per_step": round(sum(len(v) for v in kernels.values()) / steps, 1),
            "top": [{"kernel": k, "us_per_step": round(sum(v) / steps, 1), "calls_per_step": round(len(v) / steps, 2)} for k, v in rows]}


def engine_profile(mode: str, steps: int, profile: int, precision: str, fused: bool = False) -> dict:
    """The engine's own train step (`Engine._next_batch` + `train_step`) in this process,
    the last `profile` of `steps` steps under torch.profiler: what the engine launches that
    the hand loop does not."""
    import torch

    from engram_core.recipe import load_recipe
    from engram_core.train.engine import Engine

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    out_dir = Path(tempfile.mkdtemp())
    recipe = out_dir / "zoo.toml"
    recipe.write_text(recipe_text(mode, steps, 10**6, 0, precision, fused))
    r = load_recipe(recipe)
    e = Engine(r, out_dir / "run", show_progress=False, device=None if torch.cuda.is_available() else "cpu")
    e.build()
    run = e._start_stage(0, r.stages[0], None)
    prof = None
    for i in range(steps):
        if i == steps - profile:
            sync()
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
            prof.__enter__()
            t = time.perf_counter()
        e.train_step(run, e._next_batch(run, i))
        e.step += 1
    sync()
    wall = (time.perf_counter() - t) / profile
    prof.__exit__(None, None, None)
    return kernel_table(prof, profile, wall)


# ---- the engine -----------------------------------------------------------------------------

def recipe_text(mode: str, steps: int, log_every: int, seed: int = 0, precision: str = "fp32", fused: bool = False) -> str:
    """The zoo setting as a recipe. Keys at their defaults are left out: the script also times
    older commits, whose schema may not know them."""
    graphs = "\ncuda_graphs = true" if "graphed" in mode else ""
    run_extra = {"tf32": '\nmatmul_precision = "high"', "bf16": '\nprecision = "bf16"'}.get(precision, "")
    stage_extra = '\noptimizer_impl = "fused"' if fused else ""
    return RECIPE.format(seed=seed, compile=str("compiled" in mode).lower(), graphs=graphs, run_extra=run_extra, stage_extra=stage_extra,
                         steps=steps, warmup=max(1, steps // 10), log_every=log_every, **SETTING)


def engine_run(mode: str, steps: int, log_every: int, out: Path, seed: int = 0, extra_env: dict | None = None,
               threads: str | None = None, precision: str = "fp32", fused: bool = False) -> subprocess.Popen:
    recipe = out / f"zoo_{mode.replace('+', '_')}_{seed}_{time.time_ns()}.toml"
    recipe.write_text(recipe_text(mode, steps, log_every, seed, precision, fused))
    env = dict(os.environ, **(extra_env or {}))
    if threads is None:
        env.pop("OMP_NUM_THREADS", None)  # the engine's default thread sharing
    else:
        env["OMP_NUM_THREADS"] = threads
    run_out = out / f"runs_{recipe.stem}"
    cmd = [sys.executable, "-m", "engram_core.run", str(recipe), "--out", str(run_out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc.run_out = run_out  # type: ignore[attr-defined]
    proc.t_start = time.perf_counter()  # type: ignore[attr-defined]
    return proc


def engine_result(proc: subprocess.Popen) -> dict:
    text, _ = proc.communicate()
    wall = time.perf_counter() - proc.t_start  # type: ignore[attr-defined]
    if proc.returncode != 0:
        raise SystemExit(f"engine run failed ({proc.returncode}):\n{text[-3000:]}")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run_dir,) = [p.parent for p in Path(proc.run_out).rglob("summary.json")]  # type: ignore[attr-defined]
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    windows = [e.value for e in acc.Scalars("throughput/steps_per_s")]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"windows": windows, "wall_s": round(wall, 2), "final": summary["final"], "train_loss": [e.value for e in acc.Scalars("train/loss")]}


def clean_commit() -> str | None:
    """HEAD's short hash where the tree has no changes to tracked files, else None (a copy on
    the GPU machine keeps the git history of the commit it was cloned at; `source_digest`
    then names the code)."""
    git = ["git", "-C", str(HERE)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout.strip()
    return head if head and not dirty else None


def source_digest() -> str:
    """sha256 of the engine's and the benchmark's sources: which code was timed, where the
    copy on the GPU machine has no git history of its own (`git rev-parse` there names the
    commit it was cloned at, not the tree it runs)."""
    import hashlib

    files = sorted((HERE.parent / "engram_core").rglob("*.py")) + [Path(__file__)]
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(HERE.parent).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def steady(windows: list[float], skip: int) -> float:
    kept = windows[skip:] or windows[-1:]
    return statistics.median(kept)


def run_hand_subprocess(mode: str, steps: int, log_every: int, precision: str = "fp32", fused: bool = False) -> dict:
    out = subprocess.run([sys.executable, __file__, "--hand", mode, "--steps", str(steps), "--log-every", str(log_every),
                          "--precision", precision] + (["--fused"] if fused else []), capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"hand loop {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(args, tmp: Path) -> dict:
    table = {}
    for mode in args.modes:
        hand, engine = [], []
        for r in range(args.repeats):
            order = ("hand", "engine") if r % 2 == 0 else ("engine", "hand")
            for who in [w for w in order if w in args.sides]:
                if who == "hand":
                    res = run_hand_subprocess(mode, args.steps, args.log_every, args.precision, args.fused)
                    hand.append(res)
                else:
                    res = engine_result(engine_run(mode, args.steps, args.log_every, tmp, precision=args.precision, fused=args.fused))
                    engine.append(res)
                print(f"  {mode:17s} {who:6s} {steady(res['windows'], args.skip):8.1f} steps/s", flush=True)
        h = statistics.median(steady(x["windows"], args.skip) for x in hand) if hand else float("nan")
        e = statistics.median(steady(x["windows"], args.skip) for x in engine) if engine else float("nan")
        table[mode] = {"hand_steps_per_s": round(h, 1) if hand else None, "engine_steps_per_s": round(e, 1) if engine else None,
                       "engine_vs_hand": round(e / h, 3) if hand and engine else None,
                       "hand_runs": hand, "engine_runs": engine}
        print(f"{mode:17s} hand {h:7.1f}  engine {e:7.1f}  engine/hand {e / h:.3f}", flush=True)
    return table


@contextlib.contextmanager
def mps_server(folder: Path):
    """An NVIDIA MPS control daemon for the runs started inside (their environment names its
    private pipe folder); yields that environment, or raises RuntimeError when MPS cannot start."""
    pipes, logs = folder / "mps-pipe", folder / "mps-log"
    pipes.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    env = {"CUDA_MPS_PIPE_DIRECTORY": str(pipes), "CUDA_MPS_LOG_DIRECTORY": str(logs)}
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        raise RuntimeError("nvidia-cuda-mps-control is not on PATH")
    started = subprocess.run([control, "-d"], env=dict(os.environ, **env), capture_output=True, text=True)
    if started.returncode != 0:
        raise RuntimeError(f"nvidia-cuda-mps-control -d exited {started.returncode}: {started.stderr.strip()[:200]}")
    try:
        yield env
    finally:
        subprocess.run([control], input="quit\n", env=dict(os.environ, **env), capture_output=True, text=True)
        time.sleep(1.0)  # the server exits after its clients; the next measurement must not meet it


def concurrent_runs(args, tmp: Path, n: int, extra_env: dict | None = None) -> dict:
    procs = [engine_run(args.concurrent_mode, args.concurrent_steps, args.log_every, tmp, seed=i, precision=args.precision,
                        fused=args.fused, extra_env=extra_env) for i in range(n)]
    each = [steady(engine_result(p)["windows"], args.skip) for p in procs]
    return {"each_steps_per_s": [round(x, 1) for x in each], "aggregate_steps_per_s": round(sum(each), 1)}


def concurrency(args, tmp: Path, save=lambda partial: None) -> dict:
    """N runs at once, as plain processes and (with --mps) as MPS clients, the order of the two
    alternating from one N to the next; each figure beside the same kind's one-run figure."""
    out = {}
    for i, n in enumerate(args.concurrent):
        kinds = ["processes", "mps"] if args.mps else ["processes"]
        for kind in kinds if i % 2 == 0 else kinds[::-1]:
            if kind == "processes":
                res = concurrent_runs(args, tmp, n)
            else:
                try:
                    with mps_server(tmp / f"mps-{n}") as env:
                        res = concurrent_runs(args, tmp, n, extra_env=env)
                except RuntimeError as exc:
                    res = {"unavailable": str(exc)}
            out.setdefault(kind, {})[str(n)] = res
            if "aggregate_steps_per_s" in res:
                print(f"{n:3d} concurrent ({args.concurrent_mode}, {kind}): aggregate {res['aggregate_steps_per_s']:8.1f} steps/s, "
                      f"each {statistics.median(res['each_steps_per_s']):.1f}", flush=True)
            else:
                print(f"{n:3d} concurrent ({kind}): {res['unavailable']}", flush=True)
        for runs in out.values():
            one = runs.get("1", {}).get("aggregate_steps_per_s")
            for v in runs.values():
                if one and "aggregate_steps_per_s" in v:
                    v["vs_one_run"] = round(v["aggregate_steps_per_s"] / one, 2)
        save(out)  # after each N: a larger N stopped by a time limit keeps the smaller ones
    return out


def full_run(args, tmp: Path) -> dict:
    proc = engine_run(args.full_mode, 3000, 100, tmp, precision=args.precision, fused=args.fused)
    res = engine_result(proc)
    acc = res["final"].get("eval/acc")
    print(f"3000 steps ({args.full_mode}): {res['wall_s']:.1f} s wall from launch to exit, eval/acc {acc}", flush=True)
    return {"mode": args.full_mode, "wall_s": res["wall_s"], "eval_acc": acc, "final": res["final"]}


ROLLOUT_KINDS = {"cuda": ["--device", "cuda"], "cpu": ["--device", "cpu"], "cuda+graphs": ["--device", "cuda", "run.cuda_graphs=true"],
                 "cuda+auto": ["--device", "cuda", 'run.cuda_graphs="auto"']}


def rollout_phases(log: str) -> dict:
    """Where a rollout_vmf run's time went, from its console: each train stage's last
    steps/s and each evaluation's seconds (start-up is the wall time the two leave over)."""
    stages = {m[0]: float(m[1]) for m in re.findall(r"\[(\w+)\] step \d+/\d+ .*?([\d.]+) it/s", log)}
    evals = [float(m) for m in re.findall(r"eval @ \d+ \(([\d.]+)s\)", log)]
    return {"steps_per_s": stages, "eval_s": evals}


def rollout(args, tmp: Path) -> dict:
    """recipes/rollout_vmf.toml launch to exit on CUDA and on one CPU core (and, with
    --rollout-graphs, on CUDA with each training step replayed as a CUDA graph), the order
    reversed on every other repeat."""
    out, phases = {}, {}
    kinds = ["cuda", "cpu"] + (["cuda+graphs", "cuda+auto"] if args.rollout_graphs else [])
    for r in range(args.rollout_repeats):
        for dev in (kinds if r % 2 == 0 else kinds[::-1]):
            env = dict(os.environ, OMP_NUM_THREADS="1") if dev == "cpu" else dict(os.environ)
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "engram_core.run", "recipes/rollout_vmf.toml", *ROLLOUT_KINDS[dev], "--out",
                                str(tmp / f"rollout_{dev}_{r}")], env=env, capture_output=True, text=True, cwd=HERE.parent)
            if p.returncode != 0:
                raise SystemExit(f"rollout_vmf on {dev} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")
            out.setdefault(dev, []).append(round(time.perf_counter() - t, 2))
            phases.setdefault(dev, []).append(rollout_phases(p.stdout + p.stderr))
            print(f"rollout_vmf {dev}: {out[dev][-1]:.1f} s; {phases[dev][-1]}", flush=True)
    return {k: {"wall_s": v, "median_s": statistics.median(v), "phases": phases[k]} for k, v in out.items()}


def profiles(args, tmp: Path) -> dict:
    """--profile SIDE:MODE:PRECISION[:fused] ...: one profiled run each, in its own process."""
    out = {}
    for spec in args.profile:
        side, mode, precision, *rest = spec.split(":")
        if side == "hand":
            cmd = [sys.executable, __file__, "--hand", mode, "--steps", str(args.steps), "--log-every", str(args.log_every),
                   "--precision", precision, "--profile", "--profile-steps", str(args.profile_steps)] + (["--fused"] if rest else [])
        else:
            cmd = [sys.executable, __file__, "--steps", str(args.steps), "--profile-steps", str(args.profile_steps),
                   "--engine-profile", mode, precision] + (["--fused"] if rest else [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            out[spec] = {"error": p.stderr[-2000:]}
            print(f"{spec}: failed\n{p.stderr[-2000:]}", flush=True)
            continue
        res = json.loads(p.stdout.strip().splitlines()[-1])
        table = res.get("profile", res)
        out[spec] = table
        print(f"{spec}: wall {table['wall_ms_per_step']} ms/step, GPU {table['gpu_ms_per_step']} ms/step, "
              f"{table['kernels_per_step']} kernels/step", flush=True)
        for row in table["top"]:
            print(f"    {row['us_per_step']:8.1f} us {row['calls_per_step']:5.1f}x  {row['kernel']}", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hand", choices=MODES, help=argparse.SUPPRESS)  # one hand-loop run (a subprocess of this script)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--skip", type=int, default=2, help="log windows dropped at the start of each run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=MODES)
    p.add_argument("--sides", nargs="+", default=["hand", "engine"], choices=["hand", "engine"],
                   help="what to time per mode (engine alone: an older commit's engine on PYTHONPATH)")
    p.add_argument("--concurrent", type=int, nargs="*", default=[])
    p.add_argument("--concurrent-mode", default="eager", choices=MODES)
    p.add_argument("--concurrent-steps", type=int, default=1500)
    p.add_argument("--mps", action="store_true", help="--concurrent also as clients of an MPS server (alternated with plain processes)")
    p.add_argument("--full-run", action="store_true")
    p.add_argument("--full-mode", default="graphed", choices=MODES)
    p.add_argument("--rollout", action="store_true")
    p.add_argument("--rollout-repeats", type=int, default=2)
    p.add_argument("--rollout-graphs", action="store_true", help="--rollout also with run.cuda_graphs = true and = \"auto\"")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"],
                   help="both sides: fp32, TF32 matmuls (engine: run.matmul_precision = 'high') or bf16 autocast (run.precision = 'bf16')")
    p.add_argument("--fused", action="store_true", help="both sides: AdamW(fused=True) (engine: optimizer_impl = 'fused')")
    p.add_argument("--profile", nargs="*", default=None, metavar="SIDE:MODE:PRECISION[:fused]",
                   help="kernel tables of single runs, e.g. hand:eager:fp32 engine:graphed:fp32 hand:graphed:bf16:fused")
    p.add_argument("--profile-steps", type=int, default=20)
    p.add_argument("--engine-profile", nargs=2, help=argparse.SUPPRESS)  # MODE PRECISION: one engine profile (a subprocess)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/engine_gpu-cuda.json)")
    args = p.parse_args(argv)
    if args.hand:
        print(json.dumps(hand_loop(args.hand, args.steps, args.log_every, precision=args.precision, fused=args.fused,
                                   profile=args.profile_steps if args.profile is not None else 0)))
        return 0
    if args.engine_profile:  # one engine profile (a subprocess of this script)
        mode, precision = args.engine_profile
        print(json.dumps(engine_profile(mode, args.steps, args.profile_steps, precision, args.fused)))
        return 0
    import torch

    if not torch.cuda.is_available():
        print("engine_gpu.py needs CUDA", file=sys.stderr)
        return 2
    info = {"setting": SETTING, "precision": args.precision, "fused_adamw": args.fused, "steps": args.steps, "log_every": args.log_every, "skip": args.skip, "repeats": args.repeats,
            "device": torch.cuda.get_device_name(0), "cpu_cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "commit": clean_commit(), "source_digest": source_digest()}
    parts = [("profile", profiles, bool(args.profile)), ("modes", compare, bool(args.modes)), ("full_run", full_run, args.full_run),
             ("concurrent", concurrency, bool(args.concurrent)), ("rollout_vmf", rollout, args.rollout)]
    with tempfile.TemporaryDirectory() as d:
        for key, measure, wanted in parts:
            if not wanted:
                continue

            def save(partial, key=key):
                info[key] = partial
                write_result(info, args.out, "engine_gpu-cuda")

            if key == "concurrent":
                save(measure(args, Path(d), save))
            else:
                save(measure(args, Path(d)))  # after each part: a later failure keeps the earlier ones
    return 0


if __name__ == "__main__":
    sys.exit(main())
