"""`causal_backbone`: the core's causal transformer as a sequence head with three points.

One small GPT-style model (`engram_core.nn.CausalTransformer`, optionally with sliding-
window attention) on which memories of every plugin meet. It offers

layer    ``memory.apply_layer(i, hidden, ids)`` after every decoder block i (the memory
         acts after the blocks in its `layer_indices()` and passes the others through);
context  ``memory.write_context(ids, write_mask)`` → (B, K, dim) placed before the tokens
         as prefix embeddings, visible to every position even under a sliding window;
trace    after block `trace_layer`, ``memory.write_trace(hidden, write_mask, key_states)``
         from the write positions (keys from the previous position's state with
         `trace_key_shift`), then ``memory.read_trace(trace, hidden)`` added at the read
         positions.

Which positions write and read: a batch's ``write_mask`` / ``read_mask`` where the data
set gives them (mqar: the context writes, the queries read); otherwise they follow from
the labels — the read positions are those whose next token is scored, the write
positions every real token before the first read (a prompt writes, its completion
reads). Every write must precede every read of its sequence (else a memory could pass a
later token back to an earlier position); the head checks it (see `CausalBackbone` for when:
the check reads the masks on the host, so on an accelerator it runs on the first forward in
training mode and the first in evaluation mode, not every step). A classification batch
(``tokens``, ``label``) whose data set says its classes are tokens (``spec.label_offset``,
e.g. deq-hrr's needle) is read as a one-token completion.

Logits only where scored: ``scored_logits(batch)`` (what the core `token_lm` objective and
`completion_accuracy` metric call) projects onto the vocabulary only the positions whose next
label is scored, gathered from the final hidden states; same loss and gradients as the full
logits, without the full (B, L, vocab) tensor.

Generation (greedy, KV cache or not) writes a context or trace once from the prompt (all
positions but the last) and reads at the last prompt position and every new token; the
trace and prefix live in the cache.
"""

from __future__ import annotations

import functools

import attrs
import torch
import torch.nn.functional as F

from ..components import BuildContext, Head
from ..config import ConfigError, field, in_range, non_negative, positive
from ..nn import CausalTransformer, CausalTransformerConfig
from ..run import accel


@attrs.frozen
class CausalBackboneConfig:
    """A small causal transformer trained from scratch; offers layer, context and trace points."""

    dim: int = field(64, help="model width", validator=positive)
    n_layers: int = field(2, help="decoder blocks", validator=positive)
    n_heads: int = field(4, help="attention heads (must divide dim)", validator=positive)
    mlp_ratio: int = field(4, help="MLP width = mlp_ratio * dim", validator=positive)
    window: int = field(0, help="sliding attention window in positions (0 = full causal attention)", validator=non_negative)
    max_len: int = field(0, help="longest sequence incl. prefix and generation; 0 = the data set's + 16 + prefix", validator=non_negative)
    dropout: float = field(0.0, help="dropout", validator=in_range(0.0, 0.9))
    trace_layer: int = field(0, help="a trace memory is written and read after this decoder block (0-based)", validator=non_negative)
    trace_key_shift: bool = field(True, help="trace keys come from the previous position's state (a value is bound to the token before it)")

    def __attrs_post_init__(self):
        if self.dim % self.n_heads:
            raise ConfigError("n_heads", f"must divide dim ({self.dim}), got {self.n_heads}")
        if self.trace_layer >= self.n_layers:
            raise ConfigError("trace_layer", f"block {self.trace_layer} does not exist: the model has {self.n_layers} blocks (0..{self.n_layers - 1})")


def derive_masks(labels: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(write_mask, read_mask) from completion labels: position t reads when labels[t+1] is
    scored; every real position before an item's first read writes."""
    scored = labels != -100
    read = torch.zeros_like(scored)
    read[:, :-1] = scored[:, 1:]
    pos = torch.arange(labels.shape[1], device=labels.device)[None]
    first = torch.where(read.any(1), read.float().argmax(1), torch.full_like(read[:, 0], labels.shape[1], dtype=torch.long))
    write = pos < first[:, None]
    if attention_mask is not None:
        write = write & attention_mask.bool()
    return write.long(), read.long()


def check_write_before_read(write_mask: torch.Tensor, read_mask: torch.Tensor) -> None:
    pos = torch.arange(write_mask.shape[1], device=write_mask.device)[None]
    last_write = torch.where(write_mask.bool(), pos, -1).amax(1)
    first_read = torch.where(read_mask.bool(), pos, write_mask.shape[1]).amin(1)
    bad = (last_write >= first_read).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"batch item {i} writes at position {int(last_write[i])} but reads from position {int(first_read[i])}: "
                         "a memory's writes must precede its reads (give the batch write_mask/read_mask that do)")


def scored_counts(labels: torch.Tensor) -> torch.Tensor:
    """Scored tokens per sequence (B,): labels[:, 1:] that are not -100 (logit t predicts labels[t + 1])."""
    return (labels[:, 1:] != -100).sum(1)


@functools.lru_cache(maxsize=16)
def _order_keys(steps: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """0..steps-1 and steps..2*steps-1 on `device`, made once per length (two launches a step
    fewer: an eager step of a small model is its launches)."""
    pos = torch.arange(2 * steps, device=device)
    return pos[:steps], pos[steps:]


def scored_positions(labels: torch.Tensor, per_sequence: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions (B, K), targets (B, K)), K = min(per_sequence, L - 1): the logit positions
    whose next label is scored, in order, then (where a sequence has fewer than K) unscored
    positions with target -100, which cross-entropy's ignore_index and the accuracy skip.

    Shapes depend only on `per_sequence`, never on the data: no host synchronisation (a
    boolean-mask index would wait for the device to count). `per_sequence` must be at least
    every sequence's count (`check_scored_bound`), else scored tokens would be dropped.
    """
    target = labels[:, 1:]
    steps = target.shape[1]
    if torch.compiler.is_compiling():  # the compiler fuses the aranges itself (and skips caches with a warning)
        pos, unscored = _order_keys.__wrapped__(steps, labels.device)
    else:
        pos, unscored = _order_keys(steps, labels.device)
    # scored positions sort before every unscored one, each group in position order
    order_key = torch.where(target != -100, pos, unscored)
    positions = order_key.topk(min(per_sequence, steps), dim=1, largest=False, sorted=True).indices
    return positions, target.gather(1, positions)


def check_scored_bound(labels: torch.Tensor, per_sequence: int) -> None:
    counts = scored_counts(labels)
    most = int(counts.max()) if counts.numel() else 0
    if most > per_sequence:
        i = int(counts.argmax())
        raise ValueError(f"batch item {i} has {most} scored tokens, more than the {per_sequence} per sequence its data set "
                         "declares (spec.max_scored): give the data set's true maximum")


class CausalBackbone(Head):
    """The core sequence backbone. ``forward_batch(batch)`` → logits (B, L, vocab);
    ``scored_logits(batch)`` → logits at the scored positions only (B, K, vocab);
    ``generate(prompt_ids, max_new_tokens, use_cache, eos_id)`` greedy decoding.

    Host-side checks (writes before reads; no more scored tokens per sequence than the data
    set declares) read the masks on the host. On CPU tensors they run on every forward (a
    read there costs nothing); on an accelerator they would stall the step, so they run on
    the head's first forward in training mode and its first in evaluation mode (the first
    train and the first eval batch), and not in the steady state. Code being traced by
    torch.compile skips them (a host read would split the graph); the engine runs a compiled
    stage's first step eagerly, so they run there.

    How many positions per sequence ``scored_logits`` projects: one for a classification
    batch read as a completion; the data set's ``spec.max_scored`` where it declares one
    (mqar: `n_pairs`), a fixed shape and no host synchronisation; otherwise the batch's
    largest count, which a CUDA device must report to the host (one synchronisation a step).
    """

    def __init__(self, cfg: CausalBackboneConfig, build: BuildContext):
        super().__init__()
        spec = build.spec
        self.cfg = cfg
        self.vocab_size = int(spec.vocab_size)
        self.label_offset = spec.get("label_offset")
        longest = int(spec.get("max_len") or spec.get("seq_len") or 0) + (1 if self.label_offset is not None else 0)
        max_len = cfg.max_len or longest + 16 + 64  # room for generation and a prefix of up to 64 vectors
        if cfg.max_len and cfg.max_len < longest:
            raise ConfigError("max_len", f"must be >= the data set's longest sequence ({longest} tokens), got {cfg.max_len}")
        self.lm = CausalTransformer(CausalTransformerConfig(
            vocab_size=self.vocab_size, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, max_len=max_len,
            dropout=cfg.dropout, mlp_ratio=cfg.mlp_ratio, window=cfg.window))
        self.lm.block_hooks.append(self._block_hook)
        self._call: dict | None = None  # the write/read masks and trace of the forward in progress
        max_scored = spec.get("max_scored")
        self.max_scored: int | None = int(max_scored) if max_scored is not None else None
        self._checked_modes: set[bool] = set()  # training modes whose first accelerator batch was checked

    # what memories read from the head they attach to
    @property
    def width(self) -> int:
        return self.cfg.dim

    @property
    def state_dim(self) -> int:
        return self.cfg.dim

    def memory_dims(self) -> tuple[int, int, int]:
        return self.cfg.dim, self.vocab_size, self.cfg.n_layers

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.tok(ids)

    def state_size(self, seq_len: int) -> int | None:
        """Numbers one sequence carries from position to position at inference, at `seq_len`
        tokens (Zoology's "state size", the x axis of its accuracy plots): the keys and values
        every layer keeps of each visible position (all of them under full attention, the last
        `window` under a window, plus a context prefix's K positions, which stay visible), the
        trace of a trace memory (`empty_trace` of one sequence), and what a layer memory
        declares (`Memory.state_numbers`); None where a memory cannot say (a layer memory that
        declares nothing, or one without the point's `context_shape` / `empty_trace`)."""
        cfg = self.cfg
        visible = seq_len if not cfg.window else min(cfg.window, seq_len)
        point = self.memory_point if self.memory_active else None
        extra = 0
        memory = self.memory
        if point == "context":
            if not hasattr(memory, "context_shape"):
                return None
            visible += memory.context_shape()[0]
        elif point == "trace":
            if not hasattr(memory, "empty_trace"):
                return None
            extra = memory.empty_trace(1, self.lm.tok.weight.device, self.lm.tok.weight.dtype).numel()
        elif point is not None:
            extra = memory.state_numbers(seq_len) if hasattr(memory, "state_numbers") else None
            if extra is None:
                return None
        return 2 * cfg.dim * visible * cfg.n_layers + extra

    # -- the points ----------------------------------------------------------------------

    def _block_hook(self, index, hidden, ids, positions):
        if not self.memory_active:
            return hidden
        if self.memory_point == "layer":
            return self.memory.apply_layer(index, hidden, ids)
        if self.memory_point == "trace" and index == self.cfg.trace_layer:
            call = self._call
            if call["trace"] is None:  # this forward holds the write region
                key_states = F.pad(hidden[:, :-1], (0, 0, 1, 0)) if self.cfg.trace_key_shift else None
                write = call["write"]
                if self.cfg.trace_key_shift:
                    write = write.clone()
                    write[:, 0] = 0  # position 0 has no state before it
                call["trace"] = self.memory.write_trace(hidden, write, key_states)
            read = call["read"].to(hidden.dtype).unsqueeze(-1)
            return hidden + read * self.memory.read_trace(call["trace"], hidden)
        return hidden

    def _checks_due(self, tensor: torch.Tensor) -> bool:
        """Whether this forward runs the host-side checks (see the class doc)."""
        if torch.compiler.is_compiling():  # a host read would split the graph (the engine runs a compiled stage's first step eagerly)
            return False
        if accel.host_reads_free(tensor.device):
            return True
        if self.training in self._checked_modes:
            return False
        self._checked_modes.add(self.training)
        return True

    def _run(self, ids, attention_mask=None, write_mask=None, read_mask=None, cache=None, use_cache=False,
             logit_positions=None, check=True):
        """One forward through the points. Returns (logits of the token positions, or of
        `logit_positions` (B, K) of them, cache)."""
        point = self.memory_point if self.memory_active else None
        b, t = ids.shape
        if cache is not None:  # a generation step: everything new is a read
            self._call = {"trace": cache.get("trace"), "write": None, "read": ids.new_ones(b, t)}
            try:
                logits, new = self.lm(input_ids=ids, cache=cache, use_cache=True)
            finally:
                trace, self._call = self._call["trace"], None
            new["trace"] = trace
            return logits, new
        if point in ("context", "trace"):
            if write_mask is None or read_mask is None:
                raise ValueError(f"a {point} memory needs write_mask and read_mask (or labels to derive them from)")
            if check:
                check_write_before_read(write_mask, read_mask)
        if point == "context":
            prefix = self.memory.write_context(ids, write_mask)
            k = prefix.shape[1]
            embeds = torch.cat([prefix.to(self.lm.tok.weight.dtype), self.lm.tok(ids)], dim=1)
            am = attention_mask if attention_mask is not None else ids.new_ones(b, t)
            am = torch.cat([am.new_ones(b, k), am], dim=1)
            shifted = None if logit_positions is None else logit_positions + k
            logits, new = self.lm(inputs_embeds=embeds, attention_mask=am, use_cache=use_cache, n_global=k,
                                  logit_positions=shifted)
            if new is not None:
                new["ids"] = None  # prefix positions carry no token ids
            return (logits[:, k:] if logit_positions is None else logits), new
        self._call = {"trace": None, "write": write_mask, "read": read_mask}
        try:
            logits, new = self.lm(input_ids=ids, attention_mask=attention_mask, use_cache=use_cache,
                                  logit_positions=logit_positions)
        finally:
            trace, self._call = self._call["trace"], None
        if new is not None:
            new["trace"] = trace
        return logits, new

    # -- what objectives and metrics call ------------------------------------------------

    def completion_view(self, batch: dict) -> dict:
        """The batch in completion format (input_ids, labels, attention_mask, write/read masks)."""
        if "input_ids" not in batch and "tokens" in batch and "label" in batch:
            if self.label_offset is None:
                raise ConfigError("data", "a classification batch (tokens, label) needs a data set whose spec gives "
                                          "label_offset (its classes are tokens) to be read as a completion")
            tokens = batch["tokens"]
            target = batch["label"].long() + int(self.label_offset)
            ids = torch.cat([tokens, target[:, None]], dim=1)
            labels = torch.full_like(ids, -100)
            labels[:, -1] = target
            pos = torch.arange(ids.shape[1], device=ids.device)[None]
            write = (pos < tokens.shape[1] - 1).expand_as(ids).long()
            read = (pos >= tokens.shape[1] - 1).expand_as(ids).long()
            return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "write_mask": write, "read_mask": read}
        out = dict(batch)
        if "write_mask" not in out or "read_mask" not in out:
            out["write_mask"], out["read_mask"] = derive_masks(out["labels"], out.get("attention_mask"))
        return out

    def forward_batch(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """(logits (B, L, vocab), the completion view of the batch the logits belong to)."""
        view = self.completion_view(batch)
        logits, _ = self._run(view["input_ids"], view.get("attention_mask"), view["write_mask"], view["read_mask"],
                              check=self._checks_due(view["input_ids"]))
        return logits, view

    def scored_logits(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(logits (B, K, vocab), targets (B, K), completion view): the logits only at the
        positions whose next label is scored, and those labels; -100 pads a sequence with
        fewer than K scored tokens. Cross-entropy (ignore_index -100) and argmax over them
        equal those over ``forward_batch``'s full logits."""
        view = self.completion_view(batch)
        labels = view["labels"]
        check = self._checks_due(labels)
        if "input_ids" not in batch:  # a classification batch read as a one-token completion
            per_sequence = 1
        elif self.max_scored is not None:
            per_sequence = self.max_scored
        else:  # nothing declares a bound: the batch's own (a host read of a device count)
            per_sequence = int(scored_counts(labels).max()) if labels.shape[0] else 0
        if check:
            check_scored_bound(labels, per_sequence)
        positions, targets = scored_positions(labels, per_sequence)
        logits, _ = self._run(view["input_ids"], view.get("attention_mask"), view["write_mask"], view["read_mask"],
                              logit_positions=positions, check=check)
        return logits, targets, view

    def forward(self, input_ids, attention_mask=None, write_mask=None, read_mask=None):
        logits, _ = self._run(input_ids, attention_mask, write_mask, read_mask, check=self._checks_due(input_ids))
        return logits

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens: int, use_cache: bool = True, eos_id: int | None = None, attention_mask=None):
        """Greedy decoding; returns only the new tokens (B, <= max_new_tokens). The prompt
        (all but its last position) writes a context or trace memory; the last prompt
        position and every new token read it."""
        was_training = self.training
        self.eval()
        b, p = prompt_ids.shape
        mask = attention_mask if attention_mask is not None else torch.ones_like(prompt_ids)
        pos = torch.arange(p, device=prompt_ids.device)[None]
        write = (mask.bool() & (pos < p - 1)).long()
        read = (pos >= p - 1).expand(b, p).long()
        out: list[torch.Tensor] = []
        done = torch.zeros(b, dtype=torch.bool, device=prompt_ids.device)
        cache = None
        for _ in range(max_new_tokens):
            if use_cache and cache is not None:
                logits, cache = self._run(out[-1][:, None], cache=cache)
            else:
                seq = prompt_ids if not out else torch.cat([prompt_ids, torch.stack(out, 1)], dim=1)
                extra = seq.shape[1] - p
                m = torch.cat([mask, mask.new_ones(b, extra)], 1)
                w = torch.cat([write, write.new_zeros(b, extra)], 1)
                r = torch.cat([read, read.new_ones(b, extra)], 1)
                logits, cache = self._run(seq, m, w, r, use_cache=use_cache, check=False)  # masks valid by construction
            nxt = logits[:, -1].argmax(-1)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done = done | (nxt == eos_id)
            out.append(nxt)
            if eos_id is not None and bool(done.all()):
                break
        self.train(was_training)
        return torch.stack(out, 1)
