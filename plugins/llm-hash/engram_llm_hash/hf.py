"""Engram memory inside any transformers causal LM (Llama, Qwen2, Mistral, ...).

    model = AutoModelForCausalLM.from_pretrained(local_dir)
    model = add_engram(model, memory_size=100_000, inject_layers=[0, 1], gate_type="context")
    ...train model.engram...
    model.save_engram("engram_weights/")      # only the memory's parameters
    model.load_engram("engram_weights/")

How ids reach the memory under a KV cache: the model's own `forward` (what `model(...)`,
`generate` and peft call) first hands its public arguments to the injector: `input_ids`
and the KV cache, found by type (`transformers.Cache`, whatever the keyword is called)
and measured with its public `get_seq_length()`. The injector keeps the ids of the cached
prefix and appends the new ones, so the memory after decoder layer i always hashes the
complete history. Nothing layer-internal is read (the keyword decoder layers receive for
the cache was renamed in transformers 5.24). Greedy `generate(use_cache=True)` therefore
gives exactly the tokens of `use_cache=False`, trained memory or not.
"""

from __future__ import annotations

import functools
import inspect
import json
import types
from pathlib import Path

import torch
from torch import nn

from engram_core.components import BuildContext
from engram_core.config import ConfigError, structure, unstructure

from .memory import EngramHashConfig, EngramHashMemory, check_layers

GATE_ALIASES = {"context": "context", "content-based": "context", "learned": "learned", "fixed": "fixed"}


def decoder_of(model: nn.Module) -> nn.Module:
    dec = model.get_decoder() if hasattr(model, "get_decoder") else None
    if dec is None or not isinstance(getattr(dec, "layers", None), nn.ModuleList):
        raise ConfigError(
            "model",
            f"{type(model).__name__} is not a decoder-only causal LM with a `get_decoder().layers` stack (Llama, Qwen2, Mistral, ...)",
        )
    return dec


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return decoder_of(model).layers


class _DimsOnly:
    """The part of a head a memory needs to be built: width, vocabulary, layer count."""

    def __init__(self, dim: int, vocab: int, n_layers: int, texts=None):
        self._dims = (dim, vocab, n_layers)
        self._texts = texts

    def memory_dims(self):
        return self._dims

    def token_texts(self):
        return self._texts


def hf_token_texts(tokenizer, vocab_size: int) -> list[str | None]:
    texts: list[str | None] = []
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i in range(vocab_size):
        if i in special or i >= len(tokenizer):
            texts.append(None)
        else:
            texts.append(tokenizer.decode([i]))
    return texts


def _cache_length(args, kwargs) -> int:
    """Positions held by the KV cache among a top-level forward's arguments (0: none).

    Found by type, not by keyword: the keyword is `past_key_values` up to transformers 5.23
    and `cache` from 5.24. `transformers.Cache` and its `get_seq_length()` are public on
    every version the plugin admits; the tuple-of-(key, value) format is transformers 4.x's
    documented legacy form of the same argument."""
    from transformers import Cache

    values = list(args) + list(kwargs.values())
    for v in values:
        if isinstance(v, Cache):
            return int(v.get_seq_length())
    legacy = kwargs.get("past_key_values")
    if isinstance(legacy, (tuple, list)) and legacy and legacy[0] is not None:
        return int(legacy[0][0].shape[-2])
    return 0


class HFInjector:
    """Runs `memory.apply_layer(i, hidden, ids)` after decoder layer i (a forward hook).

    The ids come from the public arguments of the model's own forward: the injector takes
    the place of `model.forward` (an instance attribute, so `model(...)`, `generate`, and
    peft's tuner, which calls `model.forward(...)` directly before peft 0.15 and so skips
    forward pre-hooks, all pass through it), reads `input_ids` and the length of the KV cache
    it is given, then calls the model's own forward. It keeps the ids of the cached prefix
    and appends the new ones, so the memory always hashes the complete history."""

    def __init__(self, model: nn.Module, memory: EngramHashMemory):
        self.memory = memory
        self.ids: torch.Tensor | None = None
        self.live = 0  # > 0 while the model's forward runs
        self.handles = []
        self.model = model
        self.own_forward = model.__dict__.get("forward")  # someone else's instance forward: kept, restored
        self.inner_forward = model.forward
        dec = decoder_of(model)
        for key in memory.blocks:
            self.handles.append(dec.layers[int(key)].register_forward_hook(functools.partial(self._layer_hook, int(key))))
        object.__setattr__(model, "_engram_injector", self)
        object.__setattr__(model, "forward", self)

    @property
    def __signature__(self):
        """`generate` inspects `model.forward`'s parameters: show the model's own."""
        return inspect.signature(self.inner_forward)

    def __call__(self, *args, **kwargs):
        self.see_inputs(args, kwargs)
        self.live += 1
        try:
            return self.inner_forward(*args, **kwargs)
        finally:
            self.live -= 1

    def see_inputs(self, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor):
            self.ids = None  # embeddings only: the memory cannot address, apply_layer says so
            return
        past_len = _cache_length(args, kwargs)
        if past_len == 0:
            self.ids = ids
            return
        if self.ids is None or self.ids.shape[1] < past_len or self.ids.shape[0] != ids.shape[0]:
            seen = 0 if self.ids is None else self.ids.shape[1]
            raise RuntimeError(
                f"engram: the KV cache holds {past_len} positions but only {seen} ids were seen; "
                "call the model with input_ids from the start of the sequence"
            )
        self.ids = torch.cat([self.ids[:, :past_len], ids.to(self.ids.device)], dim=1)

    def _layer_hook(self, layer: int, module, args, output):
        if not self.memory.enabled:
            return output
        if not self.live:
            raise RuntimeError(
                "engram: a decoder layer ran outside the model's forward, so its token ids are unknown; "
                "call the model itself (model(...) or model.generate)"
            )
        hidden = output[0] if isinstance(output, tuple) else output
        new = self.memory.apply_layer(layer, hidden, self.ids)
        if isinstance(output, tuple):
            return (new,) + tuple(output[1:])
        return new

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        model = self.model
        if self.own_forward is not None:
            object.__setattr__(model, "forward", self.own_forward)
        else:
            model.__dict__.pop("forward", None)
        model.__dict__.pop("_engram_injector", None)


def engram_config(memory_size: int, inject_layers, gate_type: str, **kwargs) -> EngramHashConfig:
    if gate_type not in GATE_ALIASES:
        raise ConfigError("gate_type", f"must be one of {', '.join(map(repr, GATE_ALIASES))}, got {gate_type!r}")
    gate = GATE_ALIASES[gate_type]
    kwargs.setdefault("gate_bias", -5.0 if gate == "learned" else 0.0)
    data = {"memory_size": memory_size, "layers": list(inject_layers), "gate": gate, **kwargs}
    try:
        return structure(data, EngramHashConfig)
    except ConfigError as exc:
        raise ConfigError(None, str(exc)) from None


def add_engram(
    model: nn.Module,
    memory_size: int = 65536,
    inject_layers=(0,),
    gate_type: str = "context",
    freeze_base: bool = True,
    tokenizer=None,
    **memory_options,
) -> nn.Module:
    """Add Engram memory after `inject_layers` of a transformers causal LM, in place.

    The memory is registered as ``model.engram`` (so optimisers, `.to()` and peft see it);
    the model gains ``save_engram(path)``, ``load_engram(path)`` and ``remove_engram()``.
    `memory_options` are further `engram_hash` config keys (orders, heads_per_order,
    slot_dim, conv_kernel, canonical, sparse, ...). `canonical=True` needs `tokenizer`.
    Returns the model.
    """
    if hasattr(model, "engram"):
        raise ConfigError("model", "this model already has Engram memory (call model.remove_engram() first)")
    if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 1:
        raise ConfigError("memory_size", f"must be an integer >= 1, got {memory_size!r}")
    layers = decoder_layers(model)
    inject_layers = list(inject_layers)
    check_layers(inject_layers, len(layers), key="inject_layers")
    cfg = engram_config(memory_size, inject_layers, gate_type, **memory_options)
    conf = model.config
    dim = int(conf.hidden_size)
    vocab = int(conf.vocab_size)
    texts = None
    if cfg.canonical:
        if tokenizer is None:
            raise ConfigError("canonical", "canonical ids need the model's tokenizer: add_engram(..., tokenizer=tok)")
        texts = hf_token_texts(tokenizer, vocab)
    memory = EngramHashMemory(cfg, BuildContext(head=_DimsOnly(dim, vocab, len(layers), texts)))
    ref = next(model.parameters())
    memory.to(device=ref.device)
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    model.add_module("engram", memory)
    HFInjector(model, memory)
    model.save_engram = types.MethodType(save_engram, model)
    model.load_engram = types.MethodType(load_engram, model)
    model.remove_engram = types.MethodType(remove_engram, model)
    return model


def save_engram(model: nn.Module, path) -> Path:
    """Write only the memory: `engram_config.json` and `engram.safetensors` in `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mem: EngramHashMemory = model.engram
    state = {k: v.detach().contiguous().cpu() for k, v in mem.state_dict().items()}
    save_file(state, str(path / "engram.safetensors"))
    (path / "engram_config.json").write_text(json.dumps(unstructure(mem.cfg), indent=2))
    return path


def load_engram(model: nn.Module, path) -> nn.Module:
    """Load memory parameters written by `save_engram`; the configs must agree."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "engram.safetensors").is_file():
        raise ConfigError("path", f"{path} holds no engram.safetensors (written by save_engram)")
    saved = json.loads((path / "engram_config.json").read_text())
    mem: EngramHashMemory = model.engram
    mine = unstructure(mem.cfg)
    diff = [k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k)]
    if diff:
        k = sorted(diff)[0]
        raise ConfigError(k, f"saved Engram has {k}={saved.get(k)!r}, this model's has {mine.get(k)!r}")
    state = load_file(str(path / "engram.safetensors"), device=str(next(mem.parameters()).device))
    mem.load_state_dict(state)
    return model


def remove_engram(model: nn.Module) -> nn.Module:
    model._engram_injector.remove()
    del model._modules["engram"]
    for name in ("save_engram", "load_engram", "remove_engram", "_engram_injector"):
        model.__dict__.pop(name, None)
    return model


def load_causal_lm(model_dir: str, key: str = "model_dir", dtype=None):
    """`AutoModelForCausalLM.from_pretrained` of a local directory, with one-line errors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    p = Path(model_dir).expanduser()
    if not p.is_dir():
        raise ConfigError(key, f"model directory does not exist: {model_dir}")
    try:
        conf = AutoConfig.from_pretrained(str(p), local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(key, f"{model_dir} is not a transformers model directory: {str(exc).splitlines()[0]}") from None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if conf.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(key, f"{model_dir} holds a '{conf.model_type}' model, which is not a decoder-only causal LM")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True)
        if dtype is not None:  # `.to()`, not the keyword: `torch_dtype` before transformers 4.56, `dtype` after
            model = model.to(dtype)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(key, f"cannot load a causal LM from {model_dir}: {str(exc).splitlines()[0]}") from None
    try:
        decoder_layers(model)
    except ConfigError:
        raise ConfigError(key, f"{model_dir} holds a '{conf.model_type}' model, which is not a decoder-only causal LM (Llama, Qwen2, Mistral, ...)") from None
    return model

