"""The reader: a causal LM that answers from (prefix memory +) kept context.

Default backend `core`: `engram_core.nn.CausalTransformer`, trained from scratch in a
first stage on full-context prompts, then frozen by the recipe's `train`/`freeze` globs.
Backend `hf`: any local `AutoModelForCausalLM` directory (a Qwen2 in the seed), or
`engram:NAME`, the general causal LM made here (engram_core.lm, a transformers Llama
pretrained on the Python standard library's source; its cached folder, pretrained first
if missing): a *general* frozen reader, not one trained on the task. The prefix enters as
`inputs_embeds` in the LM's own input-embedding space, and the answer is read from its logits.

Modes (how the reader's input is built from a digit_kv batch):

    full          whole context                           (reader pretraining)
    summary       gold statement + kept tail              (upper baseline)
    discard       kept tail only                          (lower baseline, chance)
    latent        memory(removed tokens) as prefix + kept tail
    oracle_digit  embedding of the gold digit as prefix + kept tail
    oracle_kv     embeddings of the gold statement as prefix + kept tail
    oracle_slots  the reader's embeddings at the value digit of every removed statement
                  (one vector per statement, its key carried by the token shift) + kept
                  tail: what a perfect query-agnostic compressor of K >= n_removed slots
                  could hand over

A prefix is inserted right after BOS as `inputs_embeds`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import attrs
import torch
from torch import nn

from engram_core.components import BuildContext, Head
from engram_core.config import ConfigError, field, non_negative, one_of, positive
from engram_core.nn import CausalTransformer, CausalTransformerConfig

from .lora import AdapterSwitch, add_lora

MODES = ("full", "summary", "discard", "latent", "oracle_digit", "oracle_kv", "oracle_slots")
VIEW = {
    "full": "full",
    "summary": "summary",
    "discard": "kept",
    "latent": "kept",
    "oracle_digit": "kept",
    "oracle_kv": "kept",
    "oracle_slots": "kept",
}
ORACLE_MODES = ("oracle_digit", "oracle_kv")  # need the gold fields; oracle_slots needs only the removed tokens
# bump when pretraining produces other weights for the same inputs (the cache key also holds
# the source of this module and of the code it trains through)
READER_VERSION = 4


def model_path(inst, attribute, value):
    """'' (not given), `engram:NAME` (a model made here, engram_core.lm) or a path that exists."""
    if not value:
        return
    if value.startswith("engram:"):
        from engram_core.lm import preset

        preset(value, attribute.name)  # an unknown name is one line naming the models there are
    elif not Path(value).expanduser().exists():
        raise ConfigError(attribute.name, f"path does not exist: {value} (a local model directory or 'engram:NAME')")


@attrs.frozen
class ReaderConfig:
    """A causal LM reader (core transformer trained here, or a local HF model) with optional LoRA."""

    backend: str = field("core", help="'core' (engram_core.nn.CausalTransformer) or 'hf' (local AutoModelForCausalLM dir)",
                         validator=one_of("core", "hf"))
    dim: int = field(64, help="core: model width", validator=positive)
    n_layers: int = field(2, help="core: decoder blocks", validator=positive)
    n_heads: int = field(4, help="core: attention heads (must divide dim)", validator=positive)
    max_len: int = field(512, help="core: longest sequence incl. prefix memory", validator=positive)
    hf_path: str = field("", help="hf: local directory saved by save_pretrained, or 'engram:NAME' (the general LM made "
                                  "here, engram_core.lm: pretrained into the cache if missing)", validator=model_path)
    hf_init: str = field("pretrained", help="hf: 'pretrained' (the model's weights) or 'random' (a fresh initialisation of "
                                            "the same architecture: the control for what pretraining gives a reader)",
                         validator=one_of("pretrained", "random"))
    token_shift: int = field(5, help="core: add the previous 1..n token embeddings, each through its own projection, "
                                     "to every token's embedding (0 = off) so a key can be matched by one attention layer",
                             validator=non_negative)
    shift_mode: str = field("fixed", help="core: 'fixed' (random orthogonal projections, not trained) or 'learned' (zero-init linears)",
                            validator=one_of("fixed", "learned"))
    lora_rank: int = field(0, help="rank of the reader's LoRA adapter; 0 = none", validator=non_negative)
    lora_alpha: float = field(16.0, help="LoRA scale numerator (update = BA·alpha/rank)", validator=positive)
    lora_targets: list[str] = field(
        factory=list, help="attribute names of the linear layers that get LoRA; [] = qkv,proj (core) or q_proj,v_proj (hf)"
    )
    lora_impl: str = field("auto", help="'builtin' (named switchable adapters), 'peft', or 'auto' (peft for hf, builtin for core)",
                           validator=one_of("auto", "builtin", "peft"))

    def __attrs_post_init__(self):
        if self.backend == "hf" and not self.hf_path:
            raise ConfigError("hf_path", "backend 'hf' needs hf_path, a local directory with a saved causal LM")
        if self.dim % self.n_heads:
            raise ConfigError("n_heads", f"must divide dim ({self.dim}), got {self.n_heads}")


def _load_hf_lm(name: str, spec, build: BuildContext, random_init: bool = False):
    """The HF reader's model: from its folder, or for `engram:NAME` the general LM made here
    (pretrained into the cache by a run if missing). A check (`build.dry_run`, built on the
    meta device) builds the architecture from the config alone and reads no weights; for an
    `engram:NAME` that is not cached yet, a model of its shape, so `engram validate` never pretrains.
    `random_init`: the same architecture freshly initialised (torch's generator, seeded by the
    run), its weights never read (an `engram:NAME` is then not pretrained either)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from engram_core.lm import quiet_transformers

    data_tok = getattr(spec, "tokenizer", "")
    if name.startswith("engram:"):
        from engram_core.lm import cached_model, resolve_model, skeleton_model

        if data_tok != name and str(data_tok).startswith("engram:"):
            raise ConfigError("hf_path", f"the reader is {name} but the data are tokenized by {data_tok}; "
                                         f"set data.tokenizer = {name!r}")
        if random_init:
            return skeleton_model(name, key="hf_path")
        if build.dry_run:
            path = cached_model(name, build.cache_dir)
            if path is None:
                return skeleton_model(name, key="hf_path")
        else:
            path = resolve_model(name, build.cache_dir, key="hf_path")
    else:
        path = Path(name).expanduser()
    if build.dry_run or random_init:
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, local_files_only=True))
    with quiet_transformers():
        # float32 by `.to()` rather than a from_pretrained keyword: that keyword is `torch_dtype`
        # before transformers 4.56 and `dtype` after, and `.to()` means the same on every version
        return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).to(torch.float32)


class CompressorReader(Head):
    """Reader LM for the compressor: `answer_logits(batch, mode)` → (B, vocab) at the answer position."""

    def __init__(self, cfg: ReaderConfig, build: BuildContext):
        super().__init__()
        self.cfg = cfg
        spec = build.spec
        self.vocab_size = spec.vocab_size
        self.answer_token_ids = tuple(spec.answer_token_ids)
        self.bos_id = int(spec.bos_id)
        self.adapters = AdapterSwitch(("reader",))
        self._cache_dir = build.cache_dir
        self._peft = False
        if cfg.backend == "core":
            need = spec.max_full_len + spec.max_gold_len
            if need > cfg.max_len:
                raise ConfigError("max_len", f"must hold the longest prompt plus a gold prefix ({need} tokens), got {cfg.max_len}")
            self.lm = CausalTransformer(
                CausalTransformerConfig(vocab_size=spec.vocab_size, dim=cfg.dim, n_layers=cfg.n_layers,
                                        n_heads=cfg.n_heads, max_len=cfg.max_len)
            )
            self.width = cfg.dim
            default_targets = ["qkv", "proj"]
            # "smeared keys": with learned absolute positions, heads that look a fixed number of
            # tokens back form slowly, and key lookup (a two-byte key) needs them. Handing each
            # token its predecessors makes the lookup a one-layer match. Zero init: a no-op at first.
            if cfg.shift_mode == "learned":
                self.shift = nn.Parameter(torch.zeros(cfg.token_shift, cfg.dim, cfg.dim))
            else:  # a fixed rotation per offset keeps predecessors apart without Adam noise (a buffer: never trained)
                rot = torch.stack([nn.init.orthogonal_(torch.empty(cfg.dim, cfg.dim)) for _ in range(cfg.token_shift)]
                                  or [torch.empty(0, cfg.dim, cfg.dim)]).reshape(cfg.token_shift, cfg.dim, cfg.dim)
                self.register_buffer("shift", rot)
        else:
            if getattr(spec, "tokenizer", "byte") == "byte":  # said before anything is loaded
                raise ConfigError("backend", f"the HF reader in {cfg.hf_path!r} reads its own tokenizer's ids, but the data "
                                             "are byte tokens: set data.tokenizer to the model's directory (or its "
                                             "'engram:NAME')")
            self.lm = _load_hf_lm(cfg.hf_path, spec, build, random_init=cfg.hf_init == "random")
            hf_vocab = self.lm.config.vocab_size
            if hf_vocab < spec.vocab_size:
                raise ConfigError("hf_path", f"the model's vocabulary ({hf_vocab}) is smaller than the data tokenizer's ({spec.vocab_size}); "
                                             "data.tokenizer must be the model's own")
            self.width = self.lm.config.hidden_size
            default_targets = ["q_proj", "v_proj"]
        self.lora_targets = list(cfg.lora_targets) or default_targets
        if cfg.lora_rank > 0:
            impl = cfg.lora_impl if cfg.lora_impl != "auto" else ("peft" if cfg.backend == "hf" else "builtin")
            if impl == "peft":
                from peft import LoraConfig, get_peft_model, inject_adapter_in_model

                lora_cfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=self.lora_targets, lora_dropout=0.0)
                if cfg.backend == "hf":
                    self.lm = get_peft_model(self.lm, lora_cfg)
                else:  # peft also adapts a plain nn.Module (checked: identical outputs before training)
                    self.lm = inject_adapter_in_model(lora_cfg, self.lm)
                # peft freezes the base model; the recipe's train/freeze globs decide instead
                for p in self.lm.parameters():
                    p.requires_grad_(True)
                self._peft = True
            else:
                self.add_adapter("reader", cfg.lora_rank, cfg.lora_alpha)

    # ---- adapters --------------------------------------------------------------------

    def add_adapter(self, name: str, rank: int, alpha: float, targets: list[str] | None = None) -> None:
        n = add_lora(self.lm, name, rank, alpha, targets or self.lora_targets, self.adapters)
        if n == 0:
            raise ConfigError("lora_targets", f"no linear layer named {targets or self.lora_targets} in the reader")

    # ---- pretraining (a `fit` stage), cached by everything that determines the weights ------------------------------

    def _base_state(self) -> dict[str, torch.Tensor]:
        """The reader's own weights under LoRA-independent names (no adapters, no `.base.`)."""
        return {k.replace(".base.", "."): v for k, v in self.state_dict().items() if ".lora." not in k and "lora_" not in k}

    def _load_base_state(self, state: dict[str, torch.Tensor]) -> None:
        own = self.state_dict()
        by_plain = {k.replace(".base.", "."): k for k in own if ".lora." not in k and "lora_" not in k}
        missing = set(by_plain) - set(state)
        if missing:
            raise ConfigError("head", f"cached reader does not match this reader ({len(missing)} tensors missing)")
        wrong = [k for k in by_plain if tuple(state[k].shape) != tuple(own[by_plain[k]].shape)]
        if wrong:  # checked before anything is copied, so a bad file leaves the reader as it was
            raise ConfigError("head", f"cached reader does not match this reader (shape of {wrong[0]})")
        self.load_state_dict({by_plain[k]: v for k, v in state.items() if k in by_plain}, strict=False)

    def pretrain_cache_entry(self, ctx, opts: dict, cache: bool = True):
        """The cache entry of the reader `pretrain(ctx, **opts)` would make.

        Keyed by everything that determines the weights: the full reader config, the full
        data config and the key of its episodes (data config, seed, data code), the
        pretraining options, the split, the seed and the full state of `ctx.generator`, a
        digest of the reader's weights before pretraining (its initialisation, or the loaded
        HF weights), the device type, READER_VERSION and the source of the modules that
        build it (this one, the objectives, the data set, LoRA switch, the core transformer).
        """
        from engram_core import cache as cache_mod
        from engram_core.nn import transformer

        from . import data, lora, objectives

        dataset = ctx.dataset
        config = {  # the pretraining options first: they are what `engram cache list` shows
            "pretrain": {**opts, "split": ctx.split},
            "reader": self.cfg,
            "data": getattr(dataset, "cfg", None),
        }
        data_key = dataset.cache_entry().key if hasattr(dataset, "cache_entry") else None
        inputs = {
            "data_key": data_key,
            "init_weights": cache_mod.tensors_digest(self._base_state()),
            "generator_state": cache_mod.generator_digest(ctx.generator),
            "device": torch.device(ctx.device).type,
        }
        root = getattr(self, "_cache_dir", None) if cache else None
        return cache_mod.entry(root, plugin="qwen-compressor", kind="reader", config=config,
                               seed=int(ctx.generator.initial_seed()), version=READER_VERSION,
                               builder=[sys.modules[__name__], objectives, data, lora, transformer],
                               ext="pt", inputs=inputs)

    def pretrain(self, ctx, steps: int = 1200, lr: float = 3e-3, batch_size: int = 32, modes: list | None = None,
                 budgets: list | None = None, warmup: int = 50, grad_clip: float = 1.0, lm_weight: float = 0.0,
                 cache: bool = True) -> None:
        """Train the reader (not its adapters) on answer CE in `modes` (default: the summary view
        at random budgets), so the summary baseline is near 100 %; `lm_weight` > 0 adds
        next-token CE on the full prompt (a reader that can regenerate text, for autoencoding). The result is cached under
        `<cache_dir>/qwen-compressor/reader-<key>.pt` (see `pretrain_cache_entry` for what the key
        covers): a recipe reuses it only when everything that determines the weights is equal."""
        from engram_core import cache as cache_mod

        modes = list(modes or ["summary"])
        for m in modes:
            if m not in ("full", "summary", "oracle_kv"):
                raise ConfigError("modes", f"reader pretraining uses text views: 'full', 'summary', 'oracle_kv'; got {m!r}")
        dataset = ctx.dataset
        budgets = list(budgets or dataset.spec.budgets)
        if steps <= 0 or lr <= 0 or batch_size <= 0:
            raise ConfigError("steps", "steps, lr and batch_size must be > 0")
        if lm_weight < 0:
            raise ConfigError("lm_weight", f"must be >= 0, got {lm_weight}")
        opts = {"steps": steps, "lr": lr, "batch_size": batch_size, "modes": modes, "budgets": budgets,
                "warmup": warmup, "grad_clip": grad_clip, "lm_weight": lm_weight}
        e = self.pretrain_cache_entry(ctx, opts, cache)

        def load(path):
            self._load_base_state(torch.load(path, weights_only=True, map_location=ctx.device))

        cache_mod.load_or_build(e, lambda: self._pretrain(ctx, **opts),
                                save_fn=lambda _, p: torch.save(self._base_state(), p), load_fn=load)

    def _pretrain(self, ctx, steps, lr, batch_size, modes, budgets, warmup, grad_clip, lm_weight) -> None:
        import math
        import time

        from .objectives import answer_ce, text_ce

        dataset = ctx.dataset
        params = [p for n, p in self.named_parameters() if ".lora." not in n and "lora_" not in n]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.train()
        t0 = time.perf_counter()
        run_ce, run_acc, n = 0.0, 0.0, 0
        with self.adapters.only(()):  # pretrain the plain reader, adapters off
            for step in range(steps):
                frac = min(1.0, (step + 1) / max(warmup, 1))
                decay = 0.5 * (1 + math.cos(math.pi * step / steps))
                for g in opt.param_groups:
                    g["lr"] = lr * frac * max(decay, 0.02)
                budget = budgets[int(torch.randint(0, len(budgets), (1,), generator=ctx.generator))]
                batch = dataset.sample(ctx.split, batch_size, ctx.generator, budget=budget)
                batch = {k: v.to(ctx.device) for k, v in batch.items()}
                loss, acc = 0.0, 0.0
                for m in modes:
                    ce, a, _ = answer_ce(self, batch, m, digits_only=False)
                    loss, acc = loss + ce / len(modes), acc + float(a) / len(modes)
                if lm_weight > 0:  # next-token CE on the whole prompt: a reader that can also regenerate text
                    loss = loss + lm_weight * text_ce(self, None, batch["full_ids"], batch["full_mask"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
                opt.step()
                run_ce, run_acc, n = run_ce + float(loss.detach()), run_acc + acc, n + 1
                if (step + 1) % 50 == 0 or step + 1 == steps:
                    if ctx.logger is not None:
                        ctx.logger.scalar("pretrain/ce", run_ce / n, ctx.step + step + 1)
                        ctx.logger.scalar("pretrain/acc", run_acc / n, ctx.step + step + 1)
                    print(f"  pretrain {step + 1}/{steps}  ce {run_ce / n:.3f}  acc {run_acc / n:.3f}  "
                          f"{time.perf_counter() - t0:.0f}s", flush=True)
                    run_ce, run_acc, n = 0.0, 0.0, 0
        self.eval()

    # ---- the LM ---------------------------------------------------------------------

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self.cfg.backend != "core":
            return self.lm.get_input_embeddings()(ids)
        e = self.lm.embed(ids)
        out = e
        for i in range(1, min(self.shift.shape[0], e.shape[1] - 1) + 1):
            prev = torch.cat([e.new_zeros(e.shape[0], i, e.shape[2]), e[:, :-i]], dim=1)
            out = out + prev @ self.shift[i - 1].to(e.dtype).t()
        return out

    def run(self, embeds: torch.Tensor, mask: torch.Tensor, hidden: bool = False):
        """Logits (B, T, V) [and last hidden states (B, T, D)] for `inputs_embeds`."""
        if self.cfg.backend == "core":
            if embeds.shape[1] > self.cfg.max_len:
                raise ConfigError("max_len", f"a reader input of {embeds.shape[1]} tokens exceeds head.max_len {self.cfg.max_len}")
            logits, _, h = self.lm(inputs_embeds=embeds, attention_mask=mask, return_hidden=True)
            return (logits, h) if hidden else logits
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=hidden)
        return (out.logits, out.hidden_states[-1]) if hidden else out.logits

    def write_memory(self, batch: dict) -> torch.Tensor:
        """The attached memory's vectors for `batch` (B, K, width)."""
        if getattr(getattr(self.memory, "cfg", None), "query_aware", False):
            return self.memory(batch["removed_ids"], batch["removed_mask"], batch["question_ids"], batch["question_mask"])
        return self.memory.write_context(batch["removed_ids"], batch["removed_mask"])  # the `context` point

    def prefix_for(self, batch: dict, mode: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(prefix embeddings (B,K,D), prefix mask (B,K)) for `mode`, or (None, None)."""
        if mode == "latent":
            if not self.memory_active:
                raise ConfigError("mode", "mode 'latent' needs a memory table (e.g. [memory] type = \"mem_encoder\")")
            # a memory with `context_mask` (the parameter-free `gather`) says which slots hold something;
            # the learned memories fill every slot
            slot_mask = getattr(self.memory, "context_mask", None)
            mask = slot_mask(batch["removed_ids"], batch["removed_mask"]) if slot_mask is not None else None
            return self.write_memory(batch), mask
        if mode == "oracle_slots":
            emb = self.embed(batch["removed_ids"])  # the token shift runs over the removed text, as when it was read
            pos = batch["removed_value_pos"]
            rows = torch.arange(emb.shape[0], device=emb.device)[:, None].expand_as(pos)
            return emb[rows, pos], batch["removed_value_mask"]
        if mode in ORACLE_MODES:
            key = "gold_digit_ids" if mode == "oracle_digit" else "gold_kv_ids"
            if key not in batch:
                raise ConfigError("mode", f"mode {mode!r} needs gold fields in the batch: set data.gold_fields = true")
            ids = batch[key]
            mask = batch["gold_kv_mask"] if mode == "oracle_kv" else torch.ones_like(ids)
            return self.embed(ids), mask
        return None, None

    def reader_input(self, batch: dict, mode: str, ids: torch.Tensor | None = None):
        """(embeddings, mask, answer position, prefix or None) of `mode`'s reader input: the
        view's tokens (or `ids` in its place, same shape) with the prefix right after BOS."""
        if mode not in MODES:
            raise ConfigError("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
        view = VIEW[mode]
        mask, pos = batch[f"{view}_mask"], batch[f"{view}_answer_pos"]
        emb = self.embed(batch[f"{view}_ids"] if ids is None else ids)
        prefix, pmask = self.prefix_for(batch, mode)
        if prefix is not None:
            if prefix.shape[-1] != self.width:
                raise ConfigError("out_dim", f"memory vectors have width {prefix.shape[-1]}, the reader's is {self.width}")
            if pmask is None:
                pmask = mask.new_ones(prefix.shape[:2])
            emb = torch.cat([emb[:, :1], prefix.to(emb.dtype), emb[:, 1:]], dim=1)
            mask = torch.cat([mask[:, :1], pmask.to(mask.dtype), mask[:, 1:]], dim=1)
            pos = pos + prefix.shape[1]
        return emb, mask, pos, prefix

    def answer_logits(self, batch: dict, mode: str, return_prefix: bool = False):
        emb, mask, pos, prefix = self.reader_input(batch, mode)
        logits = self.run(emb, mask)
        out = logits[torch.arange(logits.shape[0], device=logits.device), pos]
        return (out, prefix) if return_prefix else out

    def answer_span_logits(self, batch: dict, mode: str, length: int, return_prefix: bool = False):
        """Teacher-forced logits (B, length, V) of a multi-token answer: the view holds the answer
        after the question, and position `answer_pos + j` predicts answer token j."""
        emb, mask, pos, prefix = self.reader_input(batch, mode)
        logits = self.run(emb, mask)
        at = pos[:, None] + torch.arange(length, device=pos.device)[None]
        out = logits.gather(1, at[..., None].expand(-1, -1, logits.shape[-1]))
        return (out, prefix) if return_prefix else out

    @torch.no_grad()
    def greedy_answer(self, batch: dict, mode: str, steps: int) -> torch.Tensor:
        """The reader's greedy generation of `steps` tokens after the question, (B, steps): each
        step's argmax is written into the view in place of the teacher token there, so the next
        step reads the reader's own answer (causal: a position sees nothing after it)."""
        view = VIEW[mode]
        ids = batch[f"{view}_ids"].clone()
        pos = batch[f"{view}_answer_pos"]
        if int((pos + steps).max()) >= ids.shape[1]:
            raise ConfigError("steps", f"the {view} view has no room for {steps} generated tokens")
        rows = torch.arange(ids.shape[0], device=ids.device)
        out = []
        for j in range(steps):
            emb, mask, ppos, _ = self.reader_input(batch, mode, ids=ids)
            token = self.run(emb, mask)[rows, ppos + j].argmax(-1)
            out.append(token)
            ids[rows, pos + j + 1] = token
        return torch.stack(out, 1)

    def digit_logits(self, answer_logits: torch.Tensor) -> torch.Tensor:
        """Logits restricted to the ten digit tokens, (B, 10)."""
        return answer_logits[:, list(self.answer_token_ids)]

    def forward(self, batch: dict, mode: str = "latent"):
        return self.answer_logits(batch, mode)
