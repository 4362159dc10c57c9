"""The `hrr` memory: a holographic trace written and read while a sequence is processed.

Given the head's per-position states ``h (B, T, H)``, a write mask and one query state
per sequence, the memory

1. projects keys ``k_t``, values ``v_t`` (optionally spectrally normalised,
   `spectral_norm_keys`; optionally unitary keys) and a write gate ``g_t``;
2. superposes the bound pairs into one trace per sequence,
   ``m_t = α·m_{t-1} + β·g_t·(k_t ⊛ v_t)`` — α is the decay, β the write strength —
   renormalised to unit norm after every write (``renorm = "per_write"``), once at the
   end (``"final"``) or never (``"none"``). Under ``per_write`` the trace is a unit
   vector before each write, so α only sets the ratio β/α: (α, β) and (1, β/α) give the
   same trace exactly. α < 1 is therefore refused there; it is a forgetting horizon of
   about 1/(1−α) writes under ``final`` and ``none``;
3. reads by unbinding with the query key, ``r = q # m`` (or a regularised inverse);
4. cleans the read up against learned prototypes (``cleanup_mode = "softmax"``: a softmax
   over cosine similarities with `cleanup_temp`; read sharpening keeps the `sharpen_topk`
   best prototypes and divides by `sharpen_temp`), and
5. returns ``gate · W_out(cleaned)`` — a read gate computed from the query state, so a
   closed gate passes the head's state through unchanged.

The trace itself lives for one forward pass (one batch of sequences); what persists is
the parameters and the diagnostics of the last evaluation, which `reset()` clears.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from engram_core.components import BuildContext, Memory
from engram_core.config import ConfigError, field, in_range, non_negative, one_of, positive

from ..hrr import bind, bind_dft, check_fft_dim, cosine, dft_matrices, make_unitary, unbind, unbind_dft


def _fft_dim(inst, attribute, value):
    check_fft_dim(value, attribute.name)


@attrs.frozen
class HRRMemoryConfig:
    """Keys/values bound by circular convolution into one superposed trace per sequence."""

    dim: int = field(128, help="HRR dimension d of keys, values and the trace (even, prime factors <= 7)", validator=_fft_dim)
    alpha: float = field(1.0, help="trace decay α per write: m ← α·m + β·g·(k⊛v); 1 keeps every write; "
                                         "must be 1 under renorm = 'per_write', where it would only rescale β", validator=in_range(0.0, 1.0))
    beta: float = field(1.0, help="write strength β", validator=positive)
    n_buckets: int = field(1, help="traces per sequence; a key writes to / a query reads from the bucket chosen by a "
                                    "fixed random projection (1 = a single trace)", validator=positive)
    renorm: str = field("per_write", help="trace renormalisation: 'per_write' (unit norm after each write), 'final', 'none'",
                        validator=one_of("per_write", "final", "none"))
    unbind: str = field("correlation", help="read by 'correlation' (involution, approximate inverse) or 'inverse' (regularised exact)",
                        validator=one_of("correlation", "inverse"))
    binding: str = field("dft_matmul", help="how circular convolution is computed: 'fft' (torch.fft) or 'dft_matmul' "
                                            "(dense real DFT matrices; same result, faster autograd on CPU for d <= ~512)",
                         validator=one_of("fft", "dft_matmul"))
    unitary_keys: bool = field(False, help="project keys to unitary vectors (|F(k)|=1): unbinding one pair is then exact")
    spectral_norm_keys: bool = field(True, help="spectral normalisation of the key/value/query projections")
    tie_query_key: bool = field(True, help="read queries use the key projection (else a separate query projection)")
    cleanup_mode: str = field("softmax", help="prototype cleanup of reads: 'softmax', 'hard' (nearest, straight-through), 'none'",
                              validator=one_of("softmax", "hard", "none"))
    cleanup_temp: float = field(0.1, help="temperature of the softmax cleanup over cosine similarities", validator=positive)
    sharpen_topk: int = field(0, help="read sharpening: keep only the k most similar prototypes (0 = all)", validator=non_negative)
    sharpen_temp: float = field(1.0, help="read sharpening: extra temperature divisor applied to the kept scores", validator=positive)
    n_prototypes: int = field(0, help="cleanup prototypes; 0 = the data set's number of classes", validator=non_negative)
    write_gate_bias: float = field(-2.0, help="initial bias of the write gate (sigmoid); negative = writes start mostly closed")
    read_gate_bias: float = field(0.0, help="initial bias of the read gate (sigmoid)")
    collision_cos: float = field(0.5, help="telemetry: two written keys with |cos| above this count as a collision",
                                 validator=in_range(0.0, 1.0))
    write_threshold: float = field(0.5, help="telemetry: a position counts as written when its gate exceeds this",
                                   validator=in_range(0.0, 1.0))

    def __attrs_post_init__(self):
        if self.renorm == "per_write" and self.alpha != 1.0:
            raise ConfigError("alpha", f"α = {self.alpha} has no effect of its own under renorm = 'per_write' (the trace "
                                       f"is unit-norm before each write, so it only rescales β): use alpha = 1 and "
                                       f"beta = {self.beta / self.alpha:.6g}, or renorm = 'final' / 'none' for a decay")


class HRRMemory(Memory):
    """A holographic (HRR) trace: circular-convolution binding, superposition, unbinding reads."""

    independent_batch_items = True

    def __init__(self, cfg: HRRMemoryConfig, build: BuildContext):
        super().__init__()
        self.cfg = cfg
        head = build.head
        in_dim = getattr(head, "state_dim", None) or getattr(head, "width", None)
        if in_dim is None:
            raise ConfigError("type", "the hrr memory needs a head with a `state_dim` or `width` (e.g. deq_classifier, causal_backbone)")
        # a classifier's classes, else (a token-level head) one prototype per token
        n_proto = cfg.n_prototypes or int(build.spec.get("n_classes") or build.spec.vocab_size)
        if getattr(getattr(head, "cfg", None), "read_logits", False) and n_proto != int(build.spec.n_classes):
            raise ConfigError("n_prototypes", f"{n_proto} prototypes, but the head's read_logits needs one per class "
                                              f"({build.spec.n_classes}); set n_prototypes = 0 or head.read_logits = false")
        d = cfg.dim
        self.in_dim, self.dim, self.n_prototypes = in_dim, d, n_proto
        gen = torch.Generator().manual_seed(int(build.seed) + 7919)

        def proj(n_in, n_out):
            lin = nn.Linear(n_in, n_out)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(n_out, n_in, generator=gen) / math.sqrt(n_in))
                lin.bias.zero_()
            if cfg.spectral_norm_keys:
                lin = nn.utils.parametrizations.spectral_norm(lin)
            return lin

        self.key_proj = proj(in_dim, d)
        self.value_proj = proj(in_dim, d)
        self.query_proj = None if cfg.tie_query_key else proj(in_dim, d)
        self.write_gate = nn.Linear(in_dim, 1)
        self.read_gate = nn.Linear(in_dim, 1)
        with torch.no_grad():
            self.write_gate.weight.copy_(torch.randn(1, in_dim, generator=gen) * 0.01)
            self.write_gate.bias.fill_(cfg.write_gate_bias)
            self.read_gate.weight.copy_(torch.randn(1, in_dim, generator=gen) * 0.01)
            self.read_gate.bias.fill_(cfg.read_gate_bias)
        for name, mat in dft_matrices(d).items():  # binding as dense DFT matmuls (fast autograd on CPU)
            self.register_buffer(f"dft_{name}", mat, persistent=False)
        # fixed random bucket projection: addressing is deterministic and needs no gradient
        self.register_buffer("bucket_proj", torch.randn(cfg.n_buckets, d, generator=gen))
        self.prototypes = nn.Parameter(torch.randn(n_proto, d, generator=gen) / math.sqrt(d))
        self.out_proj = nn.Linear(d, in_dim)
        with torch.no_grad():
            self.out_proj.weight.copy_(torch.randn(in_dim, d, generator=gen) / math.sqrt(d))
            self.out_proj.bias.zero_()
        # diagnostics of the last forward pass (telemetry; cleared by reset)
        self.register_buffer("n_reads", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("last_trace_norm", torch.zeros(()), persistent=False)
        self.register_buffer("last_read_gate", torch.zeros(()), persistent=False)
        self.register_buffer("last_write_fraction", torch.zeros(()), persistent=False)
        self._last_gates: torch.Tensor | None = None

    # -- the three steps ---------------------------------------------------------

    def keys(self, h: torch.Tensor) -> torch.Tensor:
        k = self.key_proj(h)
        return make_unitary(k) if self.cfg.unitary_keys else F.normalize(k, dim=-1)

    def queries(self, h: torch.Tensor) -> torch.Tensor:
        if self.query_proj is None:
            return self.keys(h)
        q = self.query_proj(h)
        return make_unitary(q) if self.cfg.unitary_keys else F.normalize(q, dim=-1)

    def values(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.value_proj(h), dim=-1)

    def _dft(self) -> dict[str, torch.Tensor]:
        return {"cos": self.dft_cos, "sin": self.dft_sin, "icos": self.dft_icos, "isin": self.dft_isin}

    def bind(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return bind_dft(a, b, self._dft()) if self.cfg.binding == "dft_matmul" else bind(a, b)

    def unbind(self, trace: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        if self.cfg.binding == "dft_matmul":
            return unbind_dft(trace, key, self._dft(), mode=self.cfg.unbind)
        return unbind(trace, key, mode=self.cfg.unbind)

    def buckets(self, keys: torch.Tensor) -> torch.Tensor:
        """Bucket of each key: argmax of a fixed random projection (deterministic addressing)."""
        if self.cfg.n_buckets == 1:
            return torch.zeros(keys.shape[:-1], dtype=torch.long, device=keys.device)
        return (keys @ self.bucket_proj.T).argmax(-1)

    def write(self, keys: torch.Tensor, values: torch.Tensor, gates: torch.Tensor,
              buckets: torch.Tensor | None = None) -> torch.Tensor:
        """Superpose β·g_t·(k_t ⊛ v_t) into the bucket of k_t, with decay α → traces (B, K, d).

        Each bucket's trace follows m ← α·m + w_t over the writes that land in it; with
        ``per_write`` it is renormalised to unit norm after each of them.
        """
        cfg = self.cfg
        bound = self.bind(keys, values) * (cfg.beta * gates).unsqueeze(-1)  # (B, T, d)
        B, T, d = bound.shape
        K = cfg.n_buckets
        if buckets is None:
            buckets = self.buckets(keys)
        onehot = F.one_hot(buckets, K).to(bound.dtype)  # (B, T, K)
        # later[t] = number of writes after t into t's bucket (each decays write t by α once)
        later = (onehot.flip(1).cumsum(1).flip(1) - onehot).mul(onehot).sum(-1)  # (B, T)
        if cfg.alpha == 0:
            log_decay = torch.where(later == 0, torch.zeros_like(later), torch.full_like(later, float("-inf")))
        else:
            log_decay = later * math.log(cfg.alpha)
        if cfg.renorm == "per_write":
            # m_b after its last write is Σ_t c_t·w_t with c_t = α^{later_t} / Π_{s>=t, same bucket} n_s.
            # The normalisers n_s come from a sequential pass without gradient (constants in
            # backward), so the differentiable write stays one parallel sum: the forward value
            # is exact; backward ignores how n_s depends on the writes.
            with torch.no_grad():
                log_n = bound.new_zeros(B, T)
                m = bound.new_zeros(B, K, d)
                rows = torch.arange(B, device=bound.device)
                for t in range(T):
                    b = buckets[:, t]
                    cur = cfg.alpha * m[rows, b] + bound[:, t]
                    n = cur.norm(dim=-1)
                    n = torch.where(n > 1e-6, n, torch.ones_like(n))  # an (almost) empty trace is left as it is
                    m[rows, b] = cur / n.unsqueeze(-1)
                    log_n[:, t] = n.log()
                suffix = ((log_n.unsqueeze(-1) * onehot).flip(1).cumsum(1).flip(1) * onehot).sum(-1)  # Σ_{s>=t, same bucket}
                coef = (log_decay - suffix).exp()
        else:
            coef = log_decay.exp()
        trace = torch.einsum("btk,btd->bkd", onehot * coef.unsqueeze(-1), bound)
        if cfg.renorm == "final":
            trace = trace / trace.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return trace

    def read(self, trace: torch.Tensor, query: torch.Tensor, bucket: torch.Tensor | None = None) -> torch.Tensor:
        """Unbind `query` from its bucket's trace. trace (B, K, d) or (B, d); query (B, d)."""
        if trace.dim() == 3:
            if bucket is None:
                bucket = self.buckets(query)
            trace = trace[torch.arange(trace.shape[0], device=trace.device), bucket]
        return self.unbind(trace, query)

    def cleanup(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cleaned read, prototype scores) — scores are cosine similarities (B, P)."""
        cfg = self.cfg
        protos = F.normalize(self.prototypes, dim=-1)
        scores = F.normalize(raw, dim=-1) @ protos.T
        if cfg.cleanup_mode == "none":
            return raw, scores
        if cfg.cleanup_mode == "hard":
            hard = protos[scores.argmax(-1)]
            soft = torch.softmax(scores / cfg.cleanup_temp, -1) @ protos
            return hard + soft - soft.detach(), scores
        logits = scores / cfg.cleanup_temp
        if 0 < cfg.sharpen_topk < scores.shape[-1]:
            top = logits.topk(cfg.sharpen_topk, dim=-1)
            logits = torch.full_like(logits, float("-inf")).scatter(-1, top.indices, top.values / cfg.sharpen_temp)
        elif cfg.sharpen_topk:
            logits = logits / cfg.sharpen_temp
        return torch.softmax(logits, -1) @ protos, scores

    # -- the whole pass ------------------------------------------------------------

    def forward(self, states: torch.Tensor, query_state: torch.Tensor, write_mask: torch.Tensor | None = None,
                detach_writes: bool = False, oracle: torch.Tensor | None = None, oracle_mix: float = 0.0,
                key_states: torch.Tensor | None = None) -> dict:
        """states (B, T, H), query_state (B, H), write_mask (B, T) of 0/1 → dict.

        Keys are projected from `key_states` (default: `states`; the head passes the
        previous position's states so a value is bound to the context it follows).

        ``out`` (B, H) is what the head adds to its query state. ``oracle`` (B,) class
        indices and ``oracle_mix`` ρ blend the target prototype into the cleaned read
        (teacher forcing of the read path, from the scheduler's oracle mix). With
        ``detach_writes`` no gradient reaches the write path (post-gate write cooldown).
        """
        write_states = states.detach() if detach_writes else states
        if key_states is None:
            key_states = states
        keys = self.keys(key_states.detach() if detach_writes else key_states)
        values = self.values(write_states)
        gates = torch.sigmoid(self.write_gate(write_states)).squeeze(-1)
        if write_mask is not None:
            gates = gates * write_mask.to(gates.dtype)
        if detach_writes:
            keys, values, gates = keys.detach(), values.detach(), gates.detach()
        buckets = self.buckets(keys)
        traces = self.write(keys, values, gates, buckets)
        query = self.queries(query_state)
        query_bucket = self.buckets(query)
        trace = traces[torch.arange(traces.shape[0], device=traces.device), query_bucket]
        raw = self.unbind(trace, query)
        cleaned, scores = self.cleanup(raw)
        if oracle is not None and oracle_mix > 0:
            target = F.normalize(self.prototypes, dim=-1)[oracle]
            cleaned = (1 - oracle_mix) * cleaned + oracle_mix * target
        read_gate = torch.sigmoid(self.read_gate(query_state))  # (B, 1)
        out = read_gate * self.out_proj(cleaned)
        if not self.training:
            self._record(trace, read_gate, gates)
        return {"out": out, "raw": raw, "cleaned": cleaned, "scores": scores, "trace": trace, "traces": traces,
                "buckets": buckets, "query_bucket": query_bucket, "keys": keys,
                "values": values, "gates": gates, "query": query, "read_gate": read_gate.squeeze(-1)}

    @torch.no_grad()
    def _record(self, trace, read_gate, gates):
        self.n_reads += trace.shape[0]
        self.last_trace_norm.copy_(trace.norm(dim=-1).mean())
        self.last_read_gate.copy_(read_gate.mean())
        self.last_write_fraction.copy_((gates > self.cfg.write_threshold).float().mean())
        self._last_gates = gates.detach().flatten().cpu()

    # -- telemetry helpers -----------------------------------------------------------

    @torch.no_grad()
    def diagnostics(self, result: dict, targets: torch.Tensor, needle_pos: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-item read/write quality against the target prototype and the needle's write.

        raw_read_cos / clean_read_cos: cosine of the raw and cleaned read with the target
        class's prototype. bucket_coverage: share of buckets holding at least one write
        (gate > write_threshold). With `needle_pos`: write_cos, the cosine of the needle
        bucket's trace with the needle's bound pair k⊛v (how much of the trace the needle
        still holds); bucket_hit, the query reads the needle's bucket; collision, another
        written key in the query's bucket has |cos| > collision_cos with the query.
        top1: the prototype that wins the cleanup.
        """
        protos = F.normalize(self.prototypes, dim=-1)
        target = protos[targets]
        written = result["gates"] > self.cfg.write_threshold  # (B, T)
        onehot = F.one_hot(result["buckets"], self.cfg.n_buckets).bool()  # (B, T, K)
        used = (onehot & written.unsqueeze(-1)).any(1).float().mean(-1)
        out = {
            "raw_read_cos": cosine(result["raw"], target),
            "clean_read_cos": cosine(result["cleaned"], target),
            "top1": result["scores"].argmax(-1),
            "bucket_coverage": used,
        }
        if needle_pos is not None:
            rows = torch.arange(targets.shape[0], device=targets.device)
            idx = needle_pos.view(-1, 1, 1).expand(-1, 1, self.dim)
            k = result["keys"].gather(1, idx).squeeze(1)
            v = result["values"].gather(1, idx).squeeze(1)
            needle_bucket = result["buckets"][rows, needle_pos]
            out["write_cos"] = cosine(result["traces"][rows, needle_bucket], bind(k, v))
            out["bucket_hit"] = (needle_bucket == result["query_bucket"]).float()
            sims = (result["keys"] @ result["query"].unsqueeze(-1)).squeeze(-1).abs()  # (B, T)
            same = result["buckets"] == result["query_bucket"].unsqueeze(-1)
            others = written.scatter(1, needle_pos.view(-1, 1), False)
            out["collision"] = ((sims > self.cfg.collision_cos) & others & same).any(-1).float()
        return out

    def stats(self) -> dict[str, float]:
        return {
            "trace_norm": float(self.last_trace_norm),
            "read_gate_mean": float(self.last_read_gate),
            "write_fraction": float(self.last_write_fraction),
        }

    def histograms(self) -> dict[str, torch.Tensor]:
        return {} if self._last_gates is None else {"write_gates": self._last_gates}

    def reset(self) -> None:
        self.n_reads.zero_()
        self.last_trace_norm.zero_()
        self.last_read_gate.zero_()
        self.last_write_fraction.zero_()
        self._last_gates = None

    # -- the `trace` point (engram_core.points.TracePoint) -----------------------------
    # The same write, unbinding, cleanup and gated output as `forward`, with any number
    # of query positions per sequence. The trace is the (B, n_buckets, dim) tensor.

    def empty_trace(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(batch_size, self.cfg.n_buckets, self.dim, device=device, dtype=dtype)

    def write_trace(self, states: torch.Tensor, write_mask: torch.Tensor | None,
                    key_states: torch.Tensor | None = None) -> torch.Tensor:
        keys = self.keys(states if key_states is None else key_states)
        values = self.values(states)
        gates = torch.sigmoid(self.write_gate(states)).squeeze(-1)
        if write_mask is not None:
            gates = gates * write_mask.to(gates.dtype)
        traces = self.write(keys, values, gates, self.buckets(keys))
        if not self.training:
            self.last_write_fraction.copy_((gates > self.cfg.write_threshold).float().mean())
            self._last_gates = gates.detach().flatten().cpu()
        return traces

    def read_trace(self, trace: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        B, Q, _ = queries.shape
        q = self.queries(queries)  # (B, Q, d)
        bucket = self.buckets(q)  # (B, Q)
        picked = trace.gather(1, bucket.unsqueeze(-1).expand(-1, -1, self.dim))  # (B, Q, d)
        raw = self.unbind(picked, q)
        cleaned, _ = self.cleanup(raw)
        read_gate = torch.sigmoid(self.read_gate(queries))  # (B, Q, 1)
        # the cleanup returns a prototype mix even for a zero read: a bucket nothing was
        # written to reads as zeros (the point's contract), not as the mean prototype
        written = (picked.abs().amax(-1, keepdim=True) > 0).to(queries.dtype)
        out = written * read_gate * self.out_proj(cleaned)
        if not self.training:
            self.n_reads += B * Q
            self.last_trace_norm.copy_(picked.norm(dim=-1).mean())
            self.last_read_gate.copy_(read_gate.mean())
        return out
