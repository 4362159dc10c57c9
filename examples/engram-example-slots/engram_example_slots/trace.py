"""A fast-weight trace written only against `engram_core.points.TracePoint`.

Each write position adds the outer product of a key and a value to one matrix per
sequence, ``M = Σ_t g_t · k_t v_tᵀ`` (keys L2-normalised, g_t a learned write gate times
the head's write mask); a query reads ``W_o(q_tᵀ M)``. Nothing in it knows which head
calls it: any head that offers the `trace` point (the core `causal_backbone`, deq-hrr's
DEQ classifier) can use it. The read has no bias, so an empty trace reads zeros.
"""

from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from engram_core import BuildContext, Memory, field
from engram_core.config import ConfigError, positive
from engram_core.points import TracePoint


@attrs.frozen
class OuterProductTraceConfig:
    key_dim: int = field(32, help="width of keys and queries", validator=positive)
    value_dim: int = field(32, help="width of the stored values", validator=positive)
    write_gate_bias: float = field(0.0, help="initial write gate logit")


class OuterProductTraceMemory(Memory, TracePoint):
    """Fast-weight (linear-attention) trace: M = Σ g·k vᵀ, read W_o(qᵀM)."""

    independent_batch_items = True

    def __init__(self, cfg: OuterProductTraceConfig, build: BuildContext):
        super().__init__()
        width = getattr(build.head, "width", None) or getattr(build.head, "state_dim", None)
        if width is None:
            raise ConfigError("type", "outer_product_trace needs a head with a `width` (its hidden size)")
        self.key = nn.Linear(width, cfg.key_dim, bias=False)
        self.query = nn.Linear(width, cfg.key_dim, bias=False)
        self.value = nn.Linear(width, cfg.value_dim, bias=False)
        self.gate = nn.Linear(width, 1)
        nn.init.constant_(self.gate.bias, cfg.write_gate_bias)
        self.out = nn.Linear(cfg.value_dim, width, bias=False)
        self.cfg = cfg

    def empty_trace(self, batch_size, device, dtype):
        return torch.zeros(batch_size, self.cfg.key_dim, self.cfg.value_dim, device=device, dtype=dtype)

    def write_trace(self, states, write_mask, key_states=None):
        k = F.normalize(self.key(states if key_states is None else key_states), dim=-1)
        v = self.value(states)
        g = torch.sigmoid(self.gate(states)).squeeze(-1)
        if write_mask is not None:
            g = g * write_mask.to(g.dtype)
        return torch.einsum("bt,btk,btv->bkv", g, k, v)

    def read_trace(self, trace, queries):
        q = F.normalize(self.query(queries), dim=-1)
        return self.out(torch.einsum("bqk,bkv->bqv", q, trace))
