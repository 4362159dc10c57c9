"""`engram-lm`: the general LM's components and the `engram lm` command.

Registered by engram-core's own entry point; the kernel never imports this package.
transformers and tokenizers are imported only when a component is built or a command runs,
so an install without the `lm` extra still lists every other plugin.
"""

from __future__ import annotations

import json
import sys

from ..hookspecs import hookimpl

SAMPLE_PROMPTS = ("import os\n", "def __init__(self", "class ", "    for i in range(", '"""Return the ')


@hookimpl
def engram_datasets(register):
    from .components import StdlibTextConfig, StdlibTextDataset

    register("stdlib_text", StdlibTextDataset, StdlibTextConfig, provides=("text_completion",))


@hookimpl
def engram_heads(register):
    from .components import PretrainedLMConfig, PretrainedLMHead

    register("pretrained_lm", PretrainedLMHead, PretrainedLMConfig, provides=("causal_lm",))


@hookimpl
def engram_metrics(register):
    from .components import (
        NgramPerplexity,
        NgramPerplexityConfig,
        Perplexity,
        PerplexityConfig,
        PretrainReport,
        PretrainReportConfig,
    )

    register("perplexity", Perplexity, PerplexityConfig, requires=("causal_lm",))
    register("pretrain_report", PretrainReport, PretrainReportConfig)
    register("ngram_perplexity", NgramPerplexity, NgramPerplexityConfig)


@hookimpl
def engram_commands(register):
    register("lm", _lm_command, help="pretrain the general LM made here (engram:stdlib-lm-cpu / -gpu) or sample from it")


def _lm_command(parser):
    sub = parser.add_subparsers(dest="lm_cmd", required=True)
    pp = sub.add_parser("pretrain", help="pretrain NAME into the cache (a hit if it is there) and print its report")
    ps = sub.add_parser("sample", help="greedy continuations of a few prompts (or --prompt)")
    for p in (pp, ps):
        p.add_argument("name", metavar="NAME", help="stdlib-lm-cpu or stdlib-lm-gpu (the 'engram:' prefix is optional)")
        p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")
    pp.add_argument("--json", action="store_true", help="print the whole pretrain_report.json")
    ps.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable; default: five code openings)")
    ps.add_argument("--tokens", type=int, default=40, help="new tokens per prompt (default 40)")
    return _lm


def _lm(args, console) -> int:
    from ..errors import ConfigError
    from . import PREFIX, resolve_model

    name = args.name if args.name.startswith(PREFIX) else PREFIX + args.name
    try:
        folder = resolve_model(name, device=args.device, key="NAME")
    except ConfigError as exc:
        print(f"error: engram lm {args.lm_cmd}: {exc}", file=sys.stderr)  # one line, never wrapped
        return 2
    if args.lm_cmd == "pretrain":
        report = json.loads((folder / "pretrain_report.json").read_text())
        if args.json:
            print(json.dumps(report, indent=2))
            return 0
        console.print(f"{name}: {folder}", markup=False)
        mfu = f"{report['mfu']:.1%}" if report.get("mfu") is not None else "n/a (CPU)"
        console.print(f"  {report['parameters'] / 1e6:.2f}M parameters, {report['tokens_seen']:,} tokens seen "
                      f"({report['epochs']:.2f} epochs of {report['train_tokens']:,})", markup=False)
        console.print(f"  on {report['device']}: {report['tokens_per_s']:,.0f} tokens/s, MFU {mfu}", markup=False)
        last = report["curve"][-1]
        best = min(report["curve"], key=lambda r: r["val_loss"])
        console.print(f"  val loss {best['val_loss']:.3f} at step {best['step']}, the weights kept "
                      f"(the last step's: {last['val_loss']:.3f} at step {last['step']})", markup=False)
        return 0
    for prompt, text in zip(args.prompt or SAMPLE_PROMPTS, greedy_samples(folder, args.prompt or SAMPLE_PROMPTS, args.tokens, args.device)):
        console.print(f"--- {prompt!r}\n{prompt}{text}", markup=False)
    return 0


def greedy_samples(folder, prompts, new_tokens: int, device=None) -> list[str]:
    """Greedy continuations (decoded text) of `prompts` by the model in `folder`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    from . import quiet_transformers

    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True).to(device).eval()
    out = []
    for prompt in prompts:
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]], device=device)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out
