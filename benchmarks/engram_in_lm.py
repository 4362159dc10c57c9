"""Cost of Engram memory inside a transformers LM: training step time and greedy decode speed.

A Qwen2-shaped model built from its config (random weights, nothing downloaded; the default
is Qwen2.5-0.5B's shape: hidden 896, 24 layers, 14 heads, 2 KV heads, intermediate 4864,
vocabulary 151,936, tied embeddings, ~494M parameters):

- training step (forward, backward, fused AdamW step) on a batch of 4 × 2048 tokens,
  without Engram and with `add_engram` after layers 1 and 12 (the whole model trains in
  both, so the difference is the memory's cost; the groups of `engram_param_groups`: the
  tables at 5× lr, no weight decay). `--tables` says how the tables train: `default` a
  row-wise optimiser (`--table-optimizer`, rowwise_adam) as built by default — on CUDA the
  tables make sparse row gradients and are updated inside the backward, never a dense
  table gradient; `dense` the same optimiser with `fused_backward=False` (a dense table
  gradient, the update at step()); `adamw` the tables in the fused AdamW with the rest
  (the figure before issue 28). Everything else is in fused AdamW in every case. The
  path that ran is printed and saved (`table_path`). The base is timed first, then the
  model with Engram; then, because the two figures drift between runs by more than the
  goal (an H100 gave −0.1 %, +3.5 % and +8.9 % for the same command), the model with
  Engram is timed again with its memory on and off (`enabled = False`: its hooks return at
  once, everything else identical) in `--alternations` alternating blocks (on off, off on,
  ...) of about `--steps` / `--alternations` steps each: `train.alternated`, the figure to quote;
- greedy decoding with the KV cache (`generate(use_cache=True)`), tokens/s, model in bf16,
  with the memory and without it (a copy of the model made before `add_engram`), the two
  alternated `--decode-repeats` times after one untimed generate of each (median, sd and
  every value); and whether cached equals uncached
  greedy tokens for a short continuation (the memory is non-zero after the training steps),
  with the scores that tell rounding from a bug where they differ (`cache_consistency`).

    python benchmarks/engram_in_lm.py --device cuda                     # the measurement (one H200: ~2 min)
    python benchmarks/engram_in_lm.py --device cuda --compile           # the same under torch.compile
    python benchmarks/engram_in_lm.py --device cuda --kernels torch     # without the fused Triton kernels
    python benchmarks/engram_in_lm.py --device cuda --profile-decode 32   # also where a decode step's time goes
    python benchmarks/engram_in_lm.py --device cuda --decode-cache static --steps 2 --warmup 1   # decoding with a StaticCache,
                                                                        # the step compiled by generate (CUDA graphs)
    OMP_NUM_THREADS=1 python benchmarks/engram_in_lm.py --tiny          # CPU smoke run (seconds)

`--compile` times `torch.compile(model)` for both: the base is compiled and run first,
then `add_engram` (which drops compiled graphs, so the memory is traced in; before issue
14's fix the old graph kept running and the memory never ran; `--recompile` wraps the model
with Engram in a new `torch.compile` instead). `memory_ran` in the JSON
says whether the tables changed over the training steps: it must be true for the
"with Engram" figure to mean anything. `--kernels` is the memory's `kernels` key (auto:
Triton on CUDA).

`--precision autocast` (default): fp32 parameters under bf16 autocast, as the engine's
`precision = "bf16"`; `bf16`: bf16 parameters. Prints a table and writes JSON to
benchmarks/results/engram_in_lm-<device>.json (--out to change).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_common, also when a test loads this file
from bench_common import add_lm_args, apply_tiny, cuda_kernels, write_result  # noqa: E402

TINY = dict(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128, vocab=512, batch=2, seq=64, engram_layers=[1, 2],
            memory_size=5000, slot_dim=8, steps=2, warmup=1, decode_batch=2, prompt=8, new_tokens=8, check_tokens=4)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_lm_args(p, memory_size=1_000_000, precisions=("autocast", "bf16", "fp32"), precision_help="training precision")
    p.add_argument("--decode-dtype", default="bf16", choices=["bf16", "fp32"], help="model dtype while decoding")
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens before decoding")
    p.add_argument("--new-tokens", type=int, default=256, help="greedy tokens decoded")
    p.add_argument("--check-tokens", type=int, default=32, help="tokens compared cached vs uncached")
    p.add_argument("--decode-cache", default="dynamic", choices=["dynamic", "static"],
                   help="the KV cache generate uses; static: transformers' StaticCache, whose decode step generate compiles on CUDA")
    p.add_argument("--profile-decode", type=int, default=0, metavar="TOKENS",
                   help="also profile a generate of TOKENS tokens of each model (torch.profiler): where a decode step's host and device time go")
    p.add_argument("--alternations", type=int, default=6,
                   help="blocks of training steps with the memory on and off, alternated (0: skip); each side gets about --steps steps")
    p.add_argument("--decode-repeats", type=int, default=5, help="timed generates of each model, alternated (after one untimed each)")
    p.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"], help="the memory's kernels (auto: Triton on CUDA)")
    p.add_argument("--compile", action="store_true", help="time torch.compile(model) instead of the eager model")
    p.add_argument("--recompile", action="store_true",
                   help="with --compile: wrap the model with Engram in a new torch.compile (as a user who adds the memory first would) "
                        "instead of calling the base's compiled wrapper again")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (inductor; eager or aot_eager for a quick CPU check)")
    p.add_argument("--tables", default="default", choices=["default", "dense", "adamw"],
                   help="how the tables train: default (row-wise, in backward on CUDA), dense (row-wise, dense gradient, at step), adamw")
    p.add_argument("--table-optimizer", default="rowwise_adam", choices=["rowwise_adam", "rowwise_adagrad"])
    p.add_argument("--no-decode", action="store_true", help="training steps only")
    p.add_argument("--tiny", action="store_true", help="a tiny model and batch (a CPU smoke run); explicit flags still win")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/engram_in_lm-<device>.json)")
    args = p.parse_args(argv)
    apply_tiny(args, argv, TINY)
    return args


def build(args, device):
    import transformers

    conf = transformers.Qwen2Config(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=max(4096, args.seq + 64),
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    torch.manual_seed(0)
    with device:  # initialised where it runs: 494M random parameters are slow to make on a CPU
        model = transformers.AutoModelForCausalLM.from_config(conf)
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    return model.to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_optimizer(groups, lr, device):
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True), True
    except (RuntimeError, TypeError):  # a device without the fused kernel
        return torch.optim.AdamW(groups, lr=lr), False


def engram_optimizers(model, args, device) -> tuple[list, dict]:
    """The optimisers of the model with Engram (`--tables`), and which table path runs."""
    from engram_llm_hash import engram_param_groups

    from engram_core.tables.rowwise import ROWWISE_OPTIMIZERS

    groups = engram_param_groups(model, lr=args.lr)
    if args.tables == "adamw":
        return groups, {"tables": "adamw", "table_gradient": "dense", "table_update": "at step()"}
    tables = [g for g in groups if g["name"] == "engram_tables"]
    rest = [g for g in groups if g["name"] != "engram_tables"]
    opt = ROWWISE_OPTIMIZERS[args.table_optimizer](tables, lr=args.lr, fused_backward="auto" if args.tables == "default" else False)
    table = next(iter(model.engram.blocks.values())).table
    path = {"tables": args.table_optimizer, "table_gradient": "rows (sparse)" if getattr(table, "row_gradients", False) else "dense",
            "table_update": "in backward" if opt.updates_in_backward else "at step()"}
    return [rest, opt], path


def training_batch(args, device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g).to(device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "autocast" else contextlib.nullcontext()
    return ids, amp


def train_steps(run, opts, ids, amp, n: int, device) -> tuple[list[float], list[float]]:
    """`n` training steps of `run` (ms each, losses)."""
    times, losses = [], []
    for _ in range(n):
        sync(device)
        t = time.perf_counter()
        with amp:
            # no KV cache in training (as Trainer and the engine's heads): under torch.compile a cache made
            # each forward guards every layer's frame on its lazily built cache layer, and the
            # graph breaks at the memory's table reads split the model into per-layer frames,
            # which recompile past dynamo's limit and run eagerly (H100, 2026-12-06)
            loss = run(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(1000 * (time.perf_counter() - t))
        losses.append(float(loss.detach()))
    return times, losses


def summary(times: list[float], args) -> dict:
    return {"step_ms_mean": statistics.mean(times), "step_ms_sd": statistics.stdev(times) if len(times) > 1 else 0.0,
            "step_ms": times, "tokens_per_s": args.batch * args.seq / (statistics.mean(times) / 1000)}


def time_training(model, groups, args, device, run=None) -> dict:
    """`run`: what is called (the compiled model under --compile), `model` what it wraps.
    `groups`: AdamW's parameter groups, or a list of them and built optimisers."""
    run = model if run is None else run
    opts, fused = optimizers_of(groups, args, device)
    ids, amp = training_batch(args, device)
    model.train()
    train_steps(run, opts, ids, amp, args.warmup, device)
    times, losses = train_steps(run, opts, ids, amp, args.steps, device)
    del opts
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {**summary(times, args), "fused_adamw": fused, "last_loss": losses[-1], "peak_gib": peak}


def optimizers_of(groups, args, device) -> tuple[list, bool | None]:
    parts = groups if groups and isinstance(groups[-1], torch.optim.Optimizer) else [groups]
    opts, fused = [], None
    for part in parts:
        if isinstance(part, torch.optim.Optimizer):
            opts.append(part)
        else:
            adamw, fused = make_optimizer(part, args.lr, device)
            opts.append(adamw)
    return opts, fused


def time_alternated(model, groups, args, device, run) -> dict:
    """The model with Engram timed with its memory on and off in alternating blocks
    (on off, off on, ...), one untimed step of each first; the same model, optimisers
    and batch, so the difference is the memory's work. Step time per side as the mean
    over its steps, and the ratio of the two medians of block means (robust to a slow
    block)."""
    memory = model.engram
    opts, _ = optimizers_of(groups, args, device)
    ids, amp = training_batch(args, device)
    model.train()
    per_block = max(1, round(args.steps / args.alternations))
    blocks: dict[str, list[float]] = {"memory_on": [], "memory_off": []}
    times: dict[str, list[float]] = {"memory_on": [], "memory_off": []}
    try:
        for on in (True, False):  # the off path's first step (under compile: its own graph)
            memory.enabled = on
            train_steps(run, opts, ids, amp, 1, device)
        for r in range(args.alternations):
            for name in (("memory_on", "memory_off") if r % 2 == 0 else ("memory_off", "memory_on")):
                memory.enabled = name == "memory_on"
                ms, _ = train_steps(run, opts, ids, amp, per_block, device)
                times[name] += ms
                blocks[name].append(statistics.mean(ms))
    finally:
        memory.enabled = True
    out = {name: {**summary(t, args), "block_means_ms": blocks[name]} for name, t in times.items()}
    out["overhead"] = statistics.median(blocks["memory_on"]) / statistics.median(blocks["memory_off"]) - 1
    out["blocks"], out["steps_per_block"] = args.alternations, per_block
    return out


DECODE_OPTS = dict(do_sample=False, pad_token_id=2)


def decode_opts(args) -> dict:
    """generate's options: greedy, and the KV cache asked for (`--decode-cache static`:
    transformers then compiles the decode step itself on CUDA, mode "reduce-overhead",
    i.e. CUDA graphs; the memory's bookkeeping runs eagerly before it, hf.HFInjector)."""
    return {**DECODE_OPTS, **({"cache_implementation": "static"} if args.decode_cache == "static" else {})}


def decode_prompt(args, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randint(3, args.vocab, (args.decode_batch, args.prompt), generator=g).to(device)


@torch.no_grad()
def decode_once(model, prompt, args, device) -> float:
    """Seconds of one greedy generate of `new_tokens` tokens with the KV cache."""
    sync(device)
    t = time.perf_counter()
    out = model.generate(input_ids=prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, use_cache=True,
                         **decode_opts(args))
    sync(device)
    assert out.shape[1] - prompt.shape[1] == args.new_tokens
    return time.perf_counter() - t


@torch.no_grad()
def time_decodes(models: dict, args, device) -> dict:
    """Greedy decoding of each model, alternated (A B, B A, ...) `decode_repeats` times after
    one untimed generate of each (a process's first generate is slow whichever model runs it);
    tokens/s as the median over the repeats, with the sd and every value."""
    prompt = decode_prompt(args, device)
    for m in models.values():
        m.eval()
        # warm-up, dropped; a static cache is sized by the generate's length, so its warm-up
        # (which compiles the step on CUDA) has the timed length
        n = args.new_tokens if args.decode_cache == "static" else 4
        m.generate(input_ids=prompt, max_new_tokens=n, min_new_tokens=n, use_cache=True, **decode_opts(args))
    seconds: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for r in range(args.decode_repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            seconds[name].append(decode_once(models[name], prompt, args, device))
    out = {}
    for name, secs in seconds.items():
        rates = [args.decode_batch * args.new_tokens / s for s in secs]
        out[name] = {"tokens_per_s": statistics.median(rates), "tokens_per_s_sd": statistics.stdev(rates) if len(rates) > 1 else 0.0,
                     "tokens_per_s_each": [round(x, 2) for x in rates], "ms_per_token": 1000 * statistics.median(secs) / args.new_tokens,
                     "new_tokens": args.new_tokens}
    return out


@torch.no_grad()
def profile_decode(model, args, device, top: int = 20) -> dict:
    """One generate of `--profile-decode` tokens under torch.profiler: per new token, the
    host time and calls of the operators with the most host self time, the device kernels
    with the most device time, and the number of kernel launches — what tells a launch- or
    host-bound step from a device-bound one."""
    from torch.profiler import ProfilerActivity, profile

    prompt = decode_prompt(args, device)
    n = args.profile_decode
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        model.generate(input_ids=prompt, max_new_tokens=n, min_new_tokens=n, use_cache=True, **decode_opts(args))
        sync(device)
    averages = prof.key_averages()
    per = lambda v: v / n  # noqa: E731
    host = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    out = {"tokens": n, "host_ops": [{"name": e.key, "self_cpu_ms_per_token": per(e.self_cpu_time_total) / 1e3, "calls_per_token": per(e.count)} for e in host]}
    if device.type == "cuda":
        kernels = cuda_kernels(averages)
        out["device_ms_per_token"] = per(sum(e.self_device_time_total for e in kernels)) / 1e3
        out["kernels_per_token"] = per(sum(e.count for e in kernels))
        out["device_kernels"] = [{"name": e.key[:120], "device_ms_per_token": per(e.self_device_time_total) / 1e3, "calls_per_token": per(e.count)}
                                 for e in sorted(kernels, key=lambda e: e.self_device_time_total, reverse=True)[:top]]
    return out


@torch.no_grad()
def cache_consistency(model, prompt, n: int, opts: dict) -> dict:
    """Cached vs uncached greedy decoding, token by token, with the scores that explain a difference.

    While the two runs agree they score the same prefix, so `max_score_diff` (largest
    |logit difference| over those steps) is the numerical noise between the two code paths
    (one-token KV-cache steps vs whole-sequence forwards). Where they first differ,
    `margin_at_divergence` is the uncached run's gap between its top two logits: a gap
    below the noise is a near tie decided by rounding; a gap far above it is a bug."""
    runs = {}
    for use_cache in (True, False):
        out = model.generate(input_ids=prompt, max_new_tokens=n, min_new_tokens=n, use_cache=use_cache,
                             output_scores=True, return_dict_in_generate=True,
                             **{k: v for k, v in opts.items() if use_cache or k != "cache_implementation"})
        runs[use_cache] = (out.sequences[:, prompt.shape[1]:], torch.stack(out.scores, 1).float())  # (B, n), (B, n, V)
    (tok_c, sc_c), (tok_u, sc_u) = runs[True], runs[False]
    same = (tok_c == tok_u).all(0)  # (n,) every batch row agrees at that step
    first = int((~same).nonzero()[0]) if not bool(same.all()) else n
    agreed = slice(0, first + 1)  # the divergent step still scores an agreed prefix
    a, b = sc_c[:, agreed], sc_u[:, agreed]
    diff = (a - b).abs()[torch.isfinite(a) & torch.isfinite(b)]  # min_new_tokens sets the EOS score to -inf in both
    result = {"cached_equals_uncached": first == n, "check_tokens": n, "first_divergence": None if first == n else first,
              "max_score_diff": float(diff.max()) if diff.numel() else 0.0}
    if first < n:
        top2 = sc_u[:, first].topk(2, dim=-1).values
        result["margin_at_divergence"] = float((top2[:, 0] - top2[:, 1]).min())
    return result


def main(argv=None) -> dict:
    from engram_llm_hash import add_engram

    args = parse(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    model = build(args, device)
    base_for_decode = None if args.no_decode else copy.deepcopy(model)  # the same weights, never given a memory
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Qwen2-shaped model: {n_params / 1e6:.1f}M parameters, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; "
          f"train batch {args.batch}x{args.seq}, {args.precision}, device {device}, "
          f"{'compiled (' + args.compile_backend + ')' if args.compile else 'eager'}, kernels {args.kernels}", flush=True)

    run = torch.compile(model, backend=args.compile_backend) if args.compile else model
    base_train = time_training(model, [p for p in model.parameters()], args, device, run)
    print(f"  train without Engram: {base_train['step_ms_mean']:.1f} ± {base_train['step_ms_sd']:.1f} ms/step", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    add_engram(model, memory_size=args.memory_size, inject_layers=args.engram_layers, freeze_base=False,
               slot_dim=args.slot_dim, heads_per_order=args.heads_per_order, kernels=args.kernels)
    if args.compile and args.recompile:
        run = torch.compile(model, backend=args.compile_backend)
    n_memory = sum(p.numel() for p in model.engram.parameters())
    tables_before = [b.table.weight.detach().clone() for b in model.engram.blocks.values()]
    optimizers, table_path = engram_optimizers(model, args, device)
    print(f"  tables: {table_path['tables']}, {table_path['table_gradient']} gradient, updated {table_path['table_update']}", flush=True)
    engram_train = time_training(model, optimizers, args, device, run)
    engram_train["table_path"] = table_path
    engram_train["tables_changed"] = {name: not torch.equal(a, b.table.weight) for a, (name, b) in zip(tables_before, model.engram.blocks.items())}
    engram_train["memory_ran"] = all(engram_train["tables_changed"].values())
    del tables_before
    if not engram_train["memory_ran"]:
        print(f"  WARNING: not every table changed (by layer: {engram_train['tables_changed']}): the memory did not run", flush=True)
    print(f"  train with Engram after layers {args.engram_layers}: {engram_train['step_ms_mean']:.1f} ± {engram_train['step_ms_sd']:.1f} ms/step", flush=True)
    alternated = None
    if args.alternations > 0:
        alternated = time_alternated(model, optimizers, args, device, run)
        on, off = alternated["memory_on"], alternated["memory_off"]
        print(f"  alternated ({args.alternations} blocks of {alternated['steps_per_block']} steps): memory on {on['step_ms_mean']:.1f} ± "
              f"{on['step_ms_sd']:.1f}, off {off['step_ms_mean']:.1f} ± {off['step_ms_sd']:.1f} ms/step, "
              f"overhead {100 * alternated['overhead']:+.1f} % (medians of block means)", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    decode_dtype = torch.bfloat16 if args.decode_dtype == "bf16" else torch.float32
    model.to(decode_dtype)  # the memory follows the model
    if args.no_decode:
        engram_decode = base_decode = None
    else:  # the two models alternated; with --decode-cache static generate compiles the step on CUDA
        timed = time_decodes({"with_engram": model, "without_engram": base_for_decode.to(decode_dtype)}, args, device)
        engram_decode, base_decode = timed["with_engram"], timed["without_engram"]
        engram_decode.update(cache_consistency(model, decode_prompt(args, device), args.check_tokens, decode_opts(args)))
        engram_decode["cache"] = base_decode["cache"] = args.decode_cache
        if args.profile_decode:
            for name, m, d in (("with engram", model, engram_decode), ("without engram", base_for_decode, base_decode)):
                d["profile"] = profile_decode(m, args, device)
                prof = d["profile"]
                line = f"  profile, {name}: per token " + (f"{prof['kernels_per_token']:.0f} kernels, {prof['device_ms_per_token']:.2f} ms of device time; "
                                                           if "kernels_per_token" in prof else "")
                print(line + "most host time: " + ", ".join(f"{o['name']} {o['self_cpu_ms_per_token']:.2f} ms" for o in prof["host_ops"][:6]), flush=True)
        for name, d in timed.items():
            print(f"  greedy decode {name.replace('_', ' ')}: {d['tokens_per_s']:.1f} ± {d['tokens_per_s_sd']:.1f} tokens/s "
                  f"(median of {args.decode_repeats}, alternated)", flush=True)

    import transformers

    info = {
        "benchmark": "engram_in_lm",
        "command": "python benchmarks/engram_in_lm.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "model_params": n_params,
        "memory_params": n_memory,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "train": {"without_engram": base_train, "with_engram": engram_train,
                  "overhead": engram_train["step_ms_mean"] / base_train["step_ms_mean"] - 1, "alternated": alternated},
        "decode": None if base_decode is None else {
            "without_engram": base_decode, "with_engram": engram_decode,
            "slowdown": 1 - engram_decode["tokens_per_s"] / base_decode["tokens_per_s"]},
    }
    decode = "" if base_decode is None else f", decode slowdown {100 * info['decode']['slowdown']:+.1f} %"
    print(f"  train overhead {100 * info['train']['overhead']:+.1f} %{decode}")
    tag = ("-compiled" if args.compile else "") + ("-static" if args.decode_cache == "static" else "") + (f"-{args.kernels}" if args.kernels != "auto" else "") + (
        f"-tables-{args.tables}" if args.tables != "default" else "") + ("-tiny" if args.tiny else "")
    write_result(info, args.out, f"engram_in_lm-{device.type}{tag}")
    return info


if __name__ == "__main__":
    main()
