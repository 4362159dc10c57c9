"""`digit_kv`: prompts of key/value statements whose answer lies in the removed segment.

An episode is a context of `n_turns` statements (``KEY05 = 8``), each about a distinct
key, then a question about one target key (``Q: KEY05?\\nA: ``) whose answer is that
key's single digit. Under a budget of B tokens only the last B tokens of the context
are kept; everything before them is the *removed* segment, and the target statement
always lies wholly inside it (for every budget in `budgets`), so a reader that sees
only the kept tokens can do no better than chance (10 %).

Tokens are bytes (`engram_core.nn.ByteTokenizer`), so budgets count bytes.

Every batch carries, for the budget it was made for, packed right-padded reader
sequences for three views (each starts with BOS; a prefix memory is inserted right
after the BOS):

    full     BOS + whole context + question                  (reader pretraining)
    kept     BOS + last B context tokens + question          (discard / latent / oracle)
    summary  BOS + last B-|gold| tokens with the gold statement inserted at a random
             statement boundary + question                   (summary baseline)

plus the removed tokens (the memory's input) and, when `gold_fields`, the gold digit
token and gold statement tokens (oracle modes and oracle-target objectives).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import attrs
import torch

from engram_core import cache
from engram_core.components import BuildContext, Dataset, DataSpec
from engram_core.config import ConfigError, field, in_range, positive
from engram_core.nn import ByteTokenizer

PLUGIN = "qwen-compressor"
# bump when the episodes generated for a config change (the cache key also holds this module's source)
DATA_VERSION = 3

# Statement templates. The first is the seed's rigid one; the others vary the words,
# the punctuation and the order (digit first) so that a pooled embedding of a gold
# statement is no longer dominated by one shared template.
TEMPLATES = (
    "KEY{k} = {v}\n",
    "key {k} is {v}.\n",
    "KEY{k}: {v}\n",
    "set KEY{k} to {v}\n",
    "{v} is the value of KEY{k}\n",
    "KEY{k} -> {v}\n",
    "value(KEY{k}) = {v}\n",
    "KEY{k} holds {v};\n",
)
QUESTION = "Q: KEY{k} = "
NEWLINE = ord("\n")
DIGIT_IDS = tuple(ord(str(d)) for d in range(10))  # byte ids of '0'..'9'


@attrs.frozen
class DigitKVConfig:
    """Key/value statements; the target key's digit is in the removed segment."""

    n_turns: int = field(16, help="statements per prompt (distinct keys)", validator=positive)
    n_keys: int = field(100, help="size of the key alphabet KEY00..KEY{n_keys-1}", validator=in_range(2, 100))
    template_diversity: int = field(
        1, help=f"how many statement templates are mixed (1 = the seed's rigid 'KEY05 = 8'; up to {len(TEMPLATES)})",
        validator=in_range(1, len(TEMPLATES)),
    )
    budget: int = field(64, help="kept context tokens for training batches (`sample`)", validator=positive)
    budgets: list[int] = field(
        factory=lambda: [64, 96, 128], help="every budget evaluated; the target is removed under each of them"
    )
    n_train: int = field(20000, help="training episodes", validator=positive)
    n_eval: int = field(512, help="evaluation episodes", validator=positive)
    gold_fields: bool = field(True, help="include gold digit / gold statement tokens (needed by oracle modes)")
    seed: int = field(0, help="seed of the generator (independent of run.seed)")

    def __attrs_post_init__(self):
        if self.n_turns > self.n_keys:
            raise ConfigError("n_turns", f"needs n_turns <= n_keys (keys are distinct), got {self.n_turns} > {self.n_keys}")
        if not self.budgets or any((not isinstance(b, int)) or b <= 0 for b in self.budgets):
            raise ConfigError("budgets", f"must be a non-empty list of positive integers, got {self.budgets!r}")


def check_budgets(budgets, spec, key: str = "budgets") -> None:
    """Budgets a component asks for must be ones the data was generated for.

    The episodes guarantee that the target statement lies wholly in the removed segment
    only under budgets up to max(data.budgets, data.budget); a larger one fails on some
    episode at evaluation time (after a long pretraining), so it is refused when built.
    """
    if spec is None:
        return
    limit = max([*spec.budgets, spec.budget])
    for b in budgets:
        if b <= 0 or b >= spec.min_context_len:
            raise ConfigError(key, f"budget {b} is larger than the prompt allows "
                                   f"(shortest context {spec.min_context_len} tokens) or not positive")
        if b > limit:
            raise ConfigError(key, f"budget {b} is larger than any the data was generated for (data.budgets and "
                                   f"data.budget go up to {limit}), so the target is not removed in every episode; "
                                   f"add {b} to data.budgets")


@attrs.frozen
class Episode:
    context: list[int]  # byte ids of all statements
    gold_start: int  # the target statement's span in `context`
    gold_end: int
    question: list[int]
    digit: int
    key: int
    summary_u: float  # uniform draw: where the gold statement goes in the summary view


def _generate(cfg: DigitKVConfig, n: int, g: torch.Generator) -> list[Episode]:
    tok = ByteTokenizer()
    max_budget = max(cfg.budgets + [cfg.budget])
    out = []
    for _ in range(n):
        keys = torch.randperm(cfg.n_keys, generator=g)[: cfg.n_turns].tolist()
        digits = torch.randint(0, 10, (cfg.n_turns,), generator=g).tolist()
        tmpl = torch.randint(0, cfg.template_diversity, (cfg.n_turns,), generator=g).tolist()
        context: list[int] = []
        spans = []
        for k, v, t in zip(keys, digits, tmpl):
            ids = tok.encode(TEMPLATES[t].format(k=f"{k:02d}", v=v))
            spans.append((len(context), len(context) + len(ids)))
            context += ids
        # the target must be removed under every budget: its statement ends before the kept tail
        eligible = [i for i, (_, end) in enumerate(spans) if end <= len(context) - max_budget]
        if not eligible:
            raise ConfigError(
                "budgets",
                f"budget {max_budget} is larger than the prompt allows: a context of {len(context)} tokens "
                f"({cfg.n_turns} statements) leaves no whole statement in the removed segment; "
                "raise data.n_turns or lower the budget",
            )
        i = eligible[int(torch.randint(0, len(eligible), (1,), generator=g))]
        out.append(
            Episode(
                context=context,
                gold_start=spans[i][0],
                gold_end=spans[i][1],
                question=tok.encode(QUESTION.format(k=f"{keys[i]:02d}")),
                digit=digits[i],
                key=keys[i],
                summary_u=float(torch.rand((), generator=g)),
            )
        )
    return out


def _pack(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


class DigitKVDataset(Dataset):
    """Synthetic digit-recall episodes with a budgeted context (seed 003's task).

    Batches (for one budget B) hold `{full,kept,summary}_ids / _mask / _answer_pos`
    (reader sequences; logits at `_answer_pos` predict the answer), `removed_ids /
    removed_mask` (memory input), `answer` (digit token id), `digit` (0..9), `key`,
    `budget`, and with `gold_fields` also `gold_digit_ids (B,1)`, `gold_kv_ids /
    gold_kv_mask`.
    """

    splits = ("train", "eval")

    def __init__(self, cfg: DigitKVConfig, build: BuildContext | None = None):
        self.cfg = cfg
        self.tok = ByteTokenizer()
        cache_dir = build.cache_dir if build is not None else None
        self._episodes = self._load(cache_dir)
        max_full = max(len(e.context) + len(e.question) for eps in self._episodes.values() for e in eps) + 1
        min_context = min(len(e.context) for eps in self._episodes.values() for e in eps)
        max_gold = max(e.gold_end - e.gold_start for eps in self._episodes.values() for e in eps)
        self.spec = DataSpec(
            "digit_kv",
            vocab_size=self.tok.vocab_size,
            pad_id=self.tok.pad_id,
            bos_id=self.tok.bos_id,
            answer_token_ids=DIGIT_IDS,
            chance=0.1,
            budget=cfg.budget,
            budgets=tuple(cfg.budgets),
            max_full_len=max_full,
            min_context_len=min_context,
            max_gold_len=max_gold,
            gold_fields=cfg.gold_fields,
            tokenizer="byte",
        )

    # ---- generation and cache ------------------------------------------------------

    def cache_entry(self, cache_dir=None) -> cache.Entry:
        """The episodes' cache entry: the full config, its seed, DATA_VERSION, this module's source."""
        return cache.entry(cache_dir, plugin=PLUGIN, kind="digit_kv", config=self.cfg, seed=self.cfg.seed,
                           version=DATA_VERSION, builder=sys.modules[__name__], ext="pt")

    def _load(self, cache_dir) -> dict[str, list[Episode]]:
        def build():
            g = torch.Generator().manual_seed(self.cfg.seed)
            return {"train": _generate(self.cfg, self.cfg.n_train, g), "eval": _generate(self.cfg, self.cfg.n_eval, g)}

        return cache.load_or_build(
            self.cache_entry(cache_dir), build,
            save_fn=lambda eps, p: torch.save({s: [attrs.asdict(e) for e in v] for s, v in eps.items()}, p),
            load_fn=lambda p: {s: [Episode(**e) for e in v] for s, v in torch.load(p, weights_only=True).items()},
        )

    # ---- batches -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._episodes["train"])

    def num_examples(self, split: str) -> int:
        self._check_split(split)
        return len(self._episodes[split])

    def _check_split(self, split: str) -> None:
        if split not in self._episodes:
            raise ConfigError("split", f"digit_kv has splits {', '.join(self._episodes)}, got {split!r}")

    def episodes(self, split: str, indices) -> list[Episode]:
        self._check_split(split)
        eps = self._episodes[split]
        return [eps[int(i)] for i in indices]

    def make_batch(self, episodes: list[Episode], budget: int) -> dict[str, torch.Tensor]:
        """All views of `episodes` under `budget` kept context tokens."""
        bos, pad = self.tok.bos_id, self.tok.pad_id
        full, kept, summary, removed, gold_kv, questions = [], [], [], [], [], []
        for e in episodes:
            n = len(e.context)
            if budget >= n or e.gold_end > n - budget:
                raise ConfigError(
                    "budget",
                    f"budget {budget} is larger than the prompt allows (context of {n} tokens, target statement "
                    f"ends at {e.gold_end}); lower the budget or raise data.n_turns",
                )
            gold = e.context[e.gold_start : e.gold_end]
            tail = e.context[n - budget :]
            full.append([bos] + e.context + e.question)
            kept.append([bos] + tail + e.question)
            # the gold statement goes at a random statement boundary of the kept tail, so the
            # reader must find it by key rather than copy from a fixed position
            short_tail = e.context[n - max(budget - len(gold), 0) :]
            cuts = [0] + [j + 1 for j, t in enumerate(short_tail) if t == NEWLINE]
            cut = cuts[min(int(e.summary_u * len(cuts)), len(cuts) - 1)]
            summary.append([bos] + short_tail[:cut] + gold + short_tail[cut:] + e.question)
            removed.append(e.context[: n - budget])
            gold_kv.append(gold)
            questions.append(e.question)
        batch: dict[str, torch.Tensor] = {}
        for name, seqs in (("full", full), ("kept", kept), ("summary", summary)):
            ids, mask = _pack(seqs, pad)
            batch[f"{name}_ids"], batch[f"{name}_mask"] = ids, mask
            batch[f"{name}_answer_pos"] = mask.sum(1) - 1
        batch["removed_ids"], batch["removed_mask"] = _pack(removed, pad)
        batch["question_ids"], batch["question_mask"] = _pack(questions, pad)
        batch["digit"] = torch.tensor([e.digit for e in episodes], dtype=torch.long)
        batch["answer"] = torch.tensor([DIGIT_IDS[e.digit] for e in episodes], dtype=torch.long)
        batch["key"] = torch.tensor([e.key for e in episodes], dtype=torch.long)
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
