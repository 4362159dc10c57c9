"""Engram memory inside any transformers causal LM (Llama, Qwen2, Mistral, Gemma, Phi-3, ...).

    model = AutoModelForCausalLM.from_pretrained(local_dir, dtype=torch.bfloat16)
    model = add_engram(model, memory_size=100_000, inject_layers=[0, 1], gate_type="context")
    opt = torch.optim.AdamW(engram_param_groups(model, lr=2e-4))   # tables 5x lr, no decay
    ...train...
    model.save_pretrained(out_dir)           # weights + engram_config.json + engram.safetensors
    model = from_pretrained(out_dir)         # both back

How ids reach the memory: `add_engram` wraps the model's `forward` and
`prepare_inputs_for_generation` (instance attributes; `remove_engram` restores them) and
reads only their public arguments: the whole running sequence that `generate` hands to
`prepare_inputs_for_generation` before each step (beams already reordered), or, for a
direct call, `input_ids`, the 2-D `attention_mask` and the KV cache (found by type,
measured with `get_seq_length()`). The memory after decoder layer i therefore hashes the
complete, unpadded history: greedy, sampled and beam-searched `generate(use_cache=True)`
give exactly the tokens of `use_cache=False`, trained memory or not. Nothing
layer-internal is read (the keyword decoder layers receive for the cache was renamed in
transformers 5.24).
"""

from __future__ import annotations

import functools
import inspect
import json
import types
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from engram_core.components import BuildContext
from engram_core.config import ConfigError, structure, unstructure
from engram_core.run import accel
from engram_core.tables.rowwise import row_holder

from .blocks import EngramHashConfig, check_layers
from .memories import EngramHashMemory

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
    """The part of a head a memory needs to be built: width, vocabulary, layer count (and
    the canonical-id map, where the memory hashes canonical ids)."""

    memory_reads_attention_mask = True  # the hooks hand the model's 2-D mask to the memory

    def __init__(self, dim: int, vocab: int, n_layers: int, texts=None, canonical: torch.Tensor | None = None):
        self._dims = (dim, vocab, n_layers)
        self._texts = texts
        self._canonical = canonical

    def memory_dims(self):
        return self._dims

    def token_texts(self):
        return self._texts

    def canonical_ids(self):
        if self._canonical is None:
            raise ConfigError("canonical", "canonical ids need the model's tokenizer: add_engram(..., tokenizer=tok)")
        return self._canonical


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


def _is_peft_model(model: nn.Module) -> bool:
    return callable(getattr(model, "get_base_model", None)) and hasattr(model, "peft_config")


def engram_memory(model: nn.Module) -> EngramHashMemory:
    """The memory that runs: `model.engram`, or the trained copy where peft's
    `modules_to_save=["engram"]` wrapped it (its active adapter's)."""
    mem = getattr(model, "engram", None)
    if mem is None:
        raise ConfigError("model", "this model has no Engram memory (add_engram(model, ...) first)")
    if isinstance(mem, EngramHashMemory):
        return mem
    copies = getattr(mem, "modules_to_save", None)  # peft's ModulesToSaveWrapper
    if copies is not None:
        active = getattr(mem, "active_adapters", None) or [getattr(mem, "active_adapter", None)]
        for name in active if isinstance(active, (list, tuple)) else [active]:
            if name in copies and not getattr(mem, "disable_adapters", False):
                return copies[name]
        return mem.original_module
    raise ConfigError("model", f"model.engram is a {type(mem).__name__}, not Engram memory")


class HFInjector:
    """Runs the memory after each chosen decoder layer (a forward hook on the layer).

    Token ids and the padding mask come from the public arguments of the model's own
    forward: the injector takes the place of `model.forward` (an instance attribute, so
    `model(...)`, `generate`, and peft's tuner, which calls `model.forward(...)` directly
    before peft 0.15 and so skips forward pre-hooks, all pass through it). Under a KV
    cache the history comes from one of two public places:

    - `generate` calls `model.prepare_inputs_for_generation(input_ids, ...)` with the
      whole running sequence before each forward (after beams were reordered, candidates
      appended, ...); the injector wraps that method too and takes the ids and the 2-D
      attention mask from there. Greedy, sampling, beam search and a StaticCache therefore
      see exactly the history of `use_cache=False`.
    - a direct call `model(input_ids=new, past_key_values=cache)`: the KV cache, found by
      type (`transformers.Cache`, whatever the keyword is called) and measured with its
      public `get_seq_length()`; the ids of the cached prefix are kept and the new ones
      appended.

    Gradient checkpointing re-runs a layer (and so this hook) during backward, after the
    model's forward returned: the ids are found again by the layer's input tensor (the
    recomputation is given the same storage) and the telemetry is not counted twice."""

    RECOMPUTE_SLOTS = 512

    def __init__(self, model: nn.Module, memory: EngramHashMemory | None = None):
        """`memory`: a memory held elsewhere (the hf_causal_lm head's); None: `model.engram`,
        looked up at each call, so a wrapper peft put there (modules_to_save) is what runs."""
        self.held = memory
        _make_eager_bookkeeping()
        self.ids: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None  # None: no padding anywhere in the history
        self.window: tuple = (None, None)  # (ids, mask) the memory reads: `_memory_window`
        self.new_positions = 0  # positions the current forward adds (its input's length)
        self.reads_ahead: dict = {}  # layer -> its table read, made before a compiled forward
        self.pending = None  # (ids, mask) that generate's prepare_inputs_for_generation saw last
        self.live = 0  # > 0 while the model's forward runs
        self.recompute: OrderedDict = OrderedDict()  # (layer, input data_ptr, shape) -> (ids, mask)
        self.handles = []
        self.model = model
        self.peft_seen = hasattr(model, "peft_config")
        self.own_forward = model.__dict__.get("forward")  # someone else's instance forward: kept, restored
        self.inner_forward = model.forward
        self.own_prepare = model.__dict__.get("prepare_inputs_for_generation")
        self.inner_prepare = getattr(model, "prepare_inputs_for_generation", None)
        dec = decoder_of(model)
        for key in self.active().blocks:
            layer = dec.layers[int(key)]
            self.handles.append(layer.register_forward_hook(functools.partial(self._layer_hook, int(key)), with_kwargs=True))
        object.__setattr__(model, "_engram_injector", self)
        object.__setattr__(model, "forward", self)
        if self.inner_prepare is not None:
            object.__setattr__(model, "prepare_inputs_for_generation", self._prepare_wrapper())
        forget_compiled_graphs()

    def active(self) -> EngramHashMemory:
        return self.held if self.held is not None else engram_memory(self.model)

    @property
    def __signature__(self):
        """`generate` and Trainer inspect `model.forward`'s parameters: show the model's own."""
        return inspect.signature(self.inner_forward)

    def _prepare_wrapper(self):
        inner = self.inner_prepare

        @functools.wraps(inner)  # generate inspects its parameters (followed through __wrapped__)
        def prepare_inputs_for_generation(input_ids, *args, **kwargs):
            mask = kwargs.get("attention_mask")
            if not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
                mask = None
            self.pending = (input_ids, mask) if isinstance(input_ids, torch.Tensor) else None
            return inner(input_ids, *args, **kwargs)

        return prepare_inputs_for_generation

    def __call__(self, *args, **kwargs):
        # where dynamo traces this call, is_compiling() is the constant True: the eager
        # bookkeeping learns that the forward after it is compiled
        _EAGER["bookkeeping"](self, args, kwargs, torch.compiler.is_compiling())
        self.live += 1
        try:
            return self.inner_forward(*args, **kwargs)
        finally:
            self.live -= 1

    def _bookkeeping(self, args, kwargs, compiled: bool = False):
        """The injector's bookkeeping, always run eagerly (`_make_eager_bookkeeping`): under a
        compiled forward (generate's static-cache decode step, `torch.compile(model)`) it is
        one graph break at the top, and the model and memory after it compile with fixed
        shapes (`window`) and no break inside (`reads_ahead`)."""
        self._keep_memory_trainable()
        self.see_inputs(args, kwargs)
        self.reads_ahead = self._read_tables_ahead() if compiled else {}

    def _read_tables_ahead(self) -> dict:
        """Under a compiled forward that makes gradients: each memory layer whose table makes
        its gradient as rows (a row-wise optimiser updates it in backward) has its table read
        here, eagerly, and the layer's hook hands it to the block. Inductor cannot compile
        such a read, so inside the forward it would be a graph break in every memory layer's
        hook (`EngramBlock.read_ahead` says what that did on an H100)."""
        ids, mask = self.window
        if ids is None or not torch.is_grad_enabled():
            return {}
        return self.active().reads_ahead(ids, self.new_positions, mask)

    def _keep_memory_trainable(self):
        """A peft wrapping that `_watch_peft` did not see (peft's `inject_adapter_in_model`,
        a PeftModel subclass built another way) froze the memory with the base. Giving its
        trainability back now would be silent and too late (an optimiser built from the
        trainable parameters before this call does not hold it): a training forward
        refuses with the fix instead; inference runs as it is."""
        if self.peft_seen or not hasattr(self.model, "peft_config"):
            return
        mem = self.active()
        if not (mem.trainable and not any(p.requires_grad for p in mem.parameters())):
            self.peft_seen = True
            return
        if self.model.training and torch.is_grad_enabled():
            raise ConfigError("model", PEFT_FROZE_MEMORY)

    def see_inputs(self, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        pending, self.pending = self.pending, None
        if not isinstance(ids, torch.Tensor):
            self.ids = self.mask = None  # embeddings only: the memory cannot address, apply_layer says so
            self.window, self.new_positions = (None, None), 0
            return
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None  # a 4-D mask says nothing of padding
        t = ids.shape[1]
        if pending is not None and pending[0].shape[0] == ids.shape[0] and pending[0].shape[1] >= t and torch.equal(pending[0][:, -t:], ids):
            history, mask = pending[0], pending[1]
        else:
            past_len = _cache_length(args, kwargs)
            if past_len == 0:
                history = ids
            else:
                if self.ids is None or self.ids.shape[1] < past_len or self.ids.shape[0] != ids.shape[0]:
                    seen = 0 if self.ids is None else self.ids.shape[1]
                    raise RuntimeError(
                        f"engram: the KV cache holds {past_len} positions but only {seen} ids were seen; "
                        "call the model with input_ids from the start of the sequence"
                    )
                history = torch.cat([self.ids[:, :past_len], ids.to(self.ids.device)], dim=1)
                if mask is None or mask.shape[1] < history.shape[1]:
                    old = self.mask[:, :past_len] if self.mask is not None else torch.ones_like(self.ids[:, :past_len])
                    mask = torch.cat([old, torch.ones_like(ids)], dim=1)
        if mask is not None:
            mask = mask[:, : history.shape[1]].to(history.device)
            if mask.shape[1] < history.shape[1]:
                mask = None
            elif accel.host_reads_free(mask.device) and bool(mask.all()):
                # no padding: the unpadded path. Checked only where it is free: on a GPU it
                # would be a host sync (and under compile a graph break) every forward, so
                # there the mask is kept and the fixed-shape padded path runs (same result)
                mask = None
        self.ids, self.mask = history, mask
        self.window, self.new_positions = self._memory_window(history, mask, t), t

    def _memory_window(self, ids: torch.Tensor, mask: torch.Tensor | None, t: int):
        """(ids, mask) the memory is given. A forward over the whole sequence gets it all. A
        KV-cached step (t new positions after a history) gets the last t positions and the
        `reach` ids before them that their n-grams and conv read, always exactly that many
        columns (a short history is padded on the left, where padding acts as before the
        sequence start): it hashes O(1) ids however long the sequence, and a compiled decode
        step keeps one shape from token to token. Equal to the whole history wherever
        padding is on the left, as generate pads (the dropped positions are all before the
        window); on a CPU a history with padding after real tokens is given whole."""
        total = ids.shape[1]
        if t >= total:
            return ids, mask
        width = t + self.active().reach
        if total < width:
            short = width - total
            kept = mask if mask is not None else torch.ones_like(ids)
            return (torch.cat([ids.new_zeros(ids.shape[0], short), ids], 1),
                    torch.cat([kept.new_zeros(kept.shape[0], short), kept], 1))
        if mask is not None and accel.host_reads_free(mask.device):
            padded_in_window = (mask[:, -width:] == 0).any(1)
            real_before = (mask[:, :-width] != 0).any(1)
            if bool((padded_in_window & real_before).any()):
                return ids, mask  # real tokens before padding in the window: only the whole history packs it correctly
        return _fresh(ids[:, -width:]), (_fresh(mask[:, -width:]) if mask is not None else None)

    def _layer_hook(self, layer: int, module, args, kwargs, output):
        mem = self.held if self.held is not None else self.model.engram
        if not self.active().enabled:
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        inp = args[0] if args else kwargs.get("hidden_states")
        slot = (layer, inp.data_ptr(), tuple(inp.shape)) if isinstance(inp, torch.Tensor) and not torch.compiler.is_compiling() else None
        read = None
        if self.live:
            (ids, mask), record, read = self.window, True, self.reads_ahead.get(layer)
            # gradient checkpointing may re-run this layer in backward (eager only: under
            # torch.compile the recomputation happens inside the compiled backward graph,
            # and `data_ptr` would break the graph)
            if self.model.training and slot is not None and not torch.compiler.is_compiling():
                self.recompute[slot] = (ids, mask)
                while len(self.recompute) > self.RECOMPUTE_SLOTS:
                    self.recompute.popitem(last=False)
        elif slot in self.recompute:
            (ids, mask), record = self.recompute[slot], False
        else:
            raise RuntimeError(
                "engram: a decoder layer ran outside the model's forward, so its token ids are unknown; "
                "call the model itself (model(...) or model.generate)"
            )
        new = mem(hidden, ids, layer=layer, attention_mask=mask, record=record, read=read)
        if isinstance(output, tuple):
            return (new,) + tuple(output[1:])
        return new

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []
        model = self.model
        for name, own in (("forward", self.own_forward), ("prepare_inputs_for_generation", self.own_prepare)):
            if own is not None:
                object.__setattr__(model, name, own)
            else:
                model.__dict__.pop(name, None)
        model.__dict__.pop("_engram_injector", None)
        forget_compiled_graphs()


def _fresh(window: torch.Tensor) -> torch.Tensor:
    """A copy of `window` with its own row-major strides. `.contiguous()` would return a
    batch-1 slice of the growing history as it is (a size-1 dimension's stride does not
    count for contiguity), with a stride that grows each token, and torch.compile guards
    on strides: generate's compiled decode step then recompiled at every token, with
    dynamic strides and a CUDA graph per size (H100, 2026-12-06)."""
    return window.clone(memory_format=torch.contiguous_format)


_EAGER: dict = {}  # "bookkeeping": HFInjector._bookkeeping under torch.compiler.disable


def _make_eager_bookkeeping() -> None:
    """Wrap `HFInjector._bookkeeping` in `torch.compiler.disable` once, when the first
    injector is built (always eagerly): the decorator at import would import torch._dynamo
    with the plugin, a per-injector wrapper would not follow a deepcopy of the model, and a
    cached factory called from `__call__` makes dynamo warn on every compile."""
    if "bookkeeping" not in _EAGER:
        _EAGER["bookkeeping"] = torch.compiler.disable(HFInjector._bookkeeping)


def forget_compiled_graphs() -> None:
    """Drop every graph torch.compile has made, so the next compiled call traces the model
    as it is now, with or without the memory.

    Why: the memory runs from forward hooks on decoder layers, and torch.compile does not
    guard on a module's hooks (torch._dynamo.config.skip_nnmodule_hook_guards is True by
    default, for speed). A model compiled and run before `add_engram` therefore keeps
    replaying its old graph: the memory never runs, its tables get no gradient, and
    nothing says so (issue 14: the compiled 494M model timed like its base, table .grad
    None). The same holds the other way after `remove_engram`. `torch.compiler.reset()`
    is the public API for this; it clears the process's compile caches, so other compiled
    models recompile once on their next call (correct, a few seconds). Cheap when
    nothing was compiled."""
    torch.compiler.reset()


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


PEFT_FROZE_MEMORY = (
    "peft froze the Engram memory (model.engram) with the base model, so an optimiser built from the trainable "
    "parameters does not hold it and it would never train: call model.engram.requires_grad_(True) (or build the "
    "optimiser with engram_param_groups(model)) before building the optimiser, or add modules_to_save=[\"engram\"] "
    "to the peft config; to train the adapters alone, call model.engram.requires_grad_(False)")


def _watch_peft() -> None:
    """Once per process: see every PeftModel that takes a model with Engram memory.

    `get_peft_model(add_engram(base), config)` freezes every parameter that is not an
    adapter's, the memory included, and nothing of the model runs again before the user
    builds an optimiser from the trainable parameters (or Trainer does). The one moment
    after the freeze that can be observed with public API is `PeftModel.__init__` storing
    its tuner (`self.base_model = LoraModel(model, ...)`), which a global module
    registration hook (`torch.nn.modules.module.register_module_module_registration_hook`)
    sees. There the memory gets back the trainability it had (its own `requires_grad_`
    records the user's choice; peft's inference mode keeps it frozen), so the optimiser,
    `print_trainable_parameters()` and Trainer all see it; and the PeftModel's
    `save_pretrained` / `load_adapter` carry the memory with the adapter."""
    global _PEFT_WATCH
    if _PEFT_WATCH is None:
        _PEFT_WATCH = torch.nn.modules.module.register_module_module_registration_hook(_on_module_registered)


_PEFT_WATCH = None


def _on_module_registered(parent: nn.Module, name: str, child):
    if name != "base_model" or not isinstance(child, nn.Module):
        return None  # cheap: this runs for every submodule any module registers
    inner = child.__dict__.get("_modules", {}).get("model")
    if inner is None or "_engram_injector" not in inner.__dict__ or not callable(getattr(type(parent), "save_pretrained", None)):
        return None
    _adopt_peft_model(parent, child, inner)
    return None


def _peft_adapter_config(tuner):
    configs = getattr(tuner, "peft_config", None) or {}
    active = getattr(tuner, "active_adapter", None)
    name = active[0] if isinstance(active, (list, tuple)) and active else active
    return configs.get(name) if isinstance(configs, dict) else None


def _adopt_peft_model(peft_model: nn.Module, tuner: nn.Module, model: nn.Module) -> None:
    """What `_watch_peft` does when a PeftModel takes `model` (the transformers model
    holding the memory; `tuner` is peft's LoraModel, ...)."""
    injector = model.__dict__["_engram_injector"]
    injector.peft_seen = True
    mem = injector.active()  # model.engram, or a memory an engram head holds elsewhere
    config = _peft_adapter_config(tuner)
    if mem.trainable and not getattr(config, "inference_mode", False) and not any(p.requires_grad for p in mem.parameters()):
        _make_trainable(mem)
    if injector.held is None:  # a memory the head holds is saved with the run's checkpoint, not an adapter
        _carry_memory_with_adapter(peft_model, model)


def _make_trainable(mem: EngramHashMemory) -> None:
    for block in mem.blocks.values():
        for pname, p in block.named_parameters():
            p.requires_grad_(pname != "gate_bias" or block.cfg.gate != "fixed")


def _carry_memory_with_adapter(peft_model: nn.Module, model: nn.Module) -> None:
    """The PeftModel's save_pretrained writes the memory into the adapter folder too
    (engram_config.json + engram.safetensors), and its load_adapter reads it back from a
    folder that has it: an adapter saved with a trained memory reloads with that memory,
    with or without modules_to_save=["engram"]."""
    if "save_pretrained" in peft_model.__dict__:
        return
    own_save, own_load = peft_model.save_pretrained, getattr(peft_model, "load_adapter", None)

    @functools.wraps(own_save)
    def save_pretrained(save_directory, *args, **kwargs):
        out = own_save(save_directory, *args, **kwargs)
        save_engram(model, save_directory)
        return out

    object.__setattr__(peft_model, "save_pretrained", save_pretrained)
    if own_load is None:
        return

    @functools.wraps(own_load)
    def load_adapter(model_id, *args, **kwargs):
        out = own_load(model_id, *args, **kwargs)
        folder = Path(str(model_id))
        if (folder / ENGRAM_CONFIG).is_file():
            load_engram(model, folder)
        return out

    object.__setattr__(peft_model, "load_adapter", load_adapter)


ENGRAM_CONFIG = "engram_config.json"
ENGRAM_WEIGHTS = "engram.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError("table_dtype", f"must be one of {', '.join(DTYPES)} (or a torch dtype), got {dtype!r}")
        return dtype
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    raise ConfigError("table_dtype", f"must be one of {', '.join(DTYPES)}, got {dtype!r}")


def add_engram(
    model: nn.Module,
    memory_size: int = 65536,
    inject_layers=(0,),
    gate_type: str = "context",
    freeze_base: bool = True,
    tokenizer=None,
    table_dtype=None,
    **memory_options,
) -> nn.Module:
    """Add Engram memory after `inject_layers` of a transformers causal LM, in place.

    The memory is registered as ``model.engram`` (so optimisers, `.to()` and peft see it)
    on the model's device and in its dtype (a bf16 model gets a bf16 memory);
    `table_dtype` ("float32", torch.float32, ...) keeps the tables (the master rows) in
    another dtype, read in the model's. The model gains ``save_engram(path)``,
    ``load_engram(path)`` and ``remove_engram()``, and its ``save_pretrained`` writes the
    memory beside the weights (`engram_llm_hash.from_pretrained` loads both).
    A peft model (`get_peft_model(...)`) is accepted: the memory goes on its base model and
    peft's choice of trainable parameters is kept. `memory_options` are further
    `engram_hash` config keys (orders, heads_per_order, slot_dim, conv_kernel, canonical,
    sparse, ...). `canonical=True` needs `tokenizer`. Returns the model.
    """
    target = model.get_base_model() if _is_peft_model(model) else model
    if hasattr(target, "engram"):
        raise ConfigError("model", "this model already has Engram memory (call model.remove_engram() first)")
    if isinstance(memory_size, bool) or not isinstance(memory_size, int) or memory_size < 1:
        raise ConfigError("memory_size", f"must be an integer >= 1, got {memory_size!r}")
    layers = decoder_layers(target)
    inject_layers = list(inject_layers)
    check_layers(inject_layers, len(layers), key="inject_layers")
    cfg = engram_config(memory_size, inject_layers, gate_type, **memory_options)
    canonical = None
    if cfg.canonical:
        if tokenizer is None:
            raise ConfigError("canonical", "canonical ids need the model's tokenizer: add_engram(..., tokenizer=tok)")
        from .canonical import tokenizer_canonical_ids

        canonical = tokenizer_canonical_ids(tokenizer, int(target.config.vocab_size))
    attach_engram(target, cfg, canonical=canonical, freeze_base=freeze_base and not _is_peft_model(model), table_dtype=table_dtype)
    if _is_peft_model(model):  # peft already chose its trainable parameters: the memory trains, and is saved with the adapter
        _carry_memory_with_adapter(model, target)
    return model


def attach_engram(model: nn.Module, cfg: EngramHashConfig, canonical=None, freeze_base: bool = True, table_dtype=None) -> EngramHashMemory:
    """Build the memory of `cfg` on the transformers model `model` (no peft wrapper) and
    hook it in. What `add_engram` and `from_pretrained` share."""
    conf = model.config
    memory = EngramHashMemory(
        cfg, BuildContext(head=_DimsOnly(int(conf.hidden_size), int(conf.vocab_size), len(decoder_layers(model)), canonical=canonical))
    )
    ref = next(model.parameters())
    memory.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    memory.table_dtype = _dtype_name(table_dtype)
    if memory.table_dtype is not None:
        memory.set_table_dtype(DTYPES[memory.table_dtype])
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    model.add_module("engram", memory)
    HFInjector(model)  # model.engram, looked up at each call
    _watch_peft()
    model.save_engram = types.MethodType(save_engram, model)
    model.load_engram = types.MethodType(load_engram, model)
    model.remove_engram = types.MethodType(remove_engram, model)
    own_save = model.save_pretrained

    @functools.wraps(own_save)
    def save_pretrained(save_directory, *args, state_dict=None, **kwargs):
        """The model's own save_pretrained without the memory, then the memory beside it."""
        state_dict = model.state_dict() if state_dict is None else state_dict
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("engram.")}
        out = own_save(save_directory, *args, state_dict=state_dict, **kwargs)
        save_engram(model, save_directory)
        return out

    model.save_pretrained = save_pretrained
    return memory


def save_engram(model: nn.Module, path) -> Path:
    """Write only the memory: `engram_config.json` and `engram.safetensors` in `path`.
    The canonical-id map (if any) is saved with it, so loading needs no tokenizer."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mem = engram_memory(model)
    from engram_core.tables.sharded_rows import sharded_tables

    if sharded_tables(mem):  # each rank holds only its rows: a file of one rank's state would lack the table
        raise ConfigError("placement", "save_engram writes the whole table, but with placement 'sharded' on several ranks each holds only its rows; save from one process (the run's checkpoint loads there)")
    state = {k: v.detach().contiguous().cpu() for k, v in mem.state_dict().items()}
    if mem.cfg.canonical:
        state["canonical_ids"] = next(iter(mem.blocks.values())).hasher.canonical.cpu()
    save_file(state, str(path / ENGRAM_WEIGHTS))
    meta = {"engram_hash": unstructure(mem.cfg), "table_dtype": getattr(mem, "table_dtype", None), "model": _model_dims(model)}
    (path / ENGRAM_CONFIG).write_text(json.dumps(meta, indent=2))
    return path


def _model_dims(model: nn.Module) -> dict:
    """What the memory's rows are only valid for: the hash reads token ids (the vocabulary)
    and the projections the model's width."""
    target = model.get_base_model() if _is_peft_model(model) else model
    conf = getattr(target, "config", None)
    dims = {"vocab_size": getattr(conf, "vocab_size", None), "hidden_size": getattr(conf, "hidden_size", None)}
    try:
        dims["num_layers"] = len(decoder_layers(target))
    except Exception:  # a model whose layers are not where transformers puts them: the vocabulary and width still count
        pass
    return {k: int(v) for k, v in dims.items() if v is not None}


def _read_engram_meta(path: Path) -> dict:
    if not (path / ENGRAM_WEIGHTS).is_file() or not (path / ENGRAM_CONFIG).is_file():
        raise ConfigError("path", f"{path} holds no {ENGRAM_WEIGHTS} and {ENGRAM_CONFIG} (written by save_engram or save_pretrained)")
    try:
        meta = json.loads((path / ENGRAM_CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("path", f"{path / ENGRAM_CONFIG} is damaged (not JSON: {exc}); save the memory again") from None
    if not isinstance(meta, dict):
        raise ConfigError("path", f"{path / ENGRAM_CONFIG} is damaged (not a JSON object); save the memory again")
    if "engram_hash" not in meta:  # written before the table dtype was saved: the config alone
        meta = {"engram_hash": meta, "table_dtype": None}
    return meta


def _read_engram_config(path: Path) -> tuple[dict, str | None]:
    meta = _read_engram_meta(path)
    return meta["engram_hash"], meta.get("table_dtype")


def _read_engram_weights(path: Path, device: str = "cpu") -> dict:
    from safetensors.torch import load_file

    try:
        return load_file(str(path / ENGRAM_WEIGHTS), device=device)
    except Exception as exc:  # safetensors raises its own error types for a torn or foreign file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise ConfigError("path", f"{path / ENGRAM_WEIGHTS} is damaged, cannot be read ({type(exc).__name__}: {first}); "
                                  "save the memory again (save_engram or save_pretrained)") from None


def _check_model_dims(path: Path, saved: dict, model: nn.Module) -> None:
    """The saved memory fits this model: same vocabulary (the hash addresses rows by token
    id) and width, said in one line naming the mismatch."""
    mine = _model_dims(model)
    for key, why in (("vocab_size", "the hash addresses rows by token id, so every n-gram would read other rows"),
                     ("hidden_size", "the memory's projections have the model's width"),
                     ("num_layers", "the memory sits after given decoder layers")):
        if key in saved and key in mine and saved[key] != mine[key]:
            raise ConfigError(key, f"the Engram memory in {path} was saved for a model with {key}={saved[key]}, this model has "
                                   f"{key}={mine[key]} ({why}); load it into the model it was trained with")


def load_engram(model: nn.Module, path) -> nn.Module:
    """Load memory parameters written by `save_engram`; the configs and the model's
    vocabulary, width and depth (recorded in engram_config.json) must agree."""
    path = Path(path)
    meta = _read_engram_meta(path)
    saved = meta["engram_hash"]
    _check_model_dims(path, meta.get("model") or {}, model)
    mem = engram_memory(model)
    mine = unstructure(mem.cfg)
    diff = [k for k in set(saved) | set(mine) if saved.get(k) != mine.get(k)]
    if diff:
        k = sorted(diff)[0]
        raise ConfigError(k, f"saved Engram has {k}={saved.get(k)!r}, this model's has {mine.get(k)!r}")
    state = _read_engram_weights(path, device=str(next(mem.parameters()).device))
    state.pop("canonical_ids", None)
    mine_state = mem.state_dict()
    wrong = [f"{k}: saved {tuple(v.shape)}, this model's {tuple(mine_state[k].shape)}" for k, v in state.items()
             if k in mine_state and tuple(v.shape) != tuple(mine_state[k].shape)]
    if wrong:  # a file saved before the model's dimensions were recorded: the shapes say it
        raise ConfigError("hidden_size", f"the Engram memory in {path} does not fit this model ({wrong[0]}); "
                                         "load it into the model it was trained with")
    try:
        mem.load_state_dict(state)
    except RuntimeError as exc:
        raise ConfigError("path", f"{path / ENGRAM_WEIGHTS} does not match this memory ({str(exc).splitlines()[0][:160]})") from None
    return model


def from_pretrained(path, **kwargs) -> nn.Module:
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)`, then the Engram memory that
    `model.save_pretrained(path)` wrote beside the weights (same config, same rows). A
    directory without memory gives the plain model. The base is frozen as add_engram does
    (pass `freeze_base=False` to keep it trainable).

    A peft adapter folder (adapter_config.json, no config.json; what a PeftModel's
    save_pretrained writes, the memory with it) loads its base model from the local folder
    the adapter names (or `base_model=DIR`), never from the model hub, then the memory,
    then the adapter (`is_trainable=True` to train on)."""
    from transformers import AutoModelForCausalLM

    freeze_base = kwargs.pop("freeze_base", True)
    folder = Path(path)
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        return _from_adapter_folder(folder, kwargs.pop("base_model", None), kwargs.pop("is_trainable", False), kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if not (folder / ENGRAM_CONFIG).is_file():
        return model
    _attach_saved(model, folder, freeze_base)
    return load_engram(model, folder)


def _attach_saved(model: nn.Module, folder: Path, freeze_base: bool) -> None:
    meta = _read_engram_meta(folder)
    _check_model_dims(folder, meta.get("model") or {}, model)
    cfg = structure(meta["engram_hash"], EngramHashConfig)
    canonical = _read_engram_weights(folder).get("canonical_ids") if cfg.canonical else None
    attach_engram(model, cfg, canonical=canonical, freeze_base=freeze_base, table_dtype=meta.get("table_dtype"))


def _from_adapter_folder(folder: Path, base_model, is_trainable: bool, kwargs: dict) -> nn.Module:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        adapter = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("path", f"{folder / 'adapter_config.json'} is damaged (not JSON: {exc})") from None
    base = base_model or adapter.get("base_model_name_or_path")
    if not base or not (Path(str(base)).expanduser() / "config.json").is_file():
        raise ConfigError("base_model", f"{folder} is a peft adapter folder whose base model {base!r} is not a local model folder "
                                        f"(nothing is downloaded): from_pretrained({str(folder)!r}, base_model=LOCAL_MODEL_DIR)")
    kwargs.setdefault("local_files_only", True)
    model = AutoModelForCausalLM.from_pretrained(str(Path(str(base)).expanduser()), **kwargs)
    if (folder / ENGRAM_CONFIG).is_file():
        _attach_saved(model, folder, freeze_base=True)  # the PeftModel's load_adapter reads the rows (see _carry_memory_with_adapter)
    return PeftModel.from_pretrained(model, str(folder), is_trainable=is_trainable)


def remove_engram(model: nn.Module) -> nn.Module:
    model._engram_injector.remove()
    delattr(model, "engram")
    for name in ("save_engram", "load_engram", "remove_engram", "save_pretrained", "_engram_injector"):
        model.__dict__.pop(name, None)
    return model


def engram_param_groups(
    model: nn.Module, lr: float, weight_decay: float = 0.0, table_lr_scale: float = 5.0, rowwise_tables: bool = False
) -> list[dict]:
    """Optimiser parameter groups for a model with Engram memory, as the paper trains it:
    the tables at `table_lr_scale` × lr (5×) without weight decay, the memory's other
    parameters at lr, then every other trainable parameter (LoRA, an unfrozen base) at
    lr with `weight_decay` on matrices (not on biases and norms, as Trainer does).

        opt = torch.optim.AdamW(engram_param_groups(model, lr=2e-4, weight_decay=0.01))
        Trainer(model, args, ..., optimizers=(opt, None))

    Asking for the groups is asking to train the memory: its parameters are made
    trainable (peft's get_peft_model freezes them). With AdamW every table row moves
    every step (momentum) and the table gradient is dense: the paper's recipe.
    `rowwise_tables=True` marks the groups for the row-wise optimisers of
    `engram_core.tables.rowwise` (tables `rowwise=True`, the rest element-wise, i.e.
    AdamW / Adagrad), which on CUDA update the tables inside the backward from sparse
    gradients by default: see `engram_optimizer`. Sparse tables (`sparse=True`) and
    host-placed tables need those; with plain AdamW they are refused."""
    mem = engram_memory(model.get_base_model() if _is_peft_model(model) else model)
    held = any(row_holder(b.table.weight) is not None for b in mem.blocks.values())  # rows outside the parameter (host)
    if not rowwise_tables and (mem.cfg.sparse or held):
        what = "sparse tables" if mem.cfg.sparse else f"tables with placement={mem.cfg.placement!r}"
        raise ConfigError(
            "sparse" if mem.cfg.sparse else "placement",
            f"{what} need {'torch.optim.SparseAdam or ' if mem.cfg.sparse else ''}a row-wise optimiser: engram_optimizer(model, lr, 'rowwise_adam') "
            "(or engram_param_groups(..., rowwise_tables=True) with engram_core.optim.RowwiseAdam)",
        )
    mem.requires_grad_(True)
    for block in mem.blocks.values():
        if block.cfg.gate == "fixed":
            block.gate_bias.requires_grad_(False)
    tables = [b.table.weight for b in mem.blocks.values()]
    ids = {id(p) for p in tables}
    memory_rest = [p for p in mem.parameters() if p.requires_grad and id(p) not in ids]
    ids |= {id(p) for p in memory_rest}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [
        {"params": tables, "lr": lr * table_lr_scale, "weight_decay": 0.0, "name": "engram_tables"},
        {"params": memory_rest, "lr": lr, "weight_decay": 0.0, "name": "engram"},
        {"params": [p for p in others if p.dim() >= 2], "lr": lr, "weight_decay": weight_decay, "name": "decay"},
        {"params": [p for p in others if p.dim() < 2], "lr": lr, "weight_decay": 0.0, "name": "no_decay"},
    ]
    groups = [g for g in groups if g["params"]]
    if rowwise_tables:
        for g in groups:
            g["rowwise"] = g["name"] == "engram_tables"
    return groups


def engram_optimizer(
    model: nn.Module,
    lr: float,
    optimizer: str = "rowwise_adam",
    weight_decay: float = 0.0,
    table_lr_scale: float = 5.0,
    fused_backward: bool | str = "auto",
    **options,
) -> torch.optim.Optimizer:
    """One optimiser for a model with Engram memory: the tables row-wise (state per row,
    only the rows read this step updated), every other trainable parameter element-wise
    by the same rule (`rowwise_adam`: AdamW; `rowwise_adagrad`: Adagrad), in the groups of
    `engram_param_groups`. What a plain loop or transformers' Trainer takes:

        opt = engram_optimizer(model, lr=2e-4, optimizer="rowwise_adam")
        Trainer(model, args, ..., optimizers=(opt, None))

    `fused_backward` says where the tables are updated: "auto" (default) inside the
    backward on CUDA — the tables make sparse gradients of the rows read, never a dense
    table-sized one, and each is applied as soon as it is accumulated, so gradient
    clipping and Trainer never see a table gradient (with gradient accumulation the rows
    of every micro-batch are summed and applied at `step()`) — and at `step()` on the CPU;
    True: in backward on any device; False: at `step()` from the gradient the table makes
    (dense unless `sparse=True`). With fp16 loss scaling pass False. `options` go to the
    optimiser (betas, eps, auto_policy)."""
    from engram_core.tables.rowwise import FUSED_BACKWARD_CHOICES, ROWWISE_OPTIMIZERS

    if optimizer not in ROWWISE_OPTIMIZERS:
        raise ConfigError("optimizer", f"must be one of {', '.join(map(repr, ROWWISE_OPTIMIZERS))}, got {optimizer!r}")
    if not isinstance(fused_backward, (bool, str)) or fused_backward not in FUSED_BACKWARD_CHOICES:
        raise ConfigError("fused_backward", f"must be 'auto', True or False, got {fused_backward!r}")
    groups = engram_param_groups(model, lr, weight_decay=weight_decay, table_lr_scale=table_lr_scale, rowwise_tables=True)
    return ROWWISE_OPTIMIZERS[optimizer](groups, lr=lr, fused_backward=fused_backward, **options)


def _quiet_transformers():
    """transformers' own logging and warnings silenced for a structural check."""
    import contextlib
    import warnings

    from transformers.utils import logging as hf_logging

    @contextlib.contextmanager
    def quiet():
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yield
        finally:
            hf_logging.set_verbosity(level)

    return quiet()


def load_causal_lm(model_dir: str, key: str = "model_dir", dtype=None, cache_dir=None):
    """`AutoModelForCausalLM.from_pretrained` of a local directory, with one-line errors.

    Whether the directory holds a decoder-only causal LM is decided first, on a model built
    from its config on the meta device with transformers' logging silenced, so a directory
    that is not one gives one line and no loading noise."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_dir.startswith("engram:"):  # the general LM made here (engram_core.lm), pretrained first if not cached
        from engram_core.lm import resolve_model

        p = resolve_model(model_dir, cache_dir, key=key)
    else:
        p = Path(model_dir).expanduser()
    if not p.is_dir():
        raise ConfigError(key, f"model directory does not exist: {model_dir}")
    with _quiet_transformers():
        try:
            conf = AutoConfig.from_pretrained(str(p), local_files_only=True)
        except Exception as exc:  # noqa: BLE001
            raise ConfigError(key, f"{model_dir} is not a transformers model directory: {str(exc).splitlines()[0]}") from None
        not_causal = ConfigError(key, f"{model_dir} holds a '{conf.model_type}' model, which is not a decoder-only causal LM (Llama, Qwen2, Mistral, ...)")
        if getattr(conf, "is_encoder_decoder", False):
            raise not_causal
        try:
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(conf)
            decoder_layers(skeleton)
        except Exception:  # noqa: BLE001 - not in the causal-LM mapping, or no decoder stack
            raise not_causal from None
        del skeleton
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), local_files_only=True)
        if dtype is not None:  # `.to()`, not the keyword: `torch_dtype` before transformers 4.56, `dtype` after
            model = model.to(dtype)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(key, f"cannot load a causal LM from {model_dir}: {str(exc).splitlines()[0]}") from None
    return model
