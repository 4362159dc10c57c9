"""A small causal transformer (GPT-style, pre-norm, learned positions), in the spirit of nanoGPT.

Shared by plugins that need a language model that trains from scratch offline:
the llm-hash base model, the qwen-compressor reader. It supports

* ``input_ids`` or ``inputs_embeds`` (prefix memory vectors enter this way),
* a KV cache for generation (``use_cache=True``), whose ``ids`` field keeps every
  token id seen so far, so a memory that hashes n-grams sees the history even
  when generation passes only the newest token,
* ``block_hooks``: callables ``hook(index, hidden, ids, positions) -> hidden`` run
  after decoder block ``index`` (how a `layer` memory is injected),
* ``window``: sliding-window attention (each position sees the `window` most recent
  positions, itself included); the first ``n_global`` positions of a sequence (prefix
  memory vectors) stay visible to every position, window or not,
* ``logit_positions``: logits only at chosen positions (B, K) instead of all of them,
  so a loss that scores a few positions does not project every one onto the vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from ..config import field, non_negative, positive


@attrs.frozen
class CausalTransformerConfig:
    vocab_size: int = field(259, help="vocabulary size", validator=positive)
    dim: int = field(128, help="model width", validator=positive)
    n_layers: int = field(4, help="number of decoder blocks", validator=positive)
    n_heads: int = field(4, help="attention heads; must divide dim", validator=positive)
    max_len: int = field(512, help="longest sequence (learned positions)", validator=positive)
    dropout: float = field(0.0, help="dropout on attention and MLP outputs")
    mlp_ratio: int = field(4, help="MLP hidden width = mlp_ratio * dim", validator=positive)
    tie_embeddings: bool = field(True, help="share the token embedding and output projection")
    window: int = field(0, help="sliding attention window in positions (0 = full causal attention)", validator=non_negative)

    def __attrs_post_init__(self):
        if self.dim % self.n_heads:
            from ..errors import ConfigError

            raise ConfigError("n_heads", f"must divide dim ({self.dim}), got {self.n_heads}")


class _Block(nn.Module):
    def __init__(self, cfg: CausalTransformerConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.dim)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.ln2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, cfg.mlp_ratio * cfg.dim), nn.GELU(), nn.Linear(cfg.mlp_ratio * cfg.dim, cfg.dim)
        )
        self.drop = nn.Dropout(cfg.dropout)
        self.p_drop = cfg.dropout
        self.window = cfg.window

    def forward(self, x, past: tuple[torch.Tensor, torch.Tensor] | None, attn_mask: torch.Tensor | None, n_global: int = 0):
        b, t, d = x.shape
        h = self.n_heads
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q = q.view(b, t, h, d // h).transpose(1, 2)
        k = k.view(b, t, h, d // h).transpose(1, 2)
        v = v.view(b, t, h, d // h).transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        s = k.shape[2]
        p_drop = self.p_drop if self.training else 0.0
        if past is None and not self.window and attn_mask is None:
            # plain causal attention: no mask tensor, so SDPA may take its fused (flash) kernels
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p_drop)
            return self._finish(x, y, b, t, d), (k, v)
        # causal mask over the whole (past + new) key range, plus padding
        causal = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(diagonal=s - t)
        if self.window:
            # key index = absolute position (the cache holds every earlier position)
            q_pos = torch.arange(s - t, s, device=x.device)[:, None]
            k_pos = torch.arange(s, device=x.device)[None]
            causal = causal & ((q_pos - k_pos < self.window) | (k_pos < n_global))
        mask = causal[None, None]
        if attn_mask is not None:
            mask = mask & attn_mask[:, None, None, :s].bool()
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p_drop)
        return self._finish(x, y, b, t, d), (k, v)

    def _finish(self, x, y, b: int, t: int, d: int):
        """The heads' outputs (B, H, t, d/H) projected and added; then the MLP."""
        y = y.transpose(1, 2).reshape(b, t, d)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.mlp(self.ln2(x)))


class CausalTransformer(nn.Module):
    """GPT-style decoder. ``forward`` returns ``(logits, cache)``; cache is None without use_cache."""

    def __init__(self, cfg: CausalTransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Embedding(cfg.max_len, cfg.dim)
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok.weight
        self.block_hooks: list[Callable] = []
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    @property
    def dim(self) -> int:
        return self.cfg.dim

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.tok(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: dict | None = None,
        use_cache: bool = False,
        return_hidden: bool = False,
        n_global: int = 0,
        logit_positions: torch.Tensor | None = None,
    ):
        """`n_global`: the first positions that every position may attend to under a
        sliding window (prefix memory vectors); kept in the cache for later steps.

        `logit_positions` (B, K) long: the logits are those of these positions only, (B, K,
        vocab): the final hidden states are gathered there (after `ln_f`) before the output
        projection. The returned hidden states stay (B, T, dim)."""
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("give input_ids or inputs_embeds")
            inputs_embeds = self.tok(input_ids)
        b, t, _ = inputs_embeds.shape
        past_len = 0 if cache is None else cache["length"]
        if cache is not None:
            n_global = cache.get("n_global", 0)
        if past_len + t > self.cfg.max_len:
            raise ValueError(f"sequence of {past_len + t} tokens exceeds max_len {self.cfg.max_len}")
        positions = torch.arange(past_len, past_len + t, device=inputs_embeds.device)
        x = inputs_embeds + self.pos(positions)[None]
        ids = input_ids
        if cache is not None and cache.get("ids") is not None and input_ids is not None:
            ids = torch.cat([cache["ids"], input_ids], dim=1)
        if attention_mask is not None and cache is not None and cache.get("mask") is not None:
            attention_mask = torch.cat([cache["mask"], attention_mask], dim=1)
        elif attention_mask is None and cache is not None and cache.get("mask") is not None:
            attention_mask = torch.cat([cache["mask"], cache["mask"].new_ones(b, t)], dim=1)
        new_kv = []
        for i, block in enumerate(self.blocks):
            past = None if cache is None else cache["kv"][i]
            x, kv = block(x, past, attention_mask, n_global)
            new_kv.append(kv)
            for hook in self.block_hooks:
                x = hook(i, x, ids, positions)
        hidden = self.ln_f(x)
        if logit_positions is None:
            logits = self.lm_head(hidden)
        else:
            index = logit_positions[..., None].expand(-1, -1, hidden.shape[-1])
            logits = self.lm_head(hidden.gather(1, index))
        new_cache = None
        if use_cache:
            new_cache = {"kv": new_kv, "length": past_len + t, "ids": ids, "mask": attention_mask, "n_global": n_global}
        if return_hidden:
            return logits, new_cache, hidden
        return logits, new_cache

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        use_cache: bool = True,
        eos_id: int | None = None,
        attention_mask: torch.Tensor | None = None,
        prefix_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Greedy decoding; returns only the new tokens (B, ≤ max_new_tokens).

        `prefix_embeds` (B, P, dim) are placed before the prompt (latent memory).
        """
        was_training = self.training
        self.eval()
        ids = input_ids
        out = []
        cache = None
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)

        def full_embeds(all_ids):
            e = self.tok(all_ids)
            return e if prefix_embeds is None else torch.cat([prefix_embeds, e], dim=1)

        def full_mask(mask):
            if mask is None or prefix_embeds is None:
                return mask
            return torch.cat([mask.new_ones(mask.shape[0], prefix_embeds.shape[1]), mask], dim=1)

        mask = attention_mask
        for _ in range(max_new_tokens):
            if use_cache:
                if cache is None and prefix_embeds is None:
                    logits, cache = self(input_ids=ids, attention_mask=mask, use_cache=True)
                elif cache is None:
                    logits, cache = self(inputs_embeds=full_embeds(ids), attention_mask=full_mask(mask), use_cache=True,
                                         n_global=prefix_embeds.shape[1])
                    cache["ids"] = None  # prefix positions carry no token ids
                else:
                    logits, cache = self(input_ids=out[-1][:, None], cache=cache, use_cache=True)
            else:
                seq = ids if not out else torch.cat([ids, torch.stack(out, 1)], dim=1)
                m = None
                if mask is not None:
                    m = torch.cat([mask, mask.new_ones(mask.shape[0], seq.shape[1] - mask.shape[1])], dim=1)
                if prefix_embeds is None:
                    logits, _ = self(input_ids=seq, attention_mask=m)
                else:
                    logits, _ = self(inputs_embeds=full_embeds(seq), attention_mask=full_mask(m), n_global=prefix_embeds.shape[1])
            nxt = logits[:, -1].argmax(-1)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done = done | (nxt == eos_id)
            out.append(nxt)
            if eos_id is not None and bool(done.all()):
                break
        self.train(was_training)
        return torch.stack(out, 1)
