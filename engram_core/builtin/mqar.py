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
predicts labels[t + 1]); ``write_mask`` the context region; ``read_mask`` the query
region (memories are written from the context, read in the queries). No
``attention_mask``: a sequence is never padded, and without one the attention needs no
per-sequence mask (on a GPU a (B, 1, L, L) mask costs more than the rest of the block).
The train and eval splits are generated from different seeds of `seed`; with `n_val` > 0 a
third split, `val`, from another (disjoint streams: adding it changes neither train nor eval).
Choose on `val` (a stage's `eval_split = "val"`), report on `eval`.
"""

from __future__ import annotations

from collections.abc import Iterator

import attrs
import torch

from .. import cache
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
    n_eval: int = field(512, help="evaluation sequences (the reported split)", validator=positive)
    n_val: int = field(0, help="validation sequences, split 'val', for choices (steps, rates); 0: no val split",
                       validator=in_range(0, None))
    seed: int = field(0, help="seed of the generator (independent of run.seed)")

    def __attrs_post_init__(self):
        need = 4 * self.n_pairs
        if self.seq_len < need:
            raise ConfigError("seq_len", f"{self.seq_len} tokens cannot hold {self.n_pairs} pairs and their queries "
                                         f"(needs >= 4 * n_pairs = {need}); raise seq_len or lower n_pairs")
        n_keys = self.vocab_size // 2 - 1
        if self.n_pairs > n_keys:
            raise ConfigError("n_pairs", f"{self.n_pairs} distinct keys need vocab_size >= {2 * (self.n_pairs + 1)}, got {self.vocab_size}")


def distinct_keys(n: int, k: int, n_keys: int, g: torch.Generator) -> torch.Tensor:
    """(n, k) ids in [0, n_keys), distinct within each row; every ordered choice equally likely.

    Floyd's algorithm, vectorised over rows: k draws per row whatever `n_keys` (sorting the
    whole key range per row cost 20 s at 100k rows and 4,095 keys). Step j draws t from
    [0, j]; a t the row already holds is replaced by j, which no earlier step could draw:
    the set is uniform. Its order is not (a replaced j comes late), hence the shuffle.
    """
    keys = torch.empty(k, n, dtype=torch.int32)  # draw-major and narrow: the membership test reads contiguous rows
    for i, j in enumerate(range(n_keys - k, n_keys)):
        t = (torch.rand(n, generator=g, dtype=torch.float64) * (j + 1)).to(torch.int32)
        held = (keys[:i] == t).any(0)
        keys[i] = torch.where(held, j, t)
    return keys.T.long().gather(1, torch.rand(n, k, generator=g).argsort(1))


def query_slots(cfg: MQARConfig, n: int, slots: int, g: torch.Generator) -> torch.Tensor:
    """(n, n_pairs) distinct query slots per sequence in [0, slots), drawn by `query_spacing`.

    'random': uniform, as the keys are drawn. 'power': weighted sampling without replacement by
    the Gumbel top-k trick (the n_pairs largest log-weight + Gumbel noise), the same
    distribution as drawing one slot at a time in proportion to the weights
    (torch.multinomial without replacement), in one topk.
    """
    N = cfg.n_pairs
    if cfg.query_spacing == "packed":
        return torch.arange(N).expand(n, N)
    if cfg.query_spacing == "random":  # equal weights: any N distinct slots, as the keys are drawn
        return distinct_keys(n, N, slots, g)
    log_weights = (cfg.power_a - 1) * torch.arange(1, slots + 1, dtype=torch.float64).log()
    gumbel = -torch.rand(n, slots, generator=g, dtype=torch.float64).log().neg().log()
    return (log_weights + gumbel).topk(N, dim=1).indices


def generate_mqar(cfg: MQARConfig, n: int, seed: int) -> dict[str, torch.Tensor]:
    """`n` sequences from `seed` (deterministic): input_ids, labels, write/read masks.

    The masks are the same for every sequence: (n, L) views of one row (no memory per sequence)."""
    g = torch.Generator().manual_seed(seed)
    N, L, V = cfg.n_pairs, cfg.seq_len, cfg.vocab_size
    half = V // 2
    keys = 1 + distinct_keys(n, N, half - 1, g)
    values = torch.randint(half, V, (n, N), generator=g)
    ids = torch.zeros(n, L, dtype=torch.long)
    ids[:, 0 : 2 * N : 2] = keys
    ids[:, 1 : 2 * N : 2] = values
    chosen = query_slots(cfg, n, (L - 2 * N) // 2, g)  # query slots: a key and its value each
    order = torch.rand(n, N, generator=g).argsort(-1)  # which pair each chosen slot asks for
    q_pos = 2 * N + 2 * chosen  # (n, N) query key positions
    ids.scatter_(1, q_pos, keys.gather(1, order))
    ids.scatter_(1, q_pos + 1, values.gather(1, order))
    labels = torch.full_like(ids, -100)
    labels.scatter_(1, q_pos + 1, ids.gather(1, q_pos + 1))
    write = (torch.arange(L) < 2 * N).long()[None]
    return {"input_ids": ids, "labels": labels, "write_mask": write.expand(n, L), "read_mask": (1 - write).expand(n, L)}


def pack(data: dict[str, torch.Tensor], cfg: MQARConfig) -> dict[str, torch.Tensor]:
    """What the cache keeps of a split: the ids in the narrowest integer type that holds the
    vocabulary and the scored positions as booleans (a fifth of the int64 tensors' size);
    the masks follow from the config."""
    narrow = torch.int16 if cfg.vocab_size <= torch.iinfo(torch.int16).max + 1 else torch.int32
    return {"input_ids": data["input_ids"].to(narrow), "scored": data["labels"] != -100}


def unpack(stored: dict[str, torch.Tensor], cfg: MQARConfig) -> dict[str, torch.Tensor]:
    """The split `generate_mqar` made, from what `pack` kept."""
    ids = stored["input_ids"].long()
    n, L = ids.shape
    write = (torch.arange(L) < 2 * cfg.n_pairs).long()[None]
    return {"input_ids": ids, "labels": torch.where(stored["scored"], ids, -100),
            "write_mask": write.expand(n, L), "read_mask": (1 - write).expand(n, L)}


DATA_VERSION = 2  # 2: keys and uniform query slots by Floyd's algorithm, power-law slots by Gumbel top-k (1: argsort, multinomial; never cached)


def _one_row(t: torch.Tensor) -> bool:
    """A tensor expanded from one row (the masks: the same for every sequence)."""
    return t.dim() > 0 and t.shape[0] > 1 and t.stride(0) == 0


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; a tensor expanded from one row (the masks) stays one row there."""
    if _one_row(t):
        return t[:1].to(device).expand(t.shape)
    return t.to(device)


class MQARDataset(Dataset):
    """Multi-query associative recall (Zoology-style), splits train and eval (and val with `n_val`).

    Generated once per config and seed and cached (`engram_core.cache`, plugin "core", kind
    "mqar": the key holds the full config, the seed, DATA_VERSION and the generator's source).
    ``place(device)`` keeps the splits on the run's device; batches are then drawn there
    with the same CPU-generated indices, so they are the same on every device.
    """

    def __init__(self, cfg: MQARConfig, build: BuildContext | None = None):
        self.cfg = cfg
        self.splits = ("train", "val", "eval") if cfg.n_val else ("train", "eval")
        self._dry = build is not None and build.dry_run  # a check's few sequences: generated, never cached
        self.spec = self.dry_spec(cfg, build)
        self._splits = self._load(build.cache_dir if build is not None else None)
        self.device = torch.device("cpu")

    @classmethod
    def dry_dataset(cls, cfg: MQARConfig, build: BuildContext | None = None) -> MQARDataset:
        """Four sequences of each split of this config (`engram validate`'s dry forward),
        made in memory: nothing is cached for a check."""
        small = attrs.evolve(cfg, n_train=4, n_eval=4, n_val=4 if cfg.n_val else 0)
        return cls(small, BuildContext(seed=small.seed, dry_run=True))

    @staticmethod
    def dry_spec(cfg: MQARConfig, build: BuildContext | None = None) -> DataSpec:
        """The spec from the settings alone (`engram validate` generates nothing)."""
        return DataSpec("mqar", vocab_size=cfg.vocab_size, max_len=cfg.seq_len, seq_len=cfg.seq_len, n_pairs=cfg.n_pairs,
                        task="mqar", max_scored=cfg.n_pairs, splits=("train", "val", "eval") if cfg.n_val else ("train", "eval"))

    def cache_entry(self, cache_dir=None) -> cache.Entry:
        return cache.entry(cache_dir, plugin="core", kind="mqar", config=self.cfg, seed=self.cfg.seed, version=DATA_VERSION,
                           builder=[generate_mqar, distinct_keys, query_slots, pack, unpack], ext="pt")

    def _load(self, cache_dir) -> dict[str, dict[str, torch.Tensor]]:
        cfg = self.cfg

        def build():
            splits = {"train": generate_mqar(cfg, cfg.n_train, cfg.seed * 2 + 1), "eval": generate_mqar(cfg, cfg.n_eval, cfg.seed * 2 + 2)}
            if cfg.n_val:  # a stream no train or eval split uses (those are seed * 2 + 1 and + 2)
                splits["val"] = generate_mqar(cfg, cfg.n_val, 2**62 + cfg.seed)
            return splits

        if self._dry:
            return build()
        return cache.load_or_build(
            self.cache_entry(cache_dir), build,
            save_fn=lambda splits, path: torch.save({s: pack(d, cfg) for s, d in splits.items()}, path),
            load_fn=lambda path: {s: unpack(d, cfg) for s, d in torch.load(path, weights_only=True).items()},
        )

    def place(self, device: torch.device | str) -> None:
        """Keep the splits on `device` (once, before training): `sample` and `eval_batches`
        then index there and no batch crosses from the host."""
        device = torch.device(device)
        self._splits = {s: {k: _to_device(v, device) for k, v in d.items()} for s, d in self._splits.items()}
        self.device = device

    def _split(self, split: str) -> dict[str, torch.Tensor]:
        if split not in self._splits:
            raise ConfigError("split", f"mqar has no split {split!r}; it has {', '.join(self._splits)}")
        return self._splits[split]

    def sample(self, split, batch_size, generator):
        data = self._split(split)
        # indices from the CPU generator whatever the device: the same batches, and exact resume
        idx = torch.randint(0, data["input_ids"].shape[0], (batch_size,), generator=generator)
        if self.device.type != "cpu":
            idx = idx.to(self.device, non_blocking=True)
        # the masks are one row for every sequence: a view of it, not a gather (a kernel less each)
        return {k: v[:1].expand(batch_size, -1) if _one_row(v) else v[idx] for k, v in data.items()}

    def eval_batches(self, split, batch_size) -> Iterator[dict]:
        data = self._split(split)
        n = data["input_ids"].shape[0]
        for i in range(0, n, batch_size):
            # contiguous: a mask slice would otherwise be a stride-0 view of one row
            yield {k: v[i : i + batch_size].contiguous() for k, v in data.items()}
