"""`stdlib_assign`: a removed span of a real standard-library file holds `NAME = VALUE`; the
question asks for VALUE (issue 31's second task, made from the general LM's own corpus).

An episode is a window of `context_tokens` tokens of one Python source file (the corpus
split of engram_core.lm: the task's train / val / eval episodes come from the LM's train /
val / test *files*, so held-out episodes are code the LM never saw), with one line
`NAME = VALUE` inserted at a line boundary, indented like the line after it. NAME is an
identifier of the same file, upper-cased (a constant's name the window does not hold); VALUE
a random integer in [0, max_value], so neither the LM's prior nor the file can give it. The
line lies wholly in the removed segment at every budget up to the data's largest (`budgets`,
`budget`), which is therefore the largest any component may ask for. The question is a new line
`NAME =`; the answer is VALUE's tokens and the end of the line (the tokenizer's newline), so
greedy generation must produce the number and stop.

Lines are encoded one by one (and the inserted line piece by piece: `indent NAME =`,
` VALUE`, newline), so every budget counts the LM's tokens and VALUE's tokens sit at known
positions. The batch has the same keys as `digit_kv`'s where they mean the same
(`{full,kept,summary}_ids/_mask/_answer_pos`, `removed_ids/_mask`, `removed_value_pos/_mask`:
where VALUE's tokens sit in the removed text, `question_ids/_mask`, `budget`, `gold_kv_ids`:
the inserted line), so the reader's modes and the context memories run on it unchanged; the
answer is `answer_ids / answer_mask` (B, L), and each view holds it after the question
(teacher forcing: position `answer_pos + j` predicts answer token j).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator

import attrs
import torch

from engram_core import cache
from engram_core.components import BuildContext, Dataset, DataSpec
from engram_core.config import ConfigError, field, in_range, positive

from .data import EpisodeStore, cached_episodes
from .tokens import TextTokenizer, make_tokenizer

PLUGIN = "qwen-compressor"
# bump when the episodes generated for a config change (the cache key also holds this module's source)
DATA_VERSION = 1
CORPUS_SPLIT = {"train": "train", "val": "val", "eval": "test"}  # the task's split -> the LM corpus's
IDENTIFIER = re.compile(r"\b[a-z_][a-z0-9_]{3,}\b")


@attrs.frozen
class StdlibAssignConfig:
    """Windows of stdlib source with an inserted `NAME = VALUE` line that the budget removes."""

    tokenizer: str = field("engram:stdlib-lm-cpu", help="'engram:NAME' (the general LM's tokenizer) or a local HF "
                                                        "tokenizer directory; budgets count its tokens")
    context_tokens: int = field(96, help="tokens of source in each episode's context (the inserted line included)",
                                validator=positive)
    budget: int = field(48, help="kept context tokens for training batches (`sample`)", validator=positive)
    budgets: list[int] = field(factory=lambda: [24, 48], help="every budget evaluated")
    max_value: int = field(9999, help="VALUE is a uniform integer in [0, max_value]", validator=in_range(1, None))
    max_line_tokens: int = field(24, help="longest source line used (a longer one ends the window) and longest "
                                          "inserted line (a longer NAME is drawn again)", validator=positive)
    include_tests: bool = field(False, help="also draw windows from the stdlib's test suites (as the LM corpus option)")
    n_train: int = field(10000, help="training episodes", validator=positive)
    n_eval: int = field(512, help="evaluation episodes (the reported split; from the corpus's test files)",
                        validator=positive)
    n_val: int = field(256, help="validation episodes (split 'val', from the corpus's val files); 0: none",
                       validator=in_range(0, None))
    seed: int = field(0, help="seed of the generator")

    def __attrs_post_init__(self):
        if not self.budgets or any(not isinstance(b, int) or b <= 0 for b in self.budgets):
            raise ConfigError("budgets", f"must be a non-empty list of positive integers, got {self.budgets!r}")


def _largest_budget(cfg: StdlibAssignConfig) -> int:
    """The largest budget of the data (`budgets` and `budget`): every episode's inserted line
    ends before the last this many tokens, so every budget up to it removes the line."""
    return max([*cfg.budgets, cfg.budget])


def make_spec(cfg: StdlibAssignConfig, tok: TextTokenizer) -> DataSpec:
    longest, room = cfg.max_line_tokens, cfg.context_tokens - cfg.max_line_tokens
    for key, values in (("budgets", list(cfg.budgets)), ("budget", [cfg.budget])):
        for b in values:
            if b > room:
                raise ConfigError(key, f"budget {b} leaves no room for the inserted line (up to max_line_tokens = "
                                       f"{longest} tokens) in a {cfg.context_tokens}-token context: the largest budget "
                                       f"is {room}; lower it or raise data.context_tokens")
    max_budget = _largest_budget(cfg)
    newline = tok.encode("\n")
    if len(newline) != 1:
        raise ConfigError("tokenizer", "stdlib_assign needs the newline to be one token")
    digits = tuple(tok.encode(str(d))[0] for d in range(10))
    return DataSpec(
        "stdlib_assign", vocab_size=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id, answer_token_ids=digits,
        newline_id=newline[0], chance=1.0 / (cfg.max_value + 1), budget=cfg.budget, budgets=tuple(cfg.budgets),
        max_budget=max_budget, min_context_len=cfg.context_tokens, max_gold_len=longest,
        max_full_len=1 + cfg.context_tokens + 40 + longest,
        gold_fields=True, tokenizer=tok.name,
    )


@attrs.frozen
class Episode:
    context: list[int]
    line: list[int]  # [start, end) of the inserted line in `context`
    value: list[int]  # positions of VALUE's tokens in `context`
    question: list[int]
    answer: list[int]  # VALUE's tokens, then the newline
    summary_u: float


class _SourceFile:
    """One file's lines, each tokenized (with its newline) the first time a window reaches it."""

    def __init__(self, tok: TextTokenizer, text: str, max_len: int):
        self.tok, self.max_len = tok, max_len
        self.lines = text.split("\n")
        self.names = sorted(set(IDENTIFIER.findall(text)))
        self._ids: dict[int, list[int] | None] = {}

    def ids(self, i: int) -> list[int] | None:
        """Tokens of line i, or None for a line longer than `max_len` tokens."""
        if i not in self._ids:
            ids = self.tok.encode(self.lines[i] + "\n")
            self._ids[i] = ids if len(ids) <= self.max_len else None
        return self._ids[i]


def _generate(cfg: StdlibAssignConfig, tok: TextTokenizer, split: str, n: int, g: torch.Generator) -> list[Episode]:
    from engram_core.lm.corpus import CorpusConfig, corpus_files, read_text

    files = corpus_files(CorpusConfig(include_tests=cfg.include_tests))[CORPUS_SPLIT[split]]
    end = cfg.context_tokens - _largest_budget(cfg)  # the inserted line ends at or before this token
    newline = tok.encode("\n")
    parsed: dict[int, _SourceFile] = {}
    out: list[Episode] = []
    while len(out) < n:
        fi = int(torch.randint(0, len(files), (1,), generator=g))
        if fi not in parsed:
            parsed[fi] = _SourceFile(tok, read_text(files[fi]), cfg.max_line_tokens)
        source = parsed[fi]
        names = source.names
        start = int(torch.randint(0, max(len(source.lines), 1), (1,), generator=g))
        window: list[tuple[str, list[int]]] = []
        total = 0
        for i in range(start, len(source.lines)):
            ids = source.ids(i)
            if ids is None:
                break
            window.append((source.lines[i], ids))
            total += len(ids)
            if total >= cfg.context_tokens:
                break
        if total < cfg.context_tokens or not names:
            continue  # the file ends (or a very long line comes) before the window fills: draw again
        window_text = "\n".join(t for t, _ in window)
        name = names[int(torch.randint(0, len(names), (1,), generator=g))].upper()
        if name in window_text:
            continue
        value = int(torch.randint(0, cfg.max_value + 1, (1,), generator=g))
        u = float(torch.rand((), generator=g))
        # the line goes at a line boundary k such that it ends before the largest budget's tail
        # (its length depends on the indentation of the line it precedes)
        before = [0]
        for _, ids in window:
            before.append(before[-1] + len(ids))
        value_ids = tok.encode(f" {value}")
        heads = []
        for k in range(len(window)):
            follow = window[k][0]
            indent = follow[: len(follow) - len(follow.lstrip())] if follow.strip() else ""
            head = tok.encode(f"{indent}{name} =")
            length = len(head) + len(value_ids) + len(newline)
            if length <= cfg.max_line_tokens and before[k] + length <= end:
                heads.append((k, head))
        if not heads:
            continue  # a name too long for max_line_tokens, or no boundary early enough: draw again
        k, head = heads[min(int(u * len(heads)), len(heads) - 1)]
        context = [i for _, ids in window[:k] for i in ids]
        line_start = len(context)
        context += head + value_ids + newline
        value_pos = list(range(line_start + len(head), line_start + len(head) + len(value_ids)))
        line = [line_start, len(context)]
        for _, ids in window[k:]:
            context += ids
        context = context[: cfg.context_tokens]
        out.append(Episode(context=context, line=line, value=value_pos, question=newline + tok.encode(f"{name} ="),
                           answer=value_ids + newline, summary_u=float(torch.rand((), generator=g))))
    return out


def _pack_views(seqs: list[list[int]], answers: list[list[int]], pad: int, room: int):
    """ids, mask, answer_pos of `seqs` (BOS .. question) each followed by its answer, right-padded
    so that every row has `room` positions after its question (greedy generation writes there)."""
    width = max(len(s) + room for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, a) in enumerate(zip(seqs, answers)):
        full = s + a
        ids[i, : len(full)] = torch.tensor(full, dtype=torch.long)
        mask[i, : len(full)] = 1
    return ids, mask, torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)


def _pack(seqs: list[list[int]], pad: int):
    n = max(max(len(s) for s in seqs), 1)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


class StdlibAssignDataset(EpisodeStore, Dataset):
    """Recall of an inserted `NAME = VALUE` from real stdlib source cut by a budget (see the module)."""

    task = "stdlib_assign"

    splits = ("train", "val", "eval")  # what a recipe may name before the data are built (see digit_kv)

    def __init__(self, cfg: StdlibAssignConfig, build: BuildContext | None = None):
        self.cfg = cfg
        self.splits = ("train", "val", "eval") if cfg.n_val else ("train", "eval")
        cache_dir = build.cache_dir if build is not None else None
        self.tok = make_tokenizer(cfg.tokenizer, cache_dir)
        self.spec = make_spec(cfg, self.tok)
        self.answer_ids = self.spec.answer_token_ids
        self._episodes = self._load(cache_dir)
        self.max_answer_len = max(len(e.answer) for eps in self._episodes.values() for e in eps)

    @staticmethod
    def dry_spec(cfg: StdlibAssignConfig, build: BuildContext | None = None) -> DataSpec:
        return make_spec(cfg, make_tokenizer(cfg.tokenizer, build.cache_dir if build is not None else None))

    def cache_entry(self, cache_dir=None) -> cache.Entry:
        from engram_core.lm.corpus import CorpusConfig, corpus_digest

        from . import tokens

        return cache.entry(cache_dir, plugin=PLUGIN, kind="stdlib_assign", config=self.cfg, seed=self.cfg.seed,
                           version=DATA_VERSION, builder=[sys.modules[__name__], tokens], ext="pt",
                           inputs={"tokenizer": self.tok.digest,
                                   "corpus": corpus_digest(CorpusConfig(include_tests=self.cfg.include_tests))})

    def _load(self, cache_dir) -> dict[str, list[Episode]]:
        def build():
            g = torch.Generator().manual_seed(self.cfg.seed)
            out = {"train": _generate(self.cfg, self.tok, "train", self.cfg.n_train, g),
                   "eval": _generate(self.cfg, self.tok, "eval", self.cfg.n_eval, g)}
            if self.cfg.n_val:
                out["val"] = _generate(self.cfg, self.tok, "val", self.cfg.n_val, g)
            return out

        return cached_episodes(self.cache_entry(cache_dir), build, Episode)

    def make_batch(self, episodes: list[Episode], budget: int) -> dict[str, torch.Tensor]:
        bos, pad, nl = self.tok.bos_id, self.tok.pad_id, self.spec.newline_id
        views = {"full": [], "kept": [], "summary": []}
        answers, removed, value_pos, gold, questions = [], [], [], [], []
        for e in episodes:
            n = len(e.context)
            if e.line[1] > n - budget:
                raise ConfigError("budget", f"budget {budget} keeps part of the inserted line; the data allow budgets up "
                                            f"to {self.spec.max_budget}")
            tail = e.context[n - budget:]
            line = e.context[e.line[0]:e.line[1]]
            views["full"].append([bos] + e.context + e.question)
            views["kept"].append([bos] + tail + e.question)
            short = e.context[n - max(budget - len(line), 0):]
            cuts = [0] + [j + 1 for j, t in enumerate(short) if t == nl]
            cut = cuts[min(int(e.summary_u * len(cuts)), len(cuts) - 1)]
            views["summary"].append([bos] + short[:cut] + line + short[cut:] + e.question)
            answers.append(e.answer)
            removed.append(e.context[: n - budget])
            value_pos.append(e.value)
            gold.append(line)
            questions.append(e.question)
        room = max(len(a) for a in answers)
        batch: dict[str, torch.Tensor] = {}
        for name, seqs in views.items():
            batch[f"{name}_ids"], batch[f"{name}_mask"], batch[f"{name}_answer_pos"] = _pack_views(seqs, answers, pad, room)
        batch["removed_ids"], batch["removed_mask"] = _pack(removed, pad)
        batch["removed_value_pos"], batch["removed_value_mask"] = _pack(value_pos, 0)
        batch["question_ids"], batch["question_mask"] = _pack(questions, pad)
        batch["answer_ids"], batch["answer_mask"] = _pack(answers, pad)
        batch["answer"] = batch["answer_ids"][:, 0].clone()
        batch["gold_kv_ids"], batch["gold_kv_mask"] = _pack(gold, pad)
        batch["budget"] = torch.full((len(episodes),), budget, dtype=torch.long)
        return batch

    def sample(self, split: str, batch_size: int, generator: torch.Generator, budget: int | None = None):
        self._check_split(split)
        idx = torch.randint(0, len(self._episodes[split]), (batch_size,), generator=generator)
        return self.make_batch(self.episodes(split, idx), budget or self.cfg.budget)

    def eval_batches(self, split: str, batch_size: int, budget: int | None = None) -> Iterator[dict]:
        n = self.num_examples(split)
        for i in range(0, n, batch_size):
            yield self.make_batch(self.episodes(split, range(i, min(n, i + batch_size))), budget or self.cfg.budget)
