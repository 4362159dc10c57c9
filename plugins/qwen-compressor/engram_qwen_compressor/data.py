"""`digit_kv`: prompts of key/value statements; the question asks about one of them.

An episode is a context of `n_turns` statements (``KEY05 = 8``), each about a distinct
key, then a question about one target key (``Q: KEY05 = ``) whose answer is that key's
single digit. Under a budget of B tokens only the last B tokens of the context are kept;
everything before them is the *removed* segment.

The target is drawn per budget (`target_range`):

    removed  uniformly over the statements wholly inside the removed segment at that
             budget (default): a smaller budget removes more statements, so a memory
             has more to carry, and a reader that sees only the kept tokens is at
             chance (10 %)
    prompt   uniformly over all statements: some targets are in the kept tail

Each episode draws one uniform number for its target; at budget B it picks the
statement `floor(u · n)` of the n eligible ones, so the draw is fixed per episode and
budget (same episodes, same targets, every run).

Tokens are bytes by default (`tokenizer = "byte"`, budgets count bytes) or a local HF
tokenizer's (`tokenizer = "<dir>"`, budgets count its tokens). Statements are encoded
piece by piece (text before the digit, the digit, text after), so the digit is always
one token at a known position.

Every batch carries, for the budget it was made for, packed right-padded reader
sequences for three views (each starts with BOS; a prefix memory is inserted right
after the BOS):

    full     BOS + whole context + question                  (reader pretraining)
    kept     BOS + last B context tokens + question          (discard / latent / oracle)
    summary  BOS + last B-|gold| tokens with the gold statement inserted at a random
             statement boundary + question                   (summary baseline)

plus the removed tokens (the memory's input), where the value digits of the removed
statements sit in them, the target's statement position and the number of removed
statements, and, when `gold_fields`, the gold digit token and gold statement tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import attrs
import torch

from engram_core import cache
from engram_core.components import BuildContext, Dataset, DataSpec
from engram_core.config import ConfigError, field, in_range, one_of, positive

from .tokens import TextTokenizer, make_tokenizer

PLUGIN = "qwen-compressor"
# bump when the episodes generated for a config change (the cache key also holds this module's source)
DATA_VERSION = 4

# Statement templates. The first is the seed's rigid one; the others vary the words,
# the punctuation, the key's format and the order (digit first) so that a pooled
# embedding of a gold statement is no longer dominated by one shared template.
TEMPLATES = (
    "KEY{k} = {v}\n",
    "key {k} is {v}.\n",
    "KEY{k}: {v}\n",
    "set K{k} to {v}\n",
    "{v} is the value of KEY{k}\n",
    "#{k} -> {v}\n",
    "value(KEY{k}) = {v}\n",
    "KEY-{k} holds {v};\n",
)
QUESTION = "Q: KEY{k} = "
NEWLINE_TEXT = "\n"
TARGET_RANGES = ("removed", "prompt")


@attrs.frozen
class DigitKVConfig:
    """Key/value statements; the target is drawn per budget from the removed segment (or the prompt)."""

    n_turns: int = field(16, help="statements per prompt (distinct keys)", validator=positive)
    n_keys: int = field(100, help="size of the key alphabet KEY00..KEY{n_keys-1}", validator=in_range(2, 100))
    template_diversity: int = field(
        1, help=f"how many statement templates are mixed (1 = the seed's rigid 'KEY05 = 8'; up to {len(TEMPLATES)}: "
                "other phrasings, key formats and digit-first order)",
        validator=in_range(1, len(TEMPLATES)),
    )
    target_range: str = field("removed", help="'removed': target drawn uniformly over the statements removed at each "
                                              "budget; 'prompt': over all statements (some stay in the kept tail)",
                              validator=one_of(*TARGET_RANGES))
    tokenizer: str = field("byte", help="'byte' (UTF-8 bytes), 'engram:NAME' (the general LM's tokenizer, engram_core.lm) "
                                        "or a local directory with a saved HF tokenizer (the reader's model directory on "
                                        "the HF path); budgets count its tokens")
    budget: int = field(64, help="kept context tokens for training batches (`sample`)", validator=positive)
    budgets: list[int] = field(
        factory=lambda: [64, 96, 128], help="every budget evaluated (each must leave a whole statement removed)"
    )
    n_train: int = field(20000, help="training episodes", validator=positive)
    n_eval: int = field(512, help="evaluation episodes (the reported split)", validator=positive)
    n_val: int = field(0, help="validation episodes, split 'val', for choices (steps, budgets); 0: none",
                       validator=in_range(0, None))
    gold_fields: bool = field(True, help="include gold digit / gold statement tokens (needed by oracle modes)")
    seed: int = field(0, help="seed of the generator (independent of run.seed)")

    def __attrs_post_init__(self):
        if self.n_turns > self.n_keys:
            raise ConfigError("n_turns", f"needs n_turns <= n_keys (keys are distinct), got {self.n_turns} > {self.n_keys}")
        if not self.budgets or any((not isinstance(b, int)) or b <= 0 for b in self.budgets):
            raise ConfigError("budgets", f"must be a non-empty list of positive integers, got {self.budgets!r}")


def encode_statement(tok: TextTokenizer, template: str, key: int, digit: int) -> tuple[list[int], int]:
    """(token ids, index of the value digit) of one statement, encoded piece by piece."""
    before, after = template.split("{v}")
    head = tok.encode(before.format(k=f"{key:02d}"))
    value = tok.encode(str(digit))
    if len(value) != 1:
        raise ConfigError("tokenizer", f"the digit {digit} is {len(value)} tokens in this tokenizer; digit_kv needs "
                                       "every digit to be one token")
    return head + value + tok.encode(after.format(k=f"{key:02d}")), len(head)


def digit_ids(tok: TextTokenizer) -> tuple[int, ...]:
    out = []
    for d in range(10):
        ids = tok.encode(str(d))
        if len(ids) != 1:
            raise ConfigError("tokenizer", f"the digit {d} is {len(ids)} tokens in this tokenizer; digit_kv needs every "
                                           "digit to be one token")
        out.append(ids[0])
    return tuple(out)


def make_spec(cfg: DigitKVConfig, tok: TextTokenizer) -> DataSpec:
    """The spec from the config alone (no episodes generated): lengths are bounds over every
    template and key, so `engram validate` and the built data set agree. Refuses a budget
    that could leave no whole statement in the removed segment of some episode."""
    lengths = [len(encode_statement(tok, TEMPLATES[t], k, 0)[0])
               for t in range(cfg.template_diversity) for k in range(cfg.n_keys)]
    q_len = max(len(tok.encode(QUESTION.format(k=f"{k:02d}"))) for k in range(cfg.n_keys))
    min_len, max_len = min(lengths), max(lengths)
    min_context = cfg.n_turns * min_len
    max_budget = min_context - max_len  # the first statement is wholly removed in every episode up to this budget
    for key, values in (("budgets", list(cfg.budgets)), ("budget", [cfg.budget])):
        for b in values:
            if b > max_budget:
                raise ConfigError(key, f"budget {b} leaves no whole statement in the removed segment of the shortest "
                                       f"prompt ({cfg.n_turns} statements, {min_context} tokens, statements up to "
                                       f"{max_len} tokens): the largest budget is {max_budget}; lower it or raise "
                                       "data.n_turns")
    return DataSpec(
        "digit_kv",
        vocab_size=tok.vocab_size,
        pad_id=tok.pad_id,
        bos_id=tok.bos_id,
        answer_token_ids=digit_ids(tok),
        chance=0.1,
        budget=cfg.budget,
        budgets=tuple(cfg.budgets),
        max_budget=max_budget,
        n_turns=cfg.n_turns,
        target_range=cfg.target_range,
        max_full_len=1 + cfg.n_turns * max_len + q_len,
        min_context_len=min_context,
        max_gold_len=max_len,
        gold_fields=cfg.gold_fields,
        tokenizer=tok.name,
    )


def check_budgets(budgets, spec, key: str = "budgets") -> None:
    """A budget a component asks for must leave a whole statement removed in every episode."""
    if spec is None:
        return
    for b in budgets:
        if not isinstance(b, int) or b <= 0:
            raise ConfigError(key, f"budgets must be positive integers, got {b!r}")
        if b > spec.max_budget:
            raise ConfigError(key, f"budget {b} leaves no whole statement in the removed segment of the shortest "
                                   f"prompt ({spec.min_context_len} tokens): the data allows budgets up to "
                                   f"{spec.max_budget}; lower it or raise data.n_turns")


@attrs.frozen
class Episode:
    context: list[int]  # token ids of all statements
    spans: list[list[int]]  # [start, end) of each statement in `context`
    value_pos: list[int]  # index in `context` of each statement's value digit
    keys: list[int]
    digits: list[int]
    target_u: float  # uniform draw: which eligible statement is the target at a budget
    summary_u: float  # uniform draw: where the gold statement goes in the summary view


def _generate(cfg: DigitKVConfig, tok: TextTokenizer, n: int, g: torch.Generator) -> list[Episode]:
    out = []
    for _ in range(n):
        keys = torch.randperm(cfg.n_keys, generator=g)[: cfg.n_turns].tolist()
        digits = torch.randint(0, 10, (cfg.n_turns,), generator=g).tolist()
        tmpl = torch.randint(0, cfg.template_diversity, (cfg.n_turns,), generator=g).tolist()
        context: list[int] = []
        spans, value_pos = [], []
        for k, v, t in zip(keys, digits, tmpl):
            ids, vi = encode_statement(tok, TEMPLATES[t], k, v)
            spans.append([len(context), len(context) + len(ids)])
            value_pos.append(len(context) + vi)
            context += ids
        out.append(Episode(context=context, spans=spans, value_pos=value_pos, keys=keys, digits=digits,
                           target_u=float(torch.rand((), generator=g)), summary_u=float(torch.rand((), generator=g))))
    return out


def _pack(seqs: list[list[int]], pad: int, fill: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(max(len(s) for s in seqs), 1)
    ids = torch.full((len(seqs), n), pad if fill is None else fill, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


class EpisodeStore:
    """The cached episode splits of an episodic task (`digit_kv`, `stdlib_assign`): a subclass
    sets `_episodes` ({split: [episode]}) and `task` (its name, for errors)."""

    task = "digit_kv"
    _episodes: dict[str, list]

    def __len__(self) -> int:
        return len(self._episodes["train"])

    def num_examples(self, split: str) -> int:
        self._check_split(split)
        return len(self._episodes[split])

    def _check_split(self, split: str) -> None:
        if split not in self._episodes:
            raise ConfigError("split", f"{self.task} has splits {', '.join(self._episodes)}, got {split!r}")

    def episodes(self, split: str, indices) -> list:
        self._check_split(split)
        eps = self._episodes[split]
        return [eps[int(i)] for i in indices]


def cached_episodes(entry: cache.Entry, build, episode_cls) -> dict[str, list]:
    """`build()`'s {split: [episode]} through the cache, each episode an attrs instance of `episode_cls`."""
    return cache.load_or_build(
        entry, build,
        save_fn=lambda eps, p: torch.save({s: [attrs.asdict(e) for e in v] for s, v in eps.items()}, p),
        load_fn=lambda p: {s: [episode_cls(**e) for e in v] for s, v in torch.load(p, weights_only=True).items()},
    )


class DigitKVDataset(EpisodeStore, Dataset):
    """Synthetic digit-recall episodes with a budgeted context (seed 003's task).

    Batches (for one budget B) hold `{full,kept,summary}_ids / _mask / _answer_pos`
    (reader sequences; logits at `_answer_pos` predict the answer), `removed_ids /
    removed_mask` (memory input), `removed_value_pos / removed_value_mask` (B, n_turns:
    where the value digit of each whole removed statement sits in `removed_ids`),
    `question_ids / question_mask`, `answer` (digit token id), `digit` (0..9), `key`,
    `target_pos` (the target's statement index, 0 = first), `n_removed` (whole
    statements removed), `budget`, and with `gold_fields` also `gold_digit_ids (B,1)`,
    `gold_kv_ids / gold_kv_mask`.
    """

    # Every split a recipe may name before the data are built: `engram validate` reads the
    # class's (it builds only `dry_spec`). A built data set has 'val' only with `n_val` > 0;
    # the engine checks the stages against the built one's splits before anything runs.
    splits = ("train", "val", "eval")

    def __init__(self, cfg: DigitKVConfig, build: BuildContext | None = None):
        self.cfg = cfg
        self.splits = ("train", "val", "eval") if cfg.n_val else ("train", "eval")
        cache_dir = build.cache_dir if build is not None else None
        self.tok = make_tokenizer(cfg.tokenizer, cache_dir)
        self.spec = make_spec(cfg, self.tok)
        self.answer_ids = self.spec.answer_token_ids
        self._questions = {k: self.tok.encode(QUESTION.format(k=f"{k:02d}")) for k in range(cfg.n_keys)}
        newline = self.tok.encode(NEWLINE_TEXT)
        self._newline = newline[-1] if newline else None
        self._episodes = self._load(cache_dir)

    @staticmethod
    def dry_spec(cfg: DigitKVConfig, build: BuildContext | None = None) -> DataSpec:
        """The spec without generating episodes (`engram validate`): budgets are checked here."""
        return make_spec(cfg, make_tokenizer(cfg.tokenizer, build.cache_dir if build is not None else None))

    # ---- generation and cache ------------------------------------------------------

    def cache_entry(self, cache_dir=None) -> cache.Entry:
        """The episodes' cache entry: the full config, its seed, the tokenizer's vocabulary digest,
        DATA_VERSION, the source of this module and of the tokenizer module."""
        from . import tokens

        return cache.entry(cache_dir, plugin=PLUGIN, kind="digit_kv", config=self.cfg, seed=self.cfg.seed,
                           version=DATA_VERSION, builder=[sys.modules[__name__], tokens], ext="pt",
                           inputs={"tokenizer": self.tok.digest})

    def _load(self, cache_dir) -> dict[str, list[Episode]]:
        def build():
            g = torch.Generator().manual_seed(self.cfg.seed)
            out = {"train": _generate(self.cfg, self.tok, self.cfg.n_train, g),
                   "eval": _generate(self.cfg, self.tok, self.cfg.n_eval, g)}
            if self.cfg.n_val:  # drawn after the others from the same stream: they stay as they were
                out["val"] = _generate(self.cfg, self.tok, self.cfg.n_val, g)
            return out

        return cached_episodes(self.cache_entry(cache_dir), build, Episode)

    # ---- batches -------------------------------------------------------------------

    def target_of(self, e: Episode, budget: int) -> tuple[int, list[int]]:
        """(target statement index, indices of the statements wholly removed) at `budget`."""
        cut = len(e.context) - budget
        removed = [i for i, (_, end) in enumerate(e.spans) if end <= cut]
        if self.cfg.target_range == "removed":
            if not removed:
                raise ConfigError("budget", f"budget {budget} leaves no whole statement in the removed segment of a "
                                            f"{len(e.context)}-token prompt; lower the budget (data allows up to "
                                            f"{self.spec.max_budget})")
            pool = removed
        else:
            pool = list(range(len(e.spans)))
        return pool[min(int(e.target_u * len(pool)), len(pool) - 1)], removed

    def make_batch(self, episodes: list[Episode], budget: int) -> dict[str, torch.Tensor]:
        """All views of `episodes` under `budget` kept context tokens."""
        bos, pad = self.tok.bos_id, self.tok.pad_id
        full, kept, summary, removed, gold_kv, questions, value_pos = [], [], [], [], [], [], []
        targets, n_removed, digits, keys = [], [], [], []
        for e in episodes:
            n = len(e.context)
            if budget >= n:
                raise ConfigError("budget", f"budget {budget} is not shorter than a {n}-token prompt; lower the budget")
            t, gone = self.target_of(e, budget)
            s, end = e.spans[t]
            gold = e.context[s:end]
            question = self._questions[e.keys[t]]
            tail = e.context[n - budget:]
            full.append([bos] + e.context + question)
            kept.append([bos] + tail + question)
            if s >= n - budget:  # the target is in the kept tail (target_range = "prompt"): nothing to add
                summary.append([bos] + tail + question)
            else:
                # the gold statement goes at a random statement boundary of the kept tail, so the
                # reader must find it by key rather than copy from a fixed position
                short_tail = e.context[n - max(budget - len(gold), 0):]
                cuts = [0] + [j + 1 for j, tk in enumerate(short_tail) if tk == self._newline]
                cut = cuts[min(int(e.summary_u * len(cuts)), len(cuts) - 1)]
                summary.append([bos] + short_tail[:cut] + gold + short_tail[cut:] + question)
            removed.append(e.context[: n - budget])
            value_pos.append([e.value_pos[i] for i in gone])
            gold_kv.append(gold)
            questions.append(question)
            targets.append(t)
            n_removed.append(len(gone))
            digits.append(e.digits[t])
            keys.append(e.keys[t])
        batch: dict[str, torch.Tensor] = {}
        for name, seqs in (("full", full), ("kept", kept), ("summary", summary)):
            ids, mask = _pack(seqs, pad)
            batch[f"{name}_ids"], batch[f"{name}_mask"] = ids, mask
            batch[f"{name}_answer_pos"] = mask.sum(1) - 1
        batch["removed_ids"], batch["removed_mask"] = _pack(removed, pad)
        vp, vm = _pack(value_pos, 0)
        batch["removed_value_pos"], batch["removed_value_mask"] = vp, vm
        batch["question_ids"], batch["question_mask"] = _pack(questions, pad)
        batch["digit"] = torch.tensor(digits, dtype=torch.long)
        batch["answer"] = torch.tensor([self.answer_ids[d] for d in digits], dtype=torch.long)
        batch["key"] = torch.tensor(keys, dtype=torch.long)
        batch["target_pos"] = torch.tensor(targets, dtype=torch.long)
        batch["n_removed"] = torch.tensor(n_removed, dtype=torch.long)
        batch["budget"] = torch.full((len(episodes),), budget, dtype=torch.long)
        if self.cfg.gold_fields:
            batch["gold_digit_ids"] = batch["answer"][:, None].clone()
            batch["gold_kv_ids"], batch["gold_kv_mask"] = _pack(gold_kv, pad)
        return batch

    def sample(self, split: str, batch_size: int, generator: torch.Generator, budget: int | None = None):
        self._check_split(split)
        n = len(self._episodes[split])
        idx = torch.randint(0, n, (batch_size,), generator=generator)
        return self.make_batch(self.episodes(split, idx), budget or self.cfg.budget)

    def eval_batches(self, split: str, batch_size: int, budget: int | None = None) -> Iterator[dict]:
        self._check_split(split)
        n = len(self._episodes[split])
        for i in range(0, n, batch_size):
            yield self.make_batch(self.episodes(split, range(i, min(n, i + batch_size))), budget or self.cfg.budget)
