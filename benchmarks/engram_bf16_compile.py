"""Why the compiled memory's gradients differ from eager under bf16 autocast (issue 28).

A Qwen2-shaped model at toy width (14 layers, Qwen2's vocabulary, tied embeddings, GQA) with
Engram memory after layers 1 and 12 (10^6 rows), as `test_gpu_compiled_equals_eager_inductor_bf16`
builds it, trained one step three ways: eager fp32 (the reference), eager under bf16
autocast, and `torch.compile` (inductor) under bf16 autocast. For every gradient (and the
logits) it prints the relative distance of each bf16 run to fp32 and between the two bf16
runs, for:

* `signed_sqrt`: the memory as shipped (the context gate's signed square root of its score);
* `plain_score`: `gate_signed_sqrt = false` (the score itself);
* `no_memory`: the base model alone (the control: what inductor's bf16 rounding does without
  the memory).

    python benchmarks/engram_bf16_compile.py [--layers 14] [--rows 1e6] [--device auto]

Prints and saves JSON to benchmarks/results/engram_bf16_compile-<device>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import write_result  # noqa: E402


def qwen2(layers: int, vocab: int, device: str):
    import transformers

    conf = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(conf).to(device)


def one_step(model, ids, amp: bool, owner=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    owner = owner or model
    for p in owner.parameters():
        p.grad = None
    ctx = torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=amp)
    with ctx:
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach().float(), {n: p.grad.detach().float().clone() for n, p in owner.named_parameters() if p.grad is not None}


def rel(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def variant(name: str, args, device: str) -> dict:
    from engram_llm_hash import add_engram

    model = qwen2(args.layers, args.vocab, device)
    if name != "no_memory":
        add_engram(model, memory_size=int(args.rows), inject_layers=[1, min(12, args.layers - 1)], freeze_base=False, slot_dim=64,
                   heads_per_order=8, gate_signed_sqrt=name == "signed_sqrt", fuse="off")  # eager means eager
        with torch.no_grad():  # a memory that visibly changes the output (as the test's open_memory)
            for block in model.engram.blocks.values():
                block.value_proj.weight.normal_(std=0.5)
                block.conv.weight.normal_(std=0.3)
    ids = torch.randint(3, args.vocab, (2, 256), generator=torch.Generator().manual_seed(0)).to(device)
    fp32 = one_step(model, ids, amp=False)
    eager = one_step(model, ids, amp=True)
    t0 = time.perf_counter()
    torch.compiler.reset()
    compiled = one_step(torch.compile(model), ids, amp=True, owner=model)
    compile_s = time.perf_counter() - t0
    rows = {"logits": (fp32[0], eager[0], compiled[0])} | {n: (fp32[1][n], eager[1][n], compiled[1][n]) for n in fp32[1]}
    tensors = {
        n: {"eager_bf16_vs_fp32": rel(r, e), "compiled_bf16_vs_fp32": rel(r, c), "compiled_vs_eager_bf16": rel(e, c)}
        for n, (r, e, c) in rows.items()
    }
    ratio = {n: t["compiled_bf16_vs_fp32"] / max(t["eager_bf16_vs_fp32"], 1e-3) for n, t in tensors.items()}
    memory = [n for n in tensors if n.startswith("engram.")]
    worst = max(ratio, key=ratio.get)
    summary = {
        "compile_and_step_s": round(compile_s, 1),
        "max_compiled_vs_eager_bf16": max(t["compiled_vs_eager_bf16"] for t in tensors.values()),
        "max_eager_bf16_vs_fp32": max(t["eager_bf16_vs_fp32"] for t in tensors.values()),
        "table_eager_bf16_vs_fp32": max((tensors[n]["eager_bf16_vs_fp32"] for n in memory if n.endswith("table.weight")), default=None),
        "table_compiled_vs_eager_bf16": max((tensors[n]["compiled_vs_eager_bf16"] for n in memory if n.endswith("table.weight")), default=None),
        "worst_ratio_compiled_to_eager_distance_from_fp32": [worst, ratio[worst]],
    }
    print(f"{name:>12}: compiled vs eager bf16 max {summary['max_compiled_vs_eager_bf16']:.3g}; eager bf16 vs fp32 max "
          f"{summary['max_eager_bf16_vs_fp32']:.3g}; tables: eager bf16 vs fp32 {summary['table_eager_bf16_vs_fp32']}, compiled vs "
          f"eager {summary['table_compiled_vs_eager_bf16']}; worst (compiled vs fp32)/(eager vs fp32) {ratio[worst]:.2f} ({worst})",
          flush=True)
    return {"summary": summary, "tensors": tensors}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=14)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--rows", type=float, default=1e6)
    p.add_argument("--device", default="auto")
    p.add_argument("--variants", default="signed_sqrt,plain_score,no_memory")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    info = {"benchmark": "engram_bf16_compile", "command": "python benchmarks/engram_bf16_compile.py " + " ".join(argv or sys.argv[1:]),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "layers": args.layers, "vocab": args.vocab, "rows": int(args.rows), "variants": {}}
    for name in args.variants.split(","):
        info["variants"][name] = variant(name, args, device)
    write_result(info, args.out, f"engram_bf16_compile-{device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
