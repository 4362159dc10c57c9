"""Pretrain a small general causal LM (a transformers Llama) on the standard-library corpus.

The loop is nanoGPT's: random windows of the train stream, AdamW, linear warm-up then cosine
decay, gradient clipping, bf16 autocast on CUDA, the validation loss every `eval_every`
steps; the weights kept are those of the lowest validation loss (early stopping on
validation, as `load_best_model_at_end` in transformers' Trainer). The result is what a
downloaded checkpoint is — a folder written by `save_pretrained` (weights, config,
tokenizer) that `AutoModelForCausalLM.from_pretrained` loads — plus `pretrain_report.json`
(the validation curve, tokens/s, MFU on CUDA). It is one cache entry (plugin "lm", kind
"general_lm") keyed by the full `PretrainConfig`, the seed, the tokenised corpus's key and
this module's source: the same config never trains twice.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import attrs
import torch

from .. import cache
from ..config import field, in_range, non_negative, positive
from . import tokens as tokens_module
from .tokens import TokensConfig, load_tokens

VERSION = 1

# bf16 dense peak FLOP/s per GPU, for MFU (the PaLM formula: 6 N + 12 L d T per token)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


@attrs.frozen
class PretrainConfig:
    """The model (a transformers LlamaConfig), its tokenised corpus and the training run."""

    tokens: TokensConfig = field(factory=TokensConfig, help="corpus and BPE vocabulary")
    hidden: int = field(128, help="model width", validator=positive)
    layers: int = field(4, help="decoder layers", validator=positive)
    heads: int = field(4, help="attention heads", validator=positive)
    kv_heads: int = field(2, help="key/value heads (grouped-query attention)", validator=positive)
    intermediate: int = field(352, help="MLP width", validator=positive)
    context: int = field(128, help="training window, tokens", validator=positive)
    steps: int = field(1500, help="optimiser steps", validator=positive)
    batch_size: int = field(16, help="windows per step", validator=positive)
    lr: float = field(3e-3, help="peak learning rate", validator=positive)
    warmup_steps: int = field(50, help="linear warm-up", validator=non_negative)
    min_lr_ratio: float = field(0.1, help="cosine decays to lr * this", validator=in_range(0.0, 1.0))
    weight_decay: float = field(0.1, help="AdamW, matrices only", validator=non_negative)
    eval_every: int = field(250, help="validation loss every this many steps", validator=positive)
    eval_windows: int = field(64, help="validation windows per evaluation (fixed, evenly spaced)", validator=positive)
    seed: int = field(0, help="initialisation and batch order")


# Named sizes, like hub checkpoints. Steps were chosen on the validation curve
# (pretrain_report.json), never on the test split: docs/results/general-lm.md.
SIZES: dict[str, PretrainConfig] = {
    # about 1M parameters: a few minutes on 2 CPU cores (tests and default recipes)
    "stdlib-lm-cpu": PretrainConfig(),
    # about 30M parameters on about 3x the text (the test suites too), bf16 on one GPU (2000
    # steps took 61 s on an H100). 1000 x 32 x 512 tokens are 7 epochs of it: a 2000-step schedule reached its
    # lowest validation loss at step 750 (5 epochs) and over-fitted after it (3.10 -> 3.90 at 2000)
    "stdlib-lm-gpu": PretrainConfig(
        tokens=TokensConfig(vocab_size=8192, corpus=tokens_module.CorpusConfig(include_tests=True)),
        hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1408, context=512,
        steps=1000, batch_size=32, lr=1e-3, warmup_steps=100, eval_every=125, eval_windows=256,
    ),
}


def llama_config(cfg: PretrainConfig):
    """The model's transformers config. The BPE trainer gives the special tokens the first ids
    in the order of `tokens.SPECIALS`: <pad> 0, <s> 1, </s> 2."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.tokens.vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
        max_position_embeddings=max(2048, 2 * cfg.context), tie_word_embeddings=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )


def windows(stream: torch.Tensor, starts: torch.Tensor, length: int) -> torch.Tensor:
    """(len(starts), length) windows of `stream`."""
    return stream[starts[:, None] + torch.arange(length)[None, :]]


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


@torch.no_grad()
def mean_loss(model, stream: torch.Tensor, cfg: PretrainConfig, device, autocast) -> float:
    """Mean next-token loss over `eval_windows` evenly spaced windows of `stream`."""
    model.eval()
    n = cfg.eval_windows
    starts = torch.linspace(0, len(stream) - cfg.context - 1, n).long()
    total = 0.0
    for chunk in starts.split(32):
        x = windows(stream, chunk, cfg.context + 1).to(device)
        with autocast():
            total += model(input_ids=x, labels=x).loss.float().item() * len(chunk)
    model.train()
    return total / n


def pretrain(cfg: PretrainConfig, corpus, device: torch.device, log=print):
    """Train the model; return (model, report)."""
    from transformers import AutoModelForCausalLM

    tok = corpus.tokenizer
    if (len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) != (cfg.tokens.vocab_size, 0, 1, 2):
        raise RuntimeError(f"the tokenizer has {len(tok)} ids and specials {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}; "
                           f"the model expects {cfg.tokens.vocab_size} and (0, 1, 2)")
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(llama_config(cfg)).to(device)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": cfg.weight_decay}, {"params": others, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    cuda = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else (lambda: torch.autocast("cpu", enabled=False))
    train, val = corpus.streams["train"], corpus.streams["val"]
    gen = torch.Generator().manual_seed(cfg.seed)
    curve = [{"step": 0, "val_loss": mean_loss(model, val, cfg, device, autocast)}]
    best = BestWeights(model, curve[0])
    log(f"pretrain: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {len(train):,} train tokens, "
        f"{cfg.steps} steps x {cfg.batch_size} x {cfg.context} tokens on {device.type}; val loss {curve[0]['val_loss']:.3f}")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0, train_seconds = time.perf_counter(), 0.0
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        x = windows(train, torch.randint(0, len(train) - cfg.context - 1, (cfg.batch_size,), generator=gen), cfg.context + 1)
        with autocast():
            loss = model(input_ids=x.to(device, non_blocking=True), labels=x.to(device, non_blocking=True)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            sync()
            train_seconds += time.perf_counter() - t0
            curve.append({"step": step + 1, "train_loss": loss.item(), "val_loss": mean_loss(model, val, cfg, device, autocast)})
            log(f"pretrain: step {step + 1}/{cfg.steps}  train loss {curve[-1]['train_loss']:.3f}  val loss {curve[-1]['val_loss']:.3f}")
            best.offer(model, curve[-1])
            t0 = time.perf_counter()
    if best.step != curve[-1]["step"]:
        best.restore(model)
        log(f"pretrain: kept the weights of step {best.step} (lowest val loss {best.val_loss:.3f}; {curve[-1]['val_loss']:.3f} at the last step)")
    return model, _report(cfg, model, corpus, device, curve, train_seconds)


class BestWeights:
    """The weights at the lowest validation loss seen so far, copied to host memory (the
    model may be larger than what the device can hold twice)."""

    def __init__(self, model, point: dict):
        self.step, self.val_loss, self.state = None, math.inf, None
        self.offer(model, point)

    def offer(self, model, point: dict) -> None:
        if point["val_loss"] < self.val_loss:
            self.step, self.val_loss = point["step"], point["val_loss"]
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def restore(self, model) -> None:
        model.load_state_dict(self.state)


def _report(cfg, model, corpus, device, curve, seconds) -> dict:
    n_params = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    tokens_per_s = cfg.steps * cfg.batch_size * cfg.context / max(seconds, 1e-9)
    # tied embeddings: the output projection's matmul is the embedding's 6 V d per token
    flops_per_token = 6 * n_params + 12 * cfg.layers * cfg.hidden * cfg.context
    mfu = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        mfu = flops_per_token * tokens_per_s / peak if peak else None
    return {
        "parameters": n_params, "embedding_parameters": n_embed, "train_tokens": int(len(corpus.streams["train"])),
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.context, "epochs": cfg.steps * cfg.batch_size * cfg.context / len(corpus.streams["train"]),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "train_seconds": seconds, "tokens_per_s": tokens_per_s, "flops_per_token": flops_per_token, "mfu": mfu,
        # the saved weights are those of best_val_step (BestWeights)
        "best_val_step": min(curve, key=lambda r: r["val_loss"])["step"], "curve": curve,
    }


def cache_entry(cfg: PretrainConfig, cache_dir) -> cache.Entry:
    return cache.entry(cache_dir, plugin="lm", kind="general_lm", config=cfg, seed=cfg.seed, version=VERSION,
                       builder=[pretrain, BestWeights, mean_loss, windows, lr_at, llama_config, _report], ext="hf",
                       inputs={"tokens": tokens_module.cache_entry(cfg.tokens, cache_dir).key})


def pretrained_folder(cfg: PretrainConfig, cache_dir, device: torch.device | str | None = None, log=print) -> Path:
    """The cached model folder for `cfg`, pretrained first if it is not there. Caching off
    (`cache_dir` None) is refused: the folder is what the caller loads from."""
    if cache_dir is None:
        raise ValueError("a pretrained model needs a cache folder (ENGRAM_CACHE)")
    e = cache_entry(cfg, cache_dir)
    if e.exists():
        cache.log(f"hit {e.label}")
        return e.path
    corpus = load_tokens(cfg.tokens, cache_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def save(value, folder: Path) -> None:
        from . import quiet_transformers

        model, report = value
        with quiet_transformers():  # one cache line, not a progress bar per shard
            model.to("cpu").save_pretrained(str(folder))
        corpus.tokenizer.save_pretrained(str(folder))
        (folder / "pretrain_report.json").write_text(json.dumps(report, indent=2) + "\n")

    cache.load_or_build(e, lambda: pretrain(cfg, corpus, device, log), save_fn=save, load_fn=lambda p: p)
    return e.path
