"""`deq_classifier`: a deep-equilibrium sequence classifier that offers a `trace` point.

The hidden states of a whole sequence are the fixed point

    z* = f(z*, x),   f(z, x) = tanh( W · (z + causal_conv(z)) + U·x + b )

where x_t is the embedding of token t (plus, with `token_shift`, of token t-1) and the
causal depthwise convolution lets information flow along the sequence at the fixed point.
W and the convolution are spectrally normalised (`spectral_norm`) and scaled by
`contraction` < 1 so f is a contraction and the solver converges.

With ``trunk = "gru"`` the states come instead from a plain (non-equilibrium) recurrent
cell, a GRU over the same injections: the ablation that asks what the equilibrium adds.
With ``trunk = "transformer"`` they come from a small causal transformer over the same
injections (`engram_core.nn.CausalTransformer`, no positional embeddings by default):
every position attends to the whole prefix, so with ``memory = none`` it is the
global-mixing baseline without a memory that the DEQ's local trunk is compared with.

An attached `hrr` memory is written from z*_1..z*_{T-1} and read with the final state
z*_T as query; its gated output is added to z*_T before the classifier. hrr's own call
adds the oracle mix, the read logits and the diagnostics; any other memory providing
`trace` is called through the point alone (`write_trace`, then `read_trace` at the query).

The read reaches the logits by two paths: through the state (the gated read added to z*_T,
then the classifier) and, with `read_logits`, straight as a vote (the prototype scores
added to the logits). `forward_detailed(..., knockout=...)` removes exactly one of them
at evaluation (`KNOCKOUTS`): "read_state" keeps the vote, "vote" keeps the state path.
"""

from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize
from torch import nn

from engram_core.components import BuildContext, Head
from engram_core.config import ConfigError, field, in_range, one_of, positive
from engram_core.nn.transformer import CausalTransformer, CausalTransformerConfig

from .deq import GRADIENTS, SOLVERS, DEQFixedPoint

# Evaluation-time knock-outs of one path of the memory read into the logits (see the module doc).
KNOCKOUTS = ("read_state", "vote")


@attrs.frozen
class DEQClassifierConfig:
    """DEQ trunk (solver, gradients, spectral norm) and the classifier on its final state."""

    trunk: str = field("deq", help="sequence trunk: 'deq' (the equilibrium z* = f(z*, x)), 'gru' (a plain recurrent "
                                   "cell over the same injections, for ablations) or 'transformer' (a causal transformer "
                                   "over the same injections: global mixing, the baseline without memory)",
                       validator=one_of("deq", "gru", "transformer"))
    hidden: int = field(64, help="width H of the equilibrium state z", validator=positive)
    embed: int = field(64, help="token embedding width", validator=positive)
    conv_kernel: int = field(3, help="causal depthwise convolution width inside f (>= 1)", validator=positive)
    token_shift: bool = field(True, help="inject the previous token's embedding too (x_t = E[tok_t] + E'[tok_{t-1}])")
    solver: str = field("anderson", help="forward solver: 'anderson' or 'fixed_point'", validator=one_of(*SOLVERS))
    max_iter: int = field(30, help="forward solver: maximum iterations", validator=positive)
    tol: float = field(1e-3, help="forward solver: relative residual tolerance", validator=positive)
    anderson_m: int = field(5, help="Anderson memory (past iterates mixed)", validator=positive)
    damping: float = field(1.0, help="fixed-point iteration damping (1 = plain iteration)", validator=in_range(0.01, 1.0))
    grad: str = field("implicit", help="gradients: 'implicit' (IFT backward solve) or 'phantom' (k damped steps)",
                      validator=one_of(*GRADIENTS))
    backward_max_iter: int = field(30, help="implicit gradients: maximum backward iterations", validator=positive)
    backward_tol: float = field(1e-4, help="implicit gradients: backward relative residual tolerance", validator=positive)
    phantom_steps: int = field(1, help="phantom gradients: differentiable steps from z* (1 = one-step gradient)", validator=positive)
    phantom_damping: float = field(1.0, help="phantom gradients: damping λ of each step", validator=in_range(0.01, 1.0))
    spectral_norm: bool = field(True, help="spectral normalisation of the DEQ's state map W")
    contraction: float = field(0.9, help="scale of the spectrally normalised state map (< 1 keeps f contractive)",
                               validator=in_range(0.0, 1.0))
    pool: str = field("last", help="classifier input: 'last' (final state) or 'last_mean' (final + mean state)",
                      validator=one_of("last", "last_mean"))
    dropout: float = field(0.0, help="dropout on the classifier input", validator=in_range(0.0, 0.9))
    key_shift: bool = field(True, help="memory keys come from the previous position's state (a value is bound to the "
                                       "context it follows); the query key from the last state")
    read_logits: bool = field(True, help="add the memory read's prototype scores (cos/cleanup_temp) to the logits; "
                                         "needs one prototype per class")
    read_logits_gated: bool = field(False, help="scale that vote by the read gate, so a closed gate removes it (with "
                                               "ungated votes the task loss already holds an InfoNCE-like term)")
    transformer_layers: int = field(2, help="trunk = 'transformer': decoder blocks", validator=positive)
    transformer_heads: int = field(4, help="trunk = 'transformer': attention heads (must divide hidden)", validator=positive)
    transformer_mlp_ratio: int = field(1, help="trunk = 'transformer': MLP width = ratio * hidden", validator=positive)
    transformer_positions: str = field("none", help="trunk = 'transformer': 'none' (no positional embedding, like the "
                                                    "DEQ: content and the previous token only; any length) or 'learned' "
                                                    "(a learned table of transformer_max_len positions)",
                                       validator=one_of("none", "learned"))
    transformer_max_len: int = field(1024, help="trunk = 'transformer': longest sequence it accepts", validator=positive)

    def __attrs_post_init__(self):
        if self.trunk == "transformer" and self.hidden % self.transformer_heads:
            raise ConfigError("transformer_heads", f"must divide hidden ({self.hidden}), got {self.transformer_heads}")


class DEQClassifier(Head):
    """Deep-equilibrium classifier; `forward_classify(batch)` gives logits (B, n_classes)."""

    def __init__(self, cfg: DEQClassifierConfig, build: BuildContext):
        super().__init__()
        self.cfg = cfg
        spec = build.spec
        self.state_dim = cfg.hidden
        self.n_classes = int(spec.n_classes)
        gen = torch.Generator().manual_seed(int(build.seed))
        vocab = int(spec.vocab_size)
        self.embed = nn.Embedding(vocab, cfg.embed)
        self.prev_embed = nn.Embedding(vocab, cfg.embed) if cfg.token_shift else None
        self.inject = nn.Linear(cfg.embed, cfg.hidden)
        self.state_map = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.conv = nn.Conv1d(cfg.hidden, cfg.hidden, cfg.conv_kernel, groups=cfg.hidden, bias=False)
        with torch.no_grad():
            for emb in (self.embed, self.prev_embed):
                if emb is not None:
                    emb.weight.copy_(torch.randn(emb.weight.shape, generator=gen))
            self.inject.weight.copy_(torch.randn(self.inject.weight.shape, generator=gen) / math.sqrt(cfg.embed))
            self.inject.bias.zero_()
            self.state_map.weight.copy_(torch.randn(self.state_map.weight.shape, generator=gen) / math.sqrt(cfg.hidden))
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=gen) / math.sqrt(cfg.conv_kernel))
        if cfg.spectral_norm:
            self.state_map = nn.utils.parametrizations.spectral_norm(self.state_map)
        self.norm = nn.LayerNorm(cfg.hidden)
        cls_in = cfg.hidden * (2 if cfg.pool == "last_mean" else 1)
        self.classifier = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(cls_in, cfg.hidden), nn.GELU(),
                                        nn.Linear(cfg.hidden, self.n_classes))
        self.rnn = nn.GRU(cfg.hidden, cfg.hidden, batch_first=True) if cfg.trunk == "gru" else None
        self.transformer = self._build_transformer(cfg, int(build.seed)) if cfg.trunk == "transformer" else None
        self.deq = DEQFixedPoint(cfg.solver, cfg.max_iter, cfg.tol, cfg.grad, cfg.backward_max_iter, cfg.backward_tol,
                                 cfg.phantom_steps, cfg.phantom_damping, cfg.anderson_m, cfg.damping)

    @staticmethod
    def _build_transformer(cfg: DEQClassifierConfig, seed: int) -> CausalTransformer:
        """A causal transformer of width `hidden` fed the injections as `inputs_embeds`."""
        tcfg = CausalTransformerConfig(vocab_size=1, dim=cfg.hidden, n_layers=cfg.transformer_layers,
                                       n_heads=cfg.transformer_heads, max_len=cfg.transformer_max_len,
                                       mlp_ratio=cfg.transformer_mlp_ratio)
        # its own initialisation draws from the global RNG: fork it so the head is a function
        # of the build seed alone, like the DEQ's weights
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 104729)
            model = CausalTransformer(tcfg)
        # the token table and output projection are unused (the injections come in as
        # inputs_embeds, the classifier reads the states): frozen, so they neither train
        # nor count as trainable parameters
        model.tok.weight.requires_grad_(False)
        if cfg.transformer_positions == "none":
            with torch.no_grad():
                model.pos.weight.zero_()
            model.pos.weight.requires_grad_(False)
        return model

    # -- the equilibrium ---------------------------------------------------------------

    def _conv_weight(self) -> torch.Tensor:
        # the depthwise kernel is normalised per channel so that (identity + conv) has gain <= 2
        w = self.conv.weight
        return w / w.abs().sum(-1, keepdim=True).clamp_min(1.0)

    def _mix(self, z: torch.Tensor) -> torch.Tensor:
        """(B, T, H) → (B, T, H): W·(z + causal_conv(z)) scaled to keep f contractive."""
        k = self.cfg.conv_kernel
        w = self._conv_weight()[:, 0]  # (H, k); tap k-1 is the current position
        mixed = z * (1 + w[:, k - 1])
        for j in range(k - 1):  # shifted sums are much faster on CPU than a depthwise conv1d
            shift = k - 1 - j
            mixed = mixed + F.pad(z[:, :-shift], (0, 0, shift, 0)) * w[:, j]
        # spectral norm(W) = 1 and ||I + conv|| <= 2 → Lipschitz(f) <= contraction
        return self.cfg.contraction * 0.5 * self.state_map(mixed)

    def injection(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.prev_embed is not None:
            prev = F.pad(tokens, (1, 0))[:, :-1]
            x = x + self.prev_embed(prev)
        return self.inject(x)

    def equilibrium(self, tokens: torch.Tensor) -> torch.Tensor:
        u = self.injection(tokens)
        if self.rnn is not None:
            return self.rnn(u)[0]
        if self.transformer is not None:
            return self.transformer(inputs_embeds=u, return_hidden=True)[2]

        def f(z: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self._mix(z) + u)

        return self.deq(f, torch.zeros_like(u))

    # -- public API -----------------------------------------------------------------------

    def forward_detailed(self, batch: dict, oracle_mix: float = 0.0, detach_writes: bool = False,
                         knockout: str | None = None) -> dict:
        """Logits and diagnostics. `knockout` (one of `KNOCKOUTS`, evaluation only) removes one
        path of the memory read into the logits: "read_state" drops the gated read added to
        the query state (the vote stays), "vote" drops the prototype scores added to the
        logits (the read still enters the state)."""
        if knockout is not None and knockout not in KNOCKOUTS:
            raise ValueError(f"knockout must be one of {KNOCKOUTS} or None, got {knockout!r}")
        # spectral-norm weights are computed once per forward (not once per solver iteration)
        with torch.nn.utils.parametrize.cached():
            return self._forward_detailed(batch, oracle_mix, detach_writes, knockout)

    def _forward_detailed(self, batch: dict, oracle_mix: float, detach_writes: bool, knockout: str | None) -> dict:
        # fill the parametrisation cache now, with grad enabled: a first access inside the
        # solver's no_grad would cache a weight without a graph and W would never train
        _ = self.state_map.weight
        tokens = batch["tokens"]
        z = self.equilibrium(tokens)
        z = self.norm(z)
        lengths = batch.get("lengths")
        if lengths is None:
            last_idx = torch.full((tokens.shape[0],), tokens.shape[1] - 1, dtype=torch.long, device=tokens.device)
        else:
            last_idx = lengths.to(tokens.device).long() - 1
        query_state = z.gather(1, last_idx.view(-1, 1, 1).expand(-1, 1, z.shape[-1])).squeeze(1)
        if self.rnn is not None or self.transformer is not None:
            out: dict = {"solver_iters": 0, "solver_residual": 0.0}
        else:
            out = {"solver_iters": self.deq.forward_stats.iterations, "solver_residual": self.deq.forward_stats.residual}
        h = query_state
        read_logits = None
        if self.memory_active:
            pos = torch.arange(tokens.shape[1], device=tokens.device)[None]
            write_mask = pos < last_idx[:, None]  # every position before the query
            key_states = None
            if self.cfg.key_shift:
                # write t binds key(z_{t-1}) with value(z_t); position 0 has no predecessor
                key_states = F.pad(z[:, :-1], (0, 0, 1, 0))
                write_mask = write_mask & (pos >= 1)
            if not hasattr(self.memory, "diagnostics"):
                # any other trace memory: only the `trace` point (engram_core.points.TracePoint),
                # written from every position before the query, read with the query state
                trace = self.memory.write_trace(z, write_mask, key_states)
                if knockout != "read_state":
                    h = h + self.memory.read_trace(trace, query_state[:, None])[:, 0]
            else:
                targets = batch.get("read_target", batch.get("label")) if oracle_mix > 0 else None
                mem = self.memory(z, query_state, write_mask, detach_writes=detach_writes, oracle=targets,
                                  oracle_mix=oracle_mix, key_states=key_states)
                if knockout != "read_state":
                    h = h + mem["out"]
                out["memory"] = mem
            if self.cfg.read_logits and "memory" in out and knockout != "vote":
                # the cleanup's vote is not scaled by the read gate: while reads are still
                # noise, a gated vote is switched off by the task loss before it can improve
                read_logits = mem["scores"] / self.memory.cfg.cleanup_temp
                if self.cfg.read_logits_gated:
                    read_logits = read_logits * mem["read_gate"].unsqueeze(-1)
        if self.cfg.pool == "last_mean":
            valid = batch.get("mask")
            if valid is None:
                mean = z.mean(1)
            else:
                valid = valid.to(z.dtype).unsqueeze(-1)
                mean = (z * valid).sum(1) / valid.sum(1).clamp_min(1)
            h = torch.cat([h, mean], -1)
        out["logits"] = self.classifier(h)
        if read_logits is not None:
            out["logits"] = out["logits"] + read_logits
        return out

    def forward_classify(self, batch: dict) -> torch.Tensor:
        return self.forward_detailed(batch)["logits"]

    def forward(self, batch: dict) -> torch.Tensor:
        return self.forward_classify(batch)
