"""`mqar`: multi-query associative recall, generated locally and seeded (as in Zoology).

A sequence of `seq_len` tokens is a context of `n_pairs` key-value pairs
``k1 v1 k2 v2 ...`` followed by a query region of filler tokens (id 0) in which every key
appears once more, in a random order, at a position chosen by `query_spacing`, each
followed by its value. Only those values are scored: the model must recall, at each
query key, the value it was paired with in the context. Keys are distinct within a
sequence and drawn from ids [1, vocab_size/2); values from [vocab_size/2, vocab_size).

query_spacing  'random' (every slot of the query region equally likely), 'power' (Zoology's
               power law: early slots likelier, short gaps more common, `power_a`), or
               'packed' (queries back to back right after the context).

Batches (completion format, the one the core `causal_backbone` reads): ``input_ids``
(B, L); ``labels`` (B, L), the token at each scored position, -100 elsewhere (position t
predicts labels[t + 1]); ``attention_mask``; ``write_mask`` the context region;
``read_mask`` the query region (memories are written from the context, read in the
queries). The train and eval splits are generated from different seeds of `seed`.
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs
import torch

from ..components import BuildContext, Dataset, DataSpec
from ..config import ConfigError, field, in_range, one_of, positive

SPACINGS = ("random", "power", "packed")


@attrs.frozen
class MQARConfig:
    """Key-value pairs in context, then every key queried once; exact recall per query."""

    n_pairs: int = field(8, help="key-value pairs in the context (= queries per sequence)", validator=positive)
    seq_len: int = field(64, help="tokens per sequence (context 2*n_pairs + query region)", validator=positive)
    vocab_size: int = field(64, help="vocabulary: 0 filler, keys [1, V/2), values [V/2, V)", validator=in_range(8, None))
    query_spacing: str = field("random", help="where queries sit in the query region: 'random', 'power' (Zoology), 'packed'",
                               validator=one_of(*SPACINGS))
    power_a: float = field(0.01, help="'power' spacing: exponent a of the slot weights i^(a-1)", validator=in_range(1e-6, 1.0))
    n_train: int = field(20000, help="training sequences", validator=positive)
    n_eval: int = field(512, help="evaluation sequences", validator=positive)
    seed: int = field(0, help="seed of the generator (independent of run.seed)")

    def __attrs_post_init__(self):
        need = 4 * self.n_pairs
        if self.seq_len < need:
            raise ConfigError("seq_len", f"{self.seq_len} tokens cannot hold {self.n_pairs} pairs and their queries "
                                         f"(needs >= 4 * n_pairs = {need}); raise seq_len or lower n_pairs")
        n_keys = self.vocab_size // 2 - 1
        if self.n_pairs > n_keys:
            raise ConfigError("n_pairs", f"{self.n_pairs} distinct keys need vocab_size >= {2 * (self.n_pairs + 1)}, got {self.vocab_size}")


def generate_mqar(cfg: MQARConfig, n: int, seed: int) -> dict[str, torch.Tensor]:
    """`n` sequences from `seed` (deterministic): input_ids, labels, write/read masks."""
    g = torch.Generator().manual_seed(seed)
    N, L, V = cfg.n_pairs, cfg.seq_len, cfg.vocab_size
    half = V // 2
    keys = 1 + torch.rand(n, half - 1, generator=g).argsort(-1)[:, :N]  # distinct per sequence
    values = torch.randint(half, V, (n, N), generator=g)
    ids = torch.zeros(n, L, dtype=torch.long)
    ids[:, 0 : 2 * N : 2] = keys
    ids[:, 1 : 2 * N : 2] = values
    slots = (L - 2 * N) // 2  # query slots: a key and its value each
    if cfg.query_spacing == "packed":
        chosen = torch.arange(N).expand(n, N)
    else:
        i = torch.arange(1, slots + 1, dtype=torch.float64)
        weights = i ** (cfg.power_a - 1) if cfg.query_spacing == "power" else torch.ones(slots, dtype=torch.float64)
        chosen = torch.multinomial(weights.expand(n, slots), N, replacement=False, generator=g)
    order = torch.rand(n, N, generator=g).argsort(-1)  # which pair each chosen slot asks for
    q_pos = 2 * N + 2 * chosen  # (n, N) query key positions
    rows = torch.arange(n)[:, None]
    ids[rows, q_pos] = keys.gather(1, order)
    ids[rows, q_pos + 1] = values.gather(1, order)
    labels = torch.full_like(ids, -100)
    labels[rows, q_pos + 1] = ids[rows, q_pos + 1]
    pos = torch.arange(L)[None]
    write = (pos < 2 * N).expand(n, L).long()
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "write_mask": write, "read_mask": 1 - write}


class MQARDataset(Dataset):
    """Multi-query associative recall (Zoology-style), splits train and eval."""

    splits = ("train", "eval")

    def __init__(self, cfg: MQARConfig, build: BuildContext | None = None):
        self.cfg = cfg
        self._splits = {"train": generate_mqar(cfg, cfg.n_train, cfg.seed * 2 + 1), "eval": generate_mqar(cfg, cfg.n_eval, cfg.seed * 2 + 2)}
        self.spec = DataSpec("mqar", vocab_size=cfg.vocab_size, max_len=cfg.seq_len, seq_len=cfg.seq_len, n_pairs=cfg.n_pairs,
                             task="mqar")

    def _split(self, split: str) -> dict[str, torch.Tensor]:
        if split not in self._splits:
            raise ConfigError("split", f"mqar has no split {split!r}; it has {', '.join(self._splits)}")
        return self._splits[split]

    def sample(self, split, batch_size, generator):
        data = self._split(split)
        idx = torch.randint(0, data["input_ids"].shape[0], (batch_size,), generator=generator)
        return {k: v[idx] for k, v in data.items()}

    def eval_batches(self, split, batch_size) -> Iterator[dict]:
        data = self._split(split)
        n = data["input_ids"].shape[0]
        for i in range(0, n, batch_size):
            yield {k: v[i : i + batch_size] for k, v in data.items()}
