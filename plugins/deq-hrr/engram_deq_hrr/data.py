"""Locally generated, seeded tasks: `needle` (key/value retrieval) and `listops_lite`.

Both are generated deterministically from their `seed` and cached through
`engram_core.cache` as ``<cache_dir>/deq-hrr/<name>-<key>.pt``, keyed by the full config,
the seed, `DATA_FORMAT` and the source of the generator.

needle — vocabulary: 0 pad, 1 query marker (unused by needle), then `n_fillers` filler
tokens, `n_keys` key tokens and `n_values` value tokens. A sequence of length L holds
`n_pairs` adjacent ``key value`` pairs with distinct keys at random non-overlapping places
among fillers; its last token is the query: one of the pairs' keys. The label is that
pair's value (a class in [0, n_values)). `needle_pos` is the position of that value token.

listops_recall — ListOps at length 512 where memory matters: variables are defined
(``x d``) among fillers, and the sequence ends with ``OP d … d x``, whose last operand is
one of the variables (docs/plugins/deq-hrr.md says why it replaces listops_lite as the trace test).

listops_lite — prefix expressions ``[OP a b ...]`` over digits with MAX, MIN, MED (median)
and SM (sum mod 10), nested up to `max_depth`, padded to `seq_len`; the label is the
value (10 classes). The sequence ends with a query marker so the last state reads it.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator

import attrs
import torch

from engram_core import cache
from engram_core.components import BuildContext, Dataset, DataSpec
from engram_core.config import ConfigError, field, in_range, positive

PAD, QUERY = 0, 1
# bump when a generator's output changes (the cache key also holds this module's source)
DATA_FORMAT = 2


def _load_or_make(build: BuildContext | None, name: str, cfg, make) -> dict:
    """The data for `cfg`, from the cache (keyed by the full config, seed, DATA_FORMAT and
    the source of this module, which holds every generator) or made by `make()` and cached."""
    root = build.cache_dir if build is not None else None
    e = cache.entry(root, plugin="deq-hrr", kind=name, config=cfg, seed=cfg.seed, version=DATA_FORMAT,
                    builder=sys.modules[__name__], ext="pt")
    return cache.load_or_build(e, make, save_fn=lambda d, p: torch.save(d, p),
                               load_fn=lambda p: torch.load(p, weights_only=True))


class _TensorSplits(Dataset):
    """Splits of equal-keyed tensors; `sample` draws rows with the caller's generator."""

    _splits: dict[str, dict[str, torch.Tensor]]
    splits = ("train", "eval")

    def _split(self, split: str) -> dict[str, torch.Tensor]:
        if split not in self._splits:
            raise ConfigError("split", f"unknown split {split!r} (this data set has: {', '.join(self._splits)})")
        return self._splits[split]

    def sample(self, split, batch_size, generator):
        data = self._split(split)
        n = next(iter(data.values())).shape[0]
        idx = torch.randint(0, n, (batch_size,), generator=generator)
        return {k: v[idx] for k, v in data.items()}

    def eval_batches(self, split, batch_size) -> Iterator[dict]:
        data = self._split(split)
        n = next(iter(data.values())).shape[0]
        for i in range(0, n, batch_size):
            yield {k: v[i : i + batch_size] for k, v in data.items()}


# ---- needle ----------------------------------------------------------------------------


@attrs.frozen
class NeedleConfig:
    """Key/value pairs hidden among fillers; the query at the end asks for one pair's value."""

    seq_len: int = field(256, help="tokens per sequence (the seed used 256-1024)", validator=in_range(3, None))
    n_pairs: int = field(4, help="key/value pairs written into each sequence", validator=positive)
    n_keys: int = field(64, help="distinct key tokens", validator=positive)
    n_values: int = field(16, help="distinct value tokens = classes", validator=in_range(2, None))
    n_fillers: int = field(32, help="distinct filler tokens", validator=positive)
    n_train: int = field(4096, help="training sequences", validator=positive)
    n_eval: int = field(512, help="evaluation sequences (the reported split)", validator=positive)
    n_val: int = field(0, help="validation sequences, split 'val' (and 'val@L' for each of train_lengths), for "
                               "choices (steps, lengths, β) and in-training evaluation; 0: none",
                       validator=in_range(0, None))
    seed: int = field(0, help="seed of the generator (independent of run.seed)")
    train_lengths: tuple[int, ...] = field((), help="extra training splits `train@L` at these lengths (a length "
                                                    "curriculum: a stage with split = 'train@L')")
    eval_lengths: tuple[int, ...] = field((), help="extra evaluation splits `eval@L` at these lengths "
                                                   "(deq_hrr_accuracy reports eval/acc@L for each)")

    def __attrs_post_init__(self):
        layout = 2 * self.n_pairs + 1
        for key, lengths in (("seq_len", (self.seq_len,)), ("train_lengths", self.train_lengths),
                             ("eval_lengths", self.eval_lengths)):
            for length in lengths:
                if length < layout:
                    raise ConfigError(
                        key,
                        f"{length} is shorter than the needle layout: {self.n_pairs} pairs need at least {layout} tokens "
                        "(2 per pair + the query key)",
                    )
        if self.n_pairs > self.n_keys:
            raise ConfigError("n_pairs", f"{self.n_pairs} pairs need distinct keys but n_keys is {self.n_keys}")


def generate_needle(cfg: NeedleConfig, n: int, seed: int, seq_len: int | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    L, P = seq_len or cfg.seq_len, cfg.n_pairs
    key0 = 2 + cfg.n_fillers
    val0 = key0 + cfg.n_keys
    tokens = torch.randint(2, 2 + cfg.n_fillers, (n, L), generator=g)
    keys = torch.rand(n, cfg.n_keys, generator=g).argsort(-1)[:, :P]  # distinct keys per sequence
    vals = torch.randint(0, cfg.n_values, (n, P), generator=g)
    # place P pairs in the first L-1 slots without overlap: choose P of the (free + P)
    # items (fillers and pairs) to be pairs, then spread them ("stars and bars")
    free = L - 1 - 2 * P  # filler tokens left over
    starts = torch.rand(n, free + P, generator=g).argsort(-1)[:, :P].sort(-1).values
    starts = starts + torch.arange(P)[None] * 1  # each earlier pair shifts later ones by one more slot
    rows = torch.arange(n)[:, None]
    tokens[rows, starts] = key0 + keys
    tokens[rows, starts + 1] = val0 + vals
    which = torch.randint(0, P, (n,), generator=g)
    tokens[:, L - 1] = key0 + keys[torch.arange(n), which]
    label = vals[torch.arange(n), which]
    needle_pos = starts[torch.arange(n), which] + 1
    return {"tokens": tokens, "label": label, "needle_pos": needle_pos}


def _length_seed(seed: int, length: int, which: int) -> int:
    return (seed * 2 + which) * 1_000_003 + length


# val@L streams start here: above every train/eval seed above, below the main val's 2**62 + seed
_VAL_AT_LENGTH = 2**61


class NeedleDataset(_TensorSplits):
    """Needle retrieval: `n_pairs` key/value pairs, the query key at the end, label = its value."""

    def __init__(self, cfg: NeedleConfig, build: BuildContext | None = None):
        self.cfg = cfg

        def make() -> dict:
            splits = {"train": generate_needle(cfg, cfg.n_train, cfg.seed * 2 + 1),
                      "eval": generate_needle(cfg, cfg.n_eval, cfg.seed * 2 + 2)}
            if cfg.n_val:  # a stream of its own: adding it changes neither train nor eval
                splits["val"] = generate_needle(cfg, cfg.n_val, 2**62 + cfg.seed)
            # each extra length has its own generator seed, distinct from the main splits'
            for length in cfg.train_lengths:
                splits[f"train@{length}"] = generate_needle(cfg, cfg.n_train, _length_seed(cfg.seed, length, 1), length)
                if cfg.n_val:  # a curriculum stage is watched on its own length, not on a test split
                    splits[f"val@{length}"] = generate_needle(cfg, cfg.n_val, _VAL_AT_LENGTH + _length_seed(cfg.seed, length, 0), length)
            for length in cfg.eval_lengths:
                splits[f"eval@{length}"] = generate_needle(cfg, cfg.n_eval, _length_seed(cfg.seed, length, 2), length)
            return splits

        self._splits = _load_or_make(build, "needle", cfg, make)
        self.splits = tuple(self._splits)
        self.spec = DataSpec("needle", vocab_size=2 + cfg.n_fillers + cfg.n_keys + cfg.n_values, n_classes=cfg.n_values,
                             seq_len=cfg.seq_len, n_pairs=cfg.n_pairs, task="needle",
                             label_offset=2 + cfg.n_fillers + cfg.n_keys)  # class i is token label_offset + i


# ---- listops-lite ------------------------------------------------------------------------

OPS = ("MAX", "MIN", "MED", "SM")


@attrs.frozen
class ListOpsLiteConfig:
    """Shallow ListOps: nested MAX/MIN/MED/SM over digits, 10 classes."""

    seq_len: int = field(128, help="tokens per sequence (expressions are padded to it)", validator=in_range(8, None))
    max_depth: int = field(2, help="maximum nesting depth of operators", validator=in_range(1, 6))
    max_args: int = field(4, help="maximum arguments per operator", validator=in_range(2, 10))
    n_train: int = field(4096, help="training sequences", validator=positive)
    n_eval: int = field(512, help="evaluation sequences", validator=positive)
    seed: int = field(0, help="seed of the generator (independent of run.seed)")

    def __attrs_post_init__(self):
        # the deepest expression with the most arguments must fit, plus the query marker
        longest = _max_len(self.max_depth, self.max_args) + 1
        if self.seq_len < longest:
            raise ConfigError("seq_len", f"{self.seq_len} is shorter than the longest expression ({longest} tokens for "
                                         f"max_depth={self.max_depth}, max_args={self.max_args})")


def _max_len(depth: int, args: int) -> int:
    # "[OP" + args children + "]": a leaf is one token
    if depth == 0:
        return 1
    return 2 + args * _max_len(depth - 1, args)


# token ids: 0 pad, 1 query, 2..11 digits, 12..15 ops, 16 close bracket
_DIGIT0, _OP0, _CLOSE = 2, 12, 16
LISTOPS_VOCAB = 17


def _expr(rng: random.Random, depth: int, cfg: ListOpsLiteConfig) -> tuple[list[int], int]:
    if depth == 0 or (depth < cfg.max_depth and rng.random() < 0.3):
        d = rng.randrange(10)
        return [_DIGIT0 + d], d
    op = rng.randrange(len(OPS))
    toks, vals = [_OP0 + op], []
    for _ in range(rng.randint(2, cfg.max_args)):
        t, v = _expr(rng, depth - 1, cfg)
        toks += t
        vals.append(v)
    toks.append(_CLOSE)
    name = OPS[op]
    if name == "MAX":
        val = max(vals)
    elif name == "MIN":
        val = min(vals)
    elif name == "MED":
        val = sorted(vals)[len(vals) // 2]
    else:
        val = sum(vals) % 10
    return toks, val


def generate_listops(cfg: ListOpsLiteConfig, n: int, seed: int) -> dict[str, torch.Tensor]:
    rng = random.Random(seed)
    tokens = torch.zeros(n, cfg.seq_len, dtype=torch.long)
    lengths = torch.zeros(n, dtype=torch.long)
    labels = torch.zeros(n, dtype=torch.long)
    for i in range(n):
        toks, val = _expr(rng, cfg.max_depth, cfg)
        toks = toks + [QUERY]
        tokens[i, : len(toks)] = torch.tensor(toks)
        lengths[i], labels[i] = len(toks), val
    mask = torch.arange(cfg.seq_len)[None] < lengths[:, None]
    return {"tokens": tokens, "label": labels, "lengths": lengths, "mask": mask}


class ListOpsLiteDataset(_TensorSplits):
    """ListOps-lite classification (use the head's `forward_classify`)."""

    def __init__(self, cfg: ListOpsLiteConfig, build: BuildContext | None = None):
        self.cfg = cfg
        self._splits = _load_or_make(build, "listops_lite", cfg, lambda: {
            "train": generate_listops(cfg, cfg.n_train, cfg.seed * 2 + 1),
            "eval": generate_listops(cfg, cfg.n_eval, cfg.seed * 2 + 2),
        })
        self.spec = DataSpec("listops_lite", vocab_size=LISTOPS_VOCAB, n_classes=10, seq_len=cfg.seq_len, task="listops")


# ---- listops-recall ------------------------------------------------------------------------


@attrs.frozen
class ListOpsRecallConfig:
    """ListOps whose last operand is a variable defined hundreds of tokens earlier."""

    seq_len: int = field(512, help="tokens per sequence (the seed's ListOps preset length)", validator=in_range(8, None))
    n_vars: int = field(32, help="distinct variable tokens", validator=positive)
    n_defs: int = field(4, help="variables defined (``x d``) per sequence among the fillers", validator=positive)
    n_operands: int = field(2, help="digit operands of the final expression, before the variable", validator=positive)
    n_fillers: int = field(32, help="distinct filler tokens", validator=positive)
    n_train: int = field(4096, help="training sequences", validator=positive)
    n_eval: int = field(512, help="evaluation sequences", validator=positive)
    n_val: int = field(0, help="validation sequences, split 'val', for choices and in-training evaluation; 0: none",
                       validator=in_range(0, None))
    seed: int = field(0, help="seed of the generator (independent of run.seed)")

    def __attrs_post_init__(self):
        need = 2 * self.n_defs + self.n_operands + 2
        if self.seq_len < need:
            raise ConfigError("seq_len", f"{self.seq_len} is shorter than the layout: {self.n_defs} definitions and an "
                                         f"expression of {self.n_operands + 2} tokens need at least {need}")
        if self.n_defs > self.n_vars:
            raise ConfigError("n_defs", f"{self.n_defs} definitions need distinct variables but n_vars is {self.n_vars}")


# token ids after the ListOps ones: variables, then fillers
_VAR0 = LISTOPS_VOCAB


def fill0_of(cfg: ListOpsRecallConfig) -> int:
    return _VAR0 + cfg.n_vars


def generate_listops_recall(cfg: ListOpsRecallConfig, n: int, seed: int) -> dict[str, torch.Tensor]:
    """``… x_i d_i …`` definitions among fillers, then ``OP d_1 … d_m x_k``; label = OP(d_1…d_m, value of x_k).

    The expression's digits sit next to the query, within the trunk's short reach; the
    variable's value sits anywhere in the first L − m − 2 tokens, so only a memory of the
    definitions recovers it. `needle_pos` is the position of that value's digit and
    `read_target` the value itself (what the memory's read should recall).
    """
    g = torch.Generator().manual_seed(seed)
    L, V, m = cfg.seq_len, cfg.n_defs, cfg.n_operands
    expr = m + 2
    fill0 = fill0_of(cfg)
    tokens = torch.randint(fill0, fill0 + cfg.n_fillers, (n, L), generator=g)
    names = torch.rand(n, cfg.n_vars, generator=g).argsort(-1)[:, :V]
    values = torch.randint(0, 10, (n, V), generator=g)
    free = L - expr - 2 * V
    starts = torch.rand(n, free + V, generator=g).argsort(-1)[:, :V].sort(-1).values + torch.arange(V)[None]
    rows = torch.arange(n)
    tokens[rows[:, None], starts] = _VAR0 + names
    tokens[rows[:, None], starts + 1] = _DIGIT0 + values
    op = torch.randint(0, len(OPS), (n,), generator=g)
    digits = torch.randint(0, 10, (n, m), generator=g)
    which = torch.randint(0, V, (n,), generator=g)
    tokens[:, L - expr] = _OP0 + op
    tokens[:, L - expr + 1 : L - 1] = _DIGIT0 + digits
    tokens[:, L - 1] = _VAR0 + names[rows, which]
    args = torch.cat([digits, values[rows, which, None]], 1).sort(-1).values
    by_op = torch.stack([args[:, -1], args[:, 0], args[:, (m + 1) // 2], args.sum(-1) % 10], 1)  # OPS order
    label = by_op[rows, op]
    return {"tokens": tokens, "label": label, "needle_pos": starts[rows, which] + 1, "read_target": values[rows, which]}


class ListOpsRecallDataset(_TensorSplits):
    """ListOps with a long-range variable operand: a test of the trace (10 classes)."""

    def __init__(self, cfg: ListOpsRecallConfig, build: BuildContext | None = None):
        self.cfg = cfg

        def make() -> dict:
            splits = {"train": generate_listops_recall(cfg, cfg.n_train, cfg.seed * 2 + 1),
                      "eval": generate_listops_recall(cfg, cfg.n_eval, cfg.seed * 2 + 2)}
            if cfg.n_val:  # a stream of its own: adding it changes neither train nor eval
                splits["val"] = generate_listops_recall(cfg, cfg.n_val, 2**62 + cfg.seed)
            return splits

        self._splits = _load_or_make(build, "listops_recall", cfg, make)
        self.splits = tuple(self._splits)
        self.spec = DataSpec("listops_recall", vocab_size=fill0_of(cfg) + cfg.n_fillers, n_classes=10,
                             seq_len=cfg.seq_len, n_pairs=cfg.n_defs, task="listops_recall")


