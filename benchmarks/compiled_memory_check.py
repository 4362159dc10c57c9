"""Does the Engram memory run and train inside a `torch.compile`d training step on this machine?

A tiny Qwen2-shaped model with Engram after layers 1 and 2, one compiled forward + backward
under bf16 autocast (and one row-wise optimiser step with `--rowwise`), with every step of
the memory's path recorded: the injector's layer hook (its `live` count, whether the
memory is enabled), each memory block's output, any table read inside the compiled forward
(`read_rows_eagerly`, the graph break a row-gradient read made there before the injector
read such tables ahead), which gradient each table received, and whether the tables changed.

Why: on an H100 (torch 2.11, transformers 5.17) `engram_in_lm.py --compile` trained the
model with its tables updated in backward by a row-wise optimiser, and neither table
changed (`memory_ran: false`), while the same step eager, or compiled without a row-wise
optimiser, trains them; on the CPU (torch 2.13) every variant trains them. The reads that
broke the graph inside each decoder layer's hook are now made ahead of the compiled forward
(`EngramBlock.read_ahead`). This script checks it on the next GPU lease (seconds a variant):

    python benchmarks/compiled_memory_check.py --device cuda --rowwise      # the failing case
    python benchmarks/compiled_memory_check.py --device cuda                 # dense table gradient
    python benchmarks/compiled_memory_check.py --device cuda --rowwise --backend eager
    python benchmarks/compiled_memory_check.py --device cpu --rowwise        # the same torch on the CPU

Prints one line and writes JSON (`--out`); exits 1 when the tables did not change.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from bench_common import write_result  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="inductor", help="torch.compile backend; 'none' runs eagerly")
    p.add_argument("--rowwise", action="store_true", help="a RowwiseAdam holds the tables and updates them in backward")
    p.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--nested-graph-breaks", action="store_true", help="set torch._dynamo.config.nested_graph_breaks")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    import transformers
    from engram_llm_hash import add_engram, blocks, hf

    import engram_core.tables.device_rows as device_rows

    if args.nested_graph_breaks:
        torch._dynamo.config.nested_graph_breaks = True
    seen: list = []
    # record each step of the memory's path (patched before add_engram binds the hooks)
    layer_hook = hf.HFInjector._layer_hook

    def spy_layer_hook(self, layer, module, hook_args, kwargs, output):
        seen.append(["layer hook", layer, self.live, bool(self.active().enabled)])
        return layer_hook(self, layer, module, hook_args, kwargs, output)

    block_forward = blocks.EngramBlock.forward

    def spy_block_forward(self, *a, **k):
        out = block_forward(self, *a, **k)
        seen.append(["block output", list(out.shape), bool(out.requires_grad)])
        return out

    eager_read = device_rows.read_rows_eagerly

    @torch.compiler.disable
    def spy_eager_read(rows, weight):
        out = eager_read(rows, weight)
        seen.append(["eager table read", list(rows.shape), bool(out.requires_grad)])
        return out

    hf.HFInjector._layer_hook = spy_layer_hook
    blocks.EngramBlock.forward = spy_block_forward
    device_rows.read_rows_eagerly = spy_eager_read
    try:

        device = torch.device(args.device)
        cfg = transformers.Qwen2Config(vocab_size=2048, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg).to(device)
        add_engram(model, memory_size=100_000, inject_layers=[1, 2], freeze_base=False, slot_dim=16, kernels=args.kernels)
        model.to(device)
        tables = [b.table.weight for b in model.engram.blocks.values()]
        if args.rowwise:
            from engram_core.tables.rowwise import RowwiseAdam

            optimizer = RowwiseAdam(tables, lr=1e-3, fused_backward=True)
        else:  # a dense table gradient, applied at step()
            optimizer = torch.optim.SGD(tables, lr=1.0)
        gradients: list[str] = []
        for w in tables:
            w.register_hook(lambda g: gradients.append(str(g.layout)))
        before = [w.detach().clone() for w in tables]
        ids = torch.randint(3, 2048, (2, 128), generator=torch.Generator().manual_seed(1)).to(device)
        run = model if args.backend == "none" else torch.compile(model, backend=args.backend)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = run(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
    finally:  # the library as it was (the smoke test runs this in the test process)
        hf.HFInjector._layer_hook, blocks.EngramBlock.forward, device_rows.read_rows_eagerly = layer_hook, block_forward, eager_read
        torch.compiler.reset()
    changed = [not torch.equal(a, w) for a, w in zip(before, tables)]
    info = {
        "benchmark": "compiled_memory_check", "command": "python " + " ".join(sys.argv), "device": str(device),
        "torch": torch.__version__, "transformers": transformers.__version__, "config": vars(args),
        "seen": seen, "table_gradients": gradients, "tables_changed": changed, "loss": float(loss),
    }
    print(f"{device} backend={args.backend} rowwise={args.rowwise} torch {torch.__version__}: path {seen}; "
          f"table gradients {gradients}; tables changed {changed}", flush=True)
    write_result(info, args.out, f"compiled_memory_check-{device.type}")
    return 0 if all(changed) else 1


if __name__ == "__main__":
    sys.exit(main())
