"""Heads: `tiny_causal_lm` (the core's CausalTransformer, trained from scratch: the
offline default base model) and `hf_causal_lm` (a transformers causal LM from a local
directory). Both provide `causal_lm`, offer the `layer` attachment point, and take
optional LoRA adapters through peft.

What the plugin's objective, metrics and memories use from a head:
``forward(input_ids, attention_mask) -> logits``, ``generate(prompt_ids, max_new_tokens,
use_cache, eos_id)``, ``memory_dims() -> (width, vocab, layers)``, ``encode_text``,
``token_embeddings`` and ``token_texts`` (for canonical ids and pre-population).
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from engram_core.components import BuildContext, Head
from engram_core.config import ConfigError, field, in_range, non_negative, positive
from engram_core.nn import CausalTransformer, CausalTransformerConfig

from .data import TextCodec
from .hashing import byte_token_texts


def _lora_config(r: int, alpha: float, targets: list[str], dropout: float):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout, bias="none")


def inject_lora(module: nn.Module, r: int, alpha: float, targets: list[str], dropout: float = 0.0) -> nn.Module:
    """LoRA adapters (peft) on the Linear layers named by `targets`, in place. Parameter
    names gain ``lora_A``/``lora_B``; which of them train is the stage's business."""
    from peft import inject_adapter_in_model

    names = {n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ConfigError("lora_targets", f"no Linear layer named {missing[0]!r}; this model has: {', '.join(sorted(names))}")
    return inject_adapter_in_model(_lora_config(r, alpha, targets, dropout), module)


@attrs.frozen
class TinyCausalLMConfig:
    """A small GPT-style LM trained from scratch (the offline default base model)."""

    dim: int = field(128, help="model width", validator=positive)
    n_layers: int = field(4, help="decoder blocks", validator=positive)
    n_heads: int = field(4, help="attention heads (divide dim)", validator=positive)
    max_len: int = field(0, help="longest sequence; 0 = the data set's longest example", validator=non_negative)
    dropout: float = field(0.0, help="dropout", validator=in_range(0.0, 0.9))
    lora_r: int = field(0, help="LoRA rank (0 = no adapters)", validator=non_negative)
    lora_alpha: float = field(16.0, help="LoRA alpha", validator=positive)
    lora_targets: list[str] = field(factory=lambda: ["qkv", "proj"], help="names of the Linear layers that get LoRA adapters")


class TinyCausalLMHead(Head):
    """The core's CausalTransformer as a causal LM head. A `layer` memory runs after the
    decoder blocks it names (block hooks), seeing every id so far, KV cache or not."""

    def __init__(self, cfg: TinyCausalLMConfig, build: BuildContext):
        super().__init__()
        spec = build.spec
        self.codec = spec.codec
        max_len = cfg.max_len or int(spec.max_len) + 16
        if cfg.max_len and cfg.max_len < spec.max_len:
            raise ConfigError("max_len", f"must be >= the data set's longest example ({spec.max_len} tokens), got {cfg.max_len}")
        self.lm = CausalTransformer(
            CausalTransformerConfig(
                vocab_size=int(spec.vocab_size), dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, max_len=max_len, dropout=cfg.dropout
            )
        )
        if cfg.lora_r:
            inject_lora(self.lm, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets)
        self.lm.block_hooks.append(self._memory_hook)

    def _memory_hook(self, index, hidden, ids, positions):
        if self.memory_active:
            return self.memory.apply_layer(index, hidden, ids)
        return hidden

    def memory_dims(self):
        c = self.lm.cfg
        return c.dim, c.vocab_size, c.n_layers

    def token_texts(self):
        if self.codec.hf is None:
            return byte_token_texts(self.lm.cfg.vocab_size)
        from .hf import hf_token_texts

        return hf_token_texts(self.codec.hf, self.lm.cfg.vocab_size)

    def encode_text(self, text: str) -> torch.Tensor:
        return torch.tensor(self.codec.prompt_ids(text), dtype=torch.long, device=self.lm.tok.weight.device)

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.tok(ids)

    def forward(self, input_ids, attention_mask=None):
        logits, _ = self.lm(input_ids=input_ids, attention_mask=attention_mask)
        return logits

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens: int, use_cache: bool = True, eos_id: int | None = None, attention_mask=None):
        return self.lm.generate(prompt_ids, max_new_tokens, use_cache=use_cache, eos_id=eos_id, attention_mask=attention_mask)


@attrs.frozen
class HFCausalLMConfig:
    """A transformers causal LM loaded with from_pretrained from a local directory."""

    model_dir: str = field(help="local directory holding config.json and weights (no downloads), or 'engram:NAME' (engram_core.lm)")
    lora_r: int = field(0, help="LoRA rank (0 = no adapters)", validator=non_negative)
    lora_alpha: float = field(16.0, help="LoRA alpha", validator=positive)
    lora_targets: list[str] = field(factory=lambda: ["q_proj", "v_proj"], help="names of the Linear layers that get LoRA adapters")


class HFCausalLMHead(Head):
    """A local transformers causal LM (Llama, Qwen2, Mistral, ...). A `layer` memory is
    injected with forward hooks after the decoder layers it names (as `add_engram` does).
    The data set's tokenizer must fit the model's vocabulary ('byte' fits a model with
    vocab_size >= 259; otherwise give the data set the model's tokenizer directory)."""

    memory_reads_attention_mask = True  # the hooks hand the model's 2-D mask to the memory

    def __init__(self, cfg: HFCausalLMConfig, build: BuildContext):
        super().__init__()
        from .hf import decoder_layers, load_causal_lm

        self.cfg = cfg
        if build.dry_run and cfg.model_dir.startswith("engram:"):
            from engram_core.lm import skeleton_model

            # a check builds the shapes: the general LM is pretrained by the run, not by `engram validate`
            self.model = skeleton_model(cfg.model_dir)
        else:
            self.model = load_causal_lm(cfg.model_dir, cache_dir=build.cache_dir)
        spec = build.spec
        # the data set's tokenizer; a data set without one (engram_core.lm's stdlib_text) is read
        # with the model's own, which a checkpoint folder (and an engram: model) ships beside its weights
        self.codec = spec.get("codec") or TextCodec(cfg.model_dir, build.cache_dir)
        vocab = int(self.model.config.vocab_size)
        if int(spec.vocab_size) > vocab:
            raise ConfigError("model_dir", f"the data's tokenizer has {spec.vocab_size} ids but the model's vocabulary is {vocab}")
        self.n_layers = len(decoder_layers(self.model))
        if cfg.lora_r:
            inject_lora(self.model, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets)
        self._injector = None

    def attach_memory(self, memory, point):
        from .hf import HFInjector

        super().attach_memory(memory, point)
        self._injector = HFInjector(self.model, memory)

    def memory_dims(self):
        c = self.model.config
        return int(c.hidden_size), int(c.vocab_size), self.n_layers

    def token_texts(self):
        if self.codec.hf is None:
            return byte_token_texts(int(self.model.config.vocab_size))
        from .hf import hf_token_texts

        return hf_token_texts(self.codec.hf, int(self.model.config.vocab_size))

    def encode_text(self, text):
        return torch.tensor(self.codec.prompt_ids(text), dtype=torch.long, device=self.model.device)

    def token_embeddings(self, ids):
        return self.model.get_input_embeddings()(ids)

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens: int, use_cache: bool = True, eos_id: int | None = None, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(prompt_ids)
        out = self.model.generate(
            input_ids=prompt_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=use_cache,
            eos_token_id=eos_id,
            pad_token_id=self.codec.pad_id,
        )
        return out[:, prompt_ids.shape[1]:]
