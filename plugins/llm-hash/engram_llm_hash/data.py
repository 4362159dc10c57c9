"""Data sets: `exact_match` (the seed's fact categories, from tables shipped here) and
`long_recall` (a key stated, 50-400 tokens of distraction, then the query).

Both yield batches of ``input_ids`` (BOS + prompt + completion + EOS, right-padded),
``attention_mask`` and ``labels`` (-100 except on the completion and its EOS, so the
objective is cross-entropy on completion tokens only), plus ``category`` (list of str).
Examples are generated deterministically from `seed` and cached as JSONL through
`engram_core.cache` (``<cache_dir>/llm-hash/<name>-<key>.jsonl``), keyed by the full config,
the seed, `DATA_VERSION`, this module's source and a digest of the shipped tables.

Splits of `exact_match`, per category, disjoint by key:
  pretrain  facts the base model learns in its own first stage (its "world knowledge";
            it also teaches the format)
  train     facts the memory (or LoRA) is trained on
  seen      the train facts again, for recall ("seen keys"); `eval` is an alias
  valid     unseen facts (for early stopping by a user; not trained on)
  test      unseen facts: no memorisation can answer them
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import attrs
import torch

from engram_core import cache
from engram_core.components import BuildContext, Dataset, DataSpec
from engram_core.config import ConfigError, field, in_range, positive

CATEGORIES = (
    "capital",
    "element_name",
    "element_number",
    "port",
    "http_code",
    "unit_conversion",
    "acronym",
    "synthetic",
)


@attrs.define(frozen=True)
class Example:
    prompt: str
    completion: str
    category: str


# ---- tokenizers ----------------------------------------------------------------------


class TextCodec:
    """The byte tokenizer of the core, a local HF tokenizer directory, or an engram model's
    (`engram:stdlib-lm-cpu`, engram_core.lm: its cached folder, pretrained first if missing)."""

    def __init__(self, name: str = "byte", cache_dir=None):
        self.name = name
        if name == "byte":
            from engram_core.nn import ByteTokenizer

            tok = ByteTokenizer()
            self._enc = lambda s: list(s.encode("utf-8"))
            self._dec = tok.decode
            self.vocab_size, self.pad_id, self.bos_id, self.eos_id = tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id
            self.hf = None
        else:
            path = _model_folder(name, "tokenizer", cache_dir)
            if not path.is_dir():
                raise ConfigError("tokenizer", f"must be 'byte', 'engram:NAME' or a local tokenizer directory, got {name!r}")
            from transformers import AutoTokenizer

            try:
                self.hf = AutoTokenizer.from_pretrained(str(path))
            except Exception as exc:  # noqa: BLE001 - any loader failure is a config problem
                raise ConfigError("tokenizer", f"cannot load a tokenizer from {name}: {str(exc).splitlines()[0]}") from None
            self._enc = lambda s: self.hf.encode(s, add_special_tokens=False)
            self._dec = lambda ids: self.hf.decode([i for i in (ids.tolist() if hasattr(ids, "tolist") else ids)], skip_special_tokens=True)
            self.vocab_size = len(self.hf)
            self.eos_id = self.hf.eos_token_id if self.hf.eos_token_id is not None else 0
            self.bos_id = self.hf.bos_token_id
            self.pad_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return list(self._enc(text))

    def decode(self, ids) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        cut = []
        for i in ids:
            if i == self.eos_id:
                break
            cut.append(i)
        return self._dec(cut)

    def prompt_ids(self, prompt: str) -> list[int]:
        return ([self.bos_id] if self.bos_id is not None else []) + self.encode(prompt)


def _model_folder(name: str, key: str, cache_dir=None) -> Path:
    """`engram:NAME` -> the general LM's tokenizer (engram_core.lm: trained if missing, the
    model is not needed for it); else the path."""
    if name.startswith("engram:"):
        from engram_core.lm import tokenizer_folder

        return tokenizer_folder(name, cache_dir, key=key)
    return Path(name).expanduser()


def collate(examples: list[Example], codec: TextCodec) -> dict:
    seqs, labels = [], []
    for ex in examples:
        p = codec.prompt_ids(ex.prompt)
        c = codec.encode(ex.completion) + [codec.eos_id]
        seqs.append(p + c)
        labels.append([-100] * len(p) + c)
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), codec.pad_id, dtype=torch.long)
    lab = torch.full((len(seqs), n), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, (s, lb) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(s)] = torch.tensor(lb)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab, "category": [e.category for e in examples]}


class TextCompletionDataset(Dataset):
    """Common machinery: splits of Examples, random and ordered batches."""

    splits: tuple[str, ...] = ()
    _splits: dict[str, list[Example]]
    codec: TextCodec

    def examples(self, split: str) -> list[Example]:
        if split not in self._splits:
            raise ConfigError("split", f"data set has no split {split!r}; it has {', '.join(self._splits)}")
        return self._splits[split]

    def sample(self, split, batch_size, generator):
        exs = self.examples(split)
        idx = torch.randint(0, len(exs), (batch_size,), generator=generator).tolist()
        return collate([exs[i] for i in idx], self.codec)

    def count_tokens(self, batch: dict) -> int:
        """Real (unpadded) tokens in a batch: the engine's throughput/tokens_per_s."""
        return int(batch["attention_mask"].sum())

    def eval_batches(self, split, batch_size) -> Iterator[dict]:
        exs = self.examples(split)
        for i in range(0, len(exs), batch_size):
            yield collate(exs[i : i + batch_size], self.codec)

    def _make_spec(self, name: str, max_len: int) -> DataSpec:
        cats = sorted({e.category for exs in self._splits.values() for e in exs})
        return DataSpec(
            name,
            vocab_size=self.codec.vocab_size,
            pad_id=self.codec.pad_id,
            eos_id=self.codec.eos_id,
            bos_id=self.codec.bos_id,
            tokenizer=self.codec.name,
            max_len=max_len,
            categories=tuple(cats),
            codec=self.codec,
        )

    def _max_len(self) -> int:
        return max(len(self.codec.prompt_ids(e.prompt)) + len(self.codec.encode(e.completion)) + 1 for exs in self._splits.values() for e in exs)


# bump when a generator's output changes (the cache key also holds this module's source)
DATA_VERSION = 1


def _tables_digest() -> str:
    """sha256 over the shipped fact tables: editing a table changes the generated data."""
    h = hashlib.sha256()
    for f in sorted(resources.files("engram_llm_hash").joinpath("tables").iterdir(), key=lambda f: f.name):
        if f.name.endswith(".tsv"):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _cached_splits(build: BuildContext | None, name: str, cfg, generate) -> dict[str, list[Example]]:
    """The splits for `cfg`: from the cache, or generated and cached (JSONL)."""
    inputs = {"tables": _tables_digest()} if name == "exact_match" else {}
    e = cache.entry(build.cache_dir if build is not None else None, plugin="llm-hash", kind=name, config=cfg,
                    seed=cfg.seed, version=DATA_VERSION, builder=sys.modules[__name__], ext="jsonl", inputs=inputs)
    return cache.load_or_build(e, lambda: generate(cfg), save_fn=_save, load_fn=_load)


def _save(splits: dict[str, list[Example]], path: Path) -> None:
    with path.open("w") as f:
        for split, exs in splits.items():
            for e in exs:
                f.write(json.dumps({"split": split, "input": e.prompt, "output": e.completion, "category": e.category}) + "\n")


def _load(path: Path, field_key: str = "path", default_split: str | None = None) -> dict[str, list[Example]]:
    out: dict[str, list[Example]] = {}
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(field_key, f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise ConfigError(field_key, f"{path}:{n}: expected a JSON object per line")
            for need in ("input", "output"):
                if need not in rec:
                    raise ConfigError(field_key, f"{path}:{n}: missing field '{need}' (each line needs 'input' and 'output')")
            split = rec.get("split", default_split)
            if split is None:
                raise ConfigError(field_key, f"{path}:{n}: missing field 'split' (or give the file's split with a default)")
            out.setdefault(split, []).append(Example(str(rec["input"]), str(rec["output"]), str(rec.get("category", "custom"))))
    return out


# ---- exact_match ------------------------------------------------------------------------


def _table(name: str) -> list[list[str]]:
    text = resources.files("engram_llm_hash").joinpath("tables", name).read_text()
    return [line.split("\t") for line in text.splitlines() if line.strip()]


def _category_items(category: str, rng: random.Random, n_synthetic: int, key_len: int) -> list[tuple[str, str]]:
    """(prompt, completion) pairs of one category, before splitting."""
    if category == "capital":
        return [(f"CAPITAL:{a}=", b) for a, b in _table("capitals.tsv")]
    if category == "element_name":
        return [(f"ELEMENT:{s}=", name) for s, name, _ in _table("elements.tsv")]
    if category == "element_number":
        return [(f"ATOMIC:{name}=", num) for _, name, num in _table("elements.tsv")]
    if category == "port":
        return [(f"PORT:{a}=", b) for a, b in _table("ports.tsv")]
    if category == "http_code":
        return [(f"HTTP:{a}=", b) for a, b in _table("http_codes.tsv")]
    if category == "acronym":
        return [(f"ACRONYM:{a}=", b) for a, b in _table("acronyms.tsv")]
    if category == "unit_conversion":
        out = []
        for a, b, f in _table("units.tsv"):
            for q in (1, 2, 3, 5, 7):
                out.append((f"UNIT:{q} {a} in {b}=", str(q * int(f))))
        return out
    if category == "synthetic":
        greek = [g[0] for g in _table("greek.tsv")]
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
        keys: set[str] = set()
        out = []
        while len(out) < n_synthetic:
            k = "".join(rng.choice(alphabet) for _ in range(key_len))
            if k in keys:
                continue
            keys.add(k)
            out.append((f"KEY:{k}=", f"{rng.choice(greek)}_{rng.randrange(1000):03d}"))
        return out
    raise ConfigError("categories", f"unknown category {category!r}; known: {', '.join(CATEGORIES)}")


def _categories_ok(inst, attribute, value):
    bad = [c for c in value if c not in CATEGORIES]
    if bad or not value:
        raise ConfigError(attribute.name, f"unknown category {bad[0]!r}; known: {', '.join(CATEGORIES)}" if bad else "must name at least one category")


@attrs.frozen
class ExactMatchConfig:
    """Key→value facts by category; see the module doc for the splits."""

    categories: list[str] = field(factory=lambda: list(CATEGORIES), help="categories to include", validator=_categories_ok)
    n_synthetic: int = field(300, help="synthetic KEY:xxxx=greek_NNN pairs generated", validator=positive)
    synthetic_key_len: int = field(4, help="characters of a synthetic key", validator=in_range(2, 16))
    pretrain_fraction: float = field(0.5, help="fraction of each category's facts the base model learns first", validator=in_range(0.0, 0.9))
    valid_fraction: float = field(0.05, help="fraction held out as valid", validator=in_range(0.0, 0.5))
    test_fraction: float = field(0.1, help="fraction held out as test", validator=in_range(0.0, 0.5))
    n_seen: int = field(0, help="train facts in the 'seen' recall split (0 = all)", validator=in_range(0, None))
    seed: int = field(0, help="seed of the generator and the split (independent of run.seed)")
    path: str = field("", help="a JSONL file of {input, output, split[, category]} to use instead of the generated data")
    tokenizer: str = field("byte", help="'byte' (offline byte-level), 'engram:NAME' (the general LM's) or a local HF tokenizer directory")

    def __attrs_post_init__(self):
        if self.pretrain_fraction + self.valid_fraction + self.test_fraction >= 0.95:
            raise ConfigError("pretrain_fraction", "pretrain + valid + test fractions leave < 5% of facts to train on")


class ExactMatchDataset(TextCompletionDataset):
    """The seed's exact-match facts (capitals, elements, ports, HTTP codes, unit
    conversions, acronyms, synthetic key→value), split by key into pretrain / train /
    seen (= train, recall) / valid / test. `eval` = `seen`."""

    def __init__(self, cfg: ExactMatchConfig, build: BuildContext | None = None):
        self.cfg = cfg
        self.codec = TextCodec(cfg.tokenizer, build.cache_dir if build is not None else None)
        if cfg.path:
            p = Path(cfg.path).expanduser()
            if not p.is_file():
                raise ConfigError("path", f"data file does not exist: {cfg.path}")
            splits = _load(p)
            if "train" not in splits:
                raise ConfigError("path", f"{p}: no example has split 'train' (splits found: {', '.join(splits) or 'none'})")
        else:
            splits = _cached_splits(build, "exact_match", cfg, self._generate)
        splits.setdefault("pretrain", [])
        splits.setdefault("valid", [])
        splits.setdefault("test", [])
        train = splits["train"]
        splits["seen"] = train[: cfg.n_seen] if cfg.n_seen else list(train)
        splits["eval"] = splits["seen"]
        self._splits = splits
        self.splits = tuple(splits)
        self.spec = self._make_spec("exact_match", self._max_len())

    @staticmethod
    def _generate(cfg: ExactMatchConfig) -> dict[str, list[Example]]:
        rng = random.Random(cfg.seed)
        out: dict[str, list[Example]] = {"pretrain": [], "train": [], "valid": [], "test": []}
        for cat in cfg.categories:
            items = _category_items(cat, rng, cfg.n_synthetic, cfg.synthetic_key_len)
            rng.shuffle(items)
            n = len(items)
            n_pre = int(round(cfg.pretrain_fraction * n))
            n_val = int(round(cfg.valid_fraction * n))
            n_test = int(round(cfg.test_fraction * n))
            parts = {
                "pretrain": items[:n_pre],
                "valid": items[n_pre : n_pre + n_val],
                "test": items[n_pre + n_val : n_pre + n_val + n_test],
                "train": items[n_pre + n_val + n_test :],
            }
            for split, its in parts.items():
                out[split] += [Example(p, c, cat) for p, c in its]
        for split in out:
            rng.shuffle(out[split])
        return out


# ---- long_recall -----------------------------------------------------------------------

_WORDS = (
    "the of and to in is was for on are with as by at from his her they this that have had not but "
    "what all were when we there can an your which their said if will each about how up out them then "
    "she many some so these would other into has more two like him see time could no make than first "
    "been its who now people my made over did down only way find use may water long little very after "
    "words called just where most know get through back much before go good new write our used me man "
    "too any day same right look think also around another came come work three word must because does "
    "part even place well such here take why things help put years different away again off went old"
).split()


@attrs.frozen
class LongRecallConfig:
    """`The code for <name> is <value>.` then distraction words, then the query."""

    n_train: int = field(4000, help="training examples", validator=positive)
    n_eval: int = field(240, help="eval/test examples, spread evenly over the buckets", validator=positive)
    min_distraction: int = field(50, help="shortest distraction (tokens)", validator=positive)
    max_distraction: int = field(400, help="longest distraction (tokens)", validator=positive)
    buckets: list[int] = field(factory=lambda: [50, 100, 200, 400], help="bucket edges for accuracy vs distraction length")
    key_len: int = field(4, help="letters of a name", validator=in_range(2, 16))
    n_pairs: int = field(
        0,
        help="0: a fresh name and value per example (pure in-context recall); N: names/values drawn from a fixed set of N pairs, as in the seed's demo (recall can also come from memorised pairs)",
        validator=in_range(0, None),
    )
    seed: int = field(0, help="seed of the generator")
    tokenizer: str = field("byte", help="'byte', 'engram:NAME' (the general LM's) or a local HF tokenizer directory")

    def __attrs_post_init__(self):
        if self.max_distraction < self.min_distraction:
            raise ConfigError("max_distraction", f"must be >= min_distraction ({self.min_distraction}), got {self.max_distraction}")
        if len(self.buckets) < 2 or sorted(self.buckets) != list(self.buckets):
            raise ConfigError("buckets", f"must be >= 2 increasing edges, got {self.buckets!r}")


class LongRecallDataset(TextCompletionDataset):
    """A key-value statement, 50-400 tokens of distraction, then the query; the example's
    category is its distraction bucket (``d50-100``), so exact-match per category is
    accuracy vs distraction length. Splits: train, eval, test."""

    def __init__(self, cfg: LongRecallConfig, build: BuildContext | None = None):
        self.cfg = cfg
        self.codec = TextCodec(cfg.tokenizer, build.cache_dir if build is not None else None)
        splits = _cached_splits(build, "long_recall", cfg, self._generate)
        self._splits = splits
        self.splits = tuple(splits)
        self.spec = self._make_spec("long_recall", self._max_len())

    @staticmethod
    def _bucket(cfg, n: int) -> str:
        edges = cfg.buckets
        for lo, hi in zip(edges[:-1], edges[1:]):
            if n < hi:
                return f"d{lo}-{hi}"
        return f"d{edges[-2]}-{edges[-1]}"

    @staticmethod
    def _pair(cfg, rng: random.Random) -> tuple[str, str]:
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(cfg.key_len)), f"{rng.randrange(1000):03d}"

    @classmethod
    def _one(cls, cfg, rng: random.Random, length: int, pairs=None) -> Example:
        name, value = rng.choice(pairs) if pairs else cls._pair(cfg, rng)
        words: list[str] = []
        total = 0
        while total < length:
            w = rng.choice(_WORDS)
            words.append(w)
            total += len(w) + 1
        distraction = " ".join(words)[:length]
        prompt = f"The code for {name} is {value}. {distraction} The code for {name} is "
        return Example(prompt, value, cls._bucket(cfg, length))

    @classmethod
    def _generate(cls, cfg) -> dict[str, list[Example]]:
        rng = random.Random(cfg.seed)
        pairs = [cls._pair(cfg, rng) for _ in range(cfg.n_pairs)]
        lo, hi = cfg.min_distraction, cfg.max_distraction
        train = [cls._one(cfg, rng, rng.randint(lo, hi), pairs) for _ in range(cfg.n_train)]
        out = {"train": train}
        for split in ("eval", "test"):
            # even spread over lengths, so every bucket has about the same count; new
            # distractions (and, with n_pairs = 0, new names and values)
            lengths = [lo + (hi - lo) * i // max(1, cfg.n_eval - 1) for i in range(cfg.n_eval)]
            out[split] = [cls._one(cfg, rng, n, pairs) for n in lengths]
        return out
