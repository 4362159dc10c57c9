"""The recipe side of the general LM: data set `stdlib_text`, head `pretrained_lm`, metrics
`perplexity` and `ngram_perplexity` (the unigram and bigram baselines beside it).

`stdlib_text` walks a split of the tokenised corpus in windows of ``context + 1`` tokens
with stride ``context``, so every token of the split but the first is scored exactly once;
a batch is in the core's completion format (``input_ids``, ``labels``), so `token_lm` can
fine-tune on it and `completion_accuracy` reads it too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator

import attrs
import torch
import torch.nn.functional as F

from ..components import BuildContext, Dataset, DataSpec, Head, Metric, model_device
from ..config import ConfigError, field, non_negative, one_of
from . import PREFIX, is_engram_model, preset, quiet_transformers, require_extra, resolve_model, skeleton_model
from .pretrain import SIZES, PretrainConfig
from .tokens import load_tokens


def _preset(name: str, key: str) -> PretrainConfig:
    if not is_engram_model(name):
        raise ConfigError(key, f"expected one of {', '.join(PREFIX + s for s in SIZES)}, got {name!r}")
    return preset(name, key)


# ---- data -------------------------------------------------------------------------------------


@attrs.frozen
class StdlibTextConfig:
    """Held-out text of the standard-library corpus, tokenised as a general LM was."""

    model: str = field("engram:stdlib-lm-cpu", help="the engram model whose corpus and tokenizer to use")
    context: int = field(0, help="tokens a window conditions on; 0 = the model's training context", validator=non_negative)
    max_windows: int = field(0, help="evaluate at most this many windows of a split, evenly spaced; 0 = every one",
                             validator=non_negative)


class StdlibTextDataset(Dataset):
    """Splits train / val / test (whole files each); `sample` draws random windows of train."""

    splits = ("train", "val", "test")

    def __init__(self, cfg: StdlibTextConfig, build: BuildContext | None = None):
        self.cfg = cfg
        require_extra("type")
        preset = _preset(cfg.model, "model")
        self.context = cfg.context or preset.context
        self.spec = self.dry_spec(cfg, build)
        if build is not None and build.dry_run:
            gen = torch.Generator().manual_seed(0)
            self.streams = {s: torch.randint(3, preset.tokens.vocab_size, (4 * self.context + 2,), generator=gen) for s in self.splits}
            self.token_bytes = torch.ones(preset.tokens.vocab_size, dtype=torch.long)
        else:
            corpus = load_tokens(preset.tokens, build.cache_dir if build is not None else None)
            self.streams, self.token_bytes = corpus.streams, corpus.token_bytes

    @classmethod
    def dry_dataset(cls, cfg: StdlibTextConfig, build: BuildContext | None = None) -> StdlibTextDataset:
        return cls(cfg, BuildContext(seed=0, dry_run=True))

    @staticmethod
    def dry_spec(cfg: StdlibTextConfig, build: BuildContext | None = None) -> DataSpec:
        preset = _preset(cfg.model, "model")
        context = cfg.context or preset.context
        return DataSpec("stdlib_text", vocab_size=preset.tokens.vocab_size, max_len=context + 1, seq_len=context + 1,
                        task="text", model=cfg.model)

    def _stream(self, split: str) -> torch.Tensor:
        if split not in self.streams:
            raise ConfigError("split", f"stdlib_text has no split {split!r}; it has {', '.join(self.splits)}")
        return self.streams[split]

    def window_starts(self, split: str) -> torch.Tensor:
        n = (len(self._stream(split)) - 1) // self.context
        starts = torch.arange(n) * self.context
        if self.cfg.max_windows and n > self.cfg.max_windows:
            starts = starts[torch.linspace(0, n - 1, self.cfg.max_windows).long()]
        return starts

    def _batch(self, stream: torch.Tensor, starts: torch.Tensor) -> dict:
        ids = stream[starts[:, None] + torch.arange(self.context + 1)[None, :]]
        return {"input_ids": ids, "labels": ids.clone()}

    def sample(self, split, batch_size, generator):
        stream = self._stream(split)
        return self._batch(stream, torch.randint(0, len(stream) - self.context - 1, (batch_size,), generator=generator))

    def eval_batches(self, split, batch_size) -> Iterator[dict]:
        stream = self._stream(split)
        for chunk in self.window_starts(split).split(batch_size):
            yield self._batch(stream, chunk)


# ---- head -------------------------------------------------------------------------------------


@attrs.frozen
class PretrainedLMConfig:
    """A transformers causal LM loaded with `from_pretrained`: an engram model or a local folder."""

    model_dir: str = field("engram:stdlib-lm-cpu", help="'engram:NAME' (made here, cached) or a local model directory")
    seed: int | None = field(None, help="an engram model's pretraining seed; unset = the run's seed (run.seed)")


class PretrainedLMHead(Head):
    """``forward(input_ids, attention_mask) -> logits`` and greedy ``generate``."""

    pretrain_report: dict | None = None  # an engram model's pretrain_report.json

    def __init__(self, cfg: PretrainedLMConfig, build: BuildContext):
        super().__init__()
        require_extra("type")
        from transformers import AutoModelForCausalLM

        if build.dry_run and is_engram_model(cfg.model_dir):
            self.model = skeleton_model(cfg.model_dir)  # the shapes only: nothing is pretrained for a check
        else:
            seed = cfg.seed if cfg.seed is not None else build.seed
            folder = resolve_model(cfg.model_dir, build.cache_dir, build.device, seed=seed)
            if not (folder / "config.json").is_file():
                raise ConfigError("model_dir", f"{cfg.model_dir} is not a transformers model directory (no config.json)")
            with quiet_transformers():
                self.model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
            report = folder / "pretrain_report.json"
            self.pretrain_report = json.loads(report.read_text()) if report.is_file() else None
        vocab = int(self.model.config.vocab_size)
        if build.spec is not None and int(build.spec.vocab_size) > vocab:
            raise ConfigError("model_dir", f"the data's vocabulary has {build.spec.vocab_size} ids, the model's {vocab}")

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    @torch.no_grad()
    def generate(self, prompt_ids, max_new_tokens: int, use_cache: bool = True, eos_id: int | None = None, attention_mask=None):
        out = self.model.generate(input_ids=prompt_ids, attention_mask=attention_mask if attention_mask is not None else torch.ones_like(prompt_ids),
                                  max_new_tokens=max_new_tokens, do_sample=False, use_cache=use_cache, eos_token_id=eos_id,
                                  pad_token_id=self.model.config.pad_token_id)
        return out[:, prompt_ids.shape[1]:]


# ---- metrics ----------------------------------------------------------------------------------


def _token_bytes(dataset) -> torch.Tensor:
    tb = getattr(dataset, "token_bytes", None)
    if tb is None:
        raise ConfigError("metrics", "perplexity per byte needs a data set that knows each token's bytes (stdlib_text)")
    return tb


@attrs.frozen
class PerplexityConfig:
    """Held-out perplexity of the model, per token and per byte; with `corpus`, on that engram
    model's text whatever the recipe's data set (what a memory does to what the base knows)."""

    corpus: str = field("", help="'' = the recipe's data; 'engram:NAME' = that model's corpus split `corpus_split`")
    corpus_split: str = field("test", help="the corpus split scored when `corpus` is set", validator=one_of("train", "val", "test"))
    max_windows: int = field(0, help="with `corpus`: at most this many windows, evenly spaced (0 = all)", validator=non_negative)


class Perplexity(Metric):
    """``ppl`` = exp(mean next-token NLL); ``ppl_byte`` = exp(total NLL / UTF-8 bytes of the
    scored tokens); ``bits_per_byte``; ``acc`` (top-1, teacher-forced). Every scored token
    counts once (labels -100 count nowhere).

    Where a memory is attached and on, every batch is scored a second time with it switched
    off (``memory.enabled = False``, as a stage's ``memory = false``) on the same tokens:
    ``ppl_no_memory``, ``acc_no_memory`` and ``kept``, the share of the tokens the model gets
    right without the memory that it still gets right with it. With `corpus` the tags are
    ``corpus/<name>`` (beside the recipe's own metrics)."""

    directions = {"ppl": "lower", "ppl_byte": "lower", "bits_per_byte": "lower", "nll": "lower", "acc": "higher",
                  "ppl_no_memory": "lower", "acc_no_memory": "higher", "kept": "higher"}
    directions |= {f"corpus/{k}": v for k, v in directions.items()}

    def __init__(self, cfg: PerplexityConfig, build: BuildContext):
        self.cfg = cfg
        self._corpus_data = None
        self._cache_dir = build.cache_dir
        if cfg.corpus:
            _preset(cfg.corpus, "corpus")
        for name in ("nll", "tokens", "bytes", "hits", "nll_off", "hits_off", "right_off", "kept_right"):
            self.add_state(name, 0.0, dist_reduce_fx="sum")

    def _data(self, dataset):
        if not self.cfg.corpus:
            return dataset
        if self._corpus_data is None:
            self._corpus_data = StdlibTextDataset(StdlibTextConfig(model=self.cfg.corpus, max_windows=self.cfg.max_windows),
                                                  BuildContext(cache_dir=self._cache_dir))
        return self._corpus_data

    def batches(self, dataset, split, batch_size):
        if self.cfg.corpus:
            return self._data(dataset).eval_batches(self.cfg.corpus_split, batch_size)
        return dataset.eval_batches(split, batch_size)

    def _score(self, model, ids, target, scored):
        logits = model(ids, None)[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum")
        return float(nll), (logits.argmax(-1) == target) & scored

    def update(self, model, batch):
        dev = model_device(model)
        ids, labels = batch["input_ids"].to(dev), batch["labels"].to(dev)
        target = labels[:, 1:]
        scored = target != -100
        nll, right = self._score(model, ids, target, scored)
        self.nll += nll
        self.hits += float(right.sum())
        self.tokens += float(scored.sum())
        self.bytes += float(_token_bytes(self._data(self.ctx.dataset)).to(dev)[target.clamp_min(0)][scored].sum())
        memory = getattr(model, "memory", None)
        if memory is not None and getattr(memory, "enabled", True):
            memory.enabled = False
            try:
                nll_off, right_off = self._score(model, ids, target, scored)
            finally:
                memory.enabled = True
            self.nll_off += nll_off
            self.hits_off += float(right_off.sum())
            self.right_off += float(right_off.sum())
            self.kept_right += float((right & right_off).sum())

    def compute(self):
        nll_token = self.nll / max(self.tokens, 1.0)
        nll_byte = self.nll / max(self.bytes, 1.0)
        out = {"nll": nll_token, "ppl": math.exp(nll_token), "ppl_byte": math.exp(nll_byte), "bits_per_byte": nll_byte / math.log(2),
               "acc": self.hits / max(self.tokens, 1.0)}
        if self.right_off:  # a memory was on: the same tokens without it
            out.update(ppl_no_memory=math.exp(self.nll_off / max(self.tokens, 1.0)), acc_no_memory=self.hits_off / max(self.tokens, 1.0),
                       kept=self.kept_right / self.right_off)
        return {f"corpus/{k}": v for k, v in out.items()} if self.cfg.corpus else out


@attrs.frozen
class NgramPerplexityConfig:
    """Unigram and bigram baselines, counted on train, smoothing tuned on val."""

    unigram_k: list[float] = field(factory=lambda: [0.0001, 0.001, 0.01, 0.1, 1.0], help="add-k values tried on val")
    bigram_lambda: list[float] = field(factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95, 0.99],
                                       help="weights of the bigram against the unigram tried on val")


class NgramPerplexity(Metric):
    """The simplest baselines scored on the same tokens as `perplexity`: an add-k unigram and a
    bigram interpolated with it (Jelinek-Mercer), counted on the train split; k and lambda are
    chosen by perplexity on the val split (never the split scored)."""

    directions = {"unigram_ppl": "lower", "bigram_ppl": "lower", "unigram_ppl_byte": "lower", "bigram_ppl_byte": "lower"}
    groups = {"unigram_k": "choice", "bigram_lambda": "choice"}
    shardable = False  # the tables are fitted per rank on the whole train split anyway

    def __init__(self, cfg: NgramPerplexityConfig, build: BuildContext):
        self.cfg = cfg
        self._fitted_for = None
        for name in ("uni_nll", "bi_nll", "tokens", "bytes"):
            self.add_state(name, 0.0)

    def _fit(self, dataset) -> None:
        train, val = dataset.streams["train"], dataset.streams["val"]
        vocab = int(dataset.spec.vocab_size)
        uni = torch.bincount(train, minlength=vocab).double()
        pairs = torch.bincount(train[:-1] * vocab + train[1:], minlength=vocab * vocab).double().view(vocab, vocab)

        def unigram(k):
            return ((uni + k) / (uni.sum() + k * vocab)).log()

        def bigram(lam, log_uni):
            rows = pairs.sum(1, keepdim=True)
            ml = torch.where(rows > 0, pairs / rows.clamp_min(1), torch.zeros(()))
            return (lam * ml + (1 - lam) * log_uni.exp()[None, :]).log()

        self.k = min(self.cfg.unigram_k, key=lambda k: -unigram(k)[val[1:]].mean().item())
        self.log_uni = unigram(self.k).float()
        self.lam = min(self.cfg.bigram_lambda, key=lambda lam: -bigram(lam, self.log_uni.double())[val[:-1], val[1:]].mean().item())
        self.log_bi = bigram(self.lam, self.log_uni.double()).float()
        self._fitted_for = id(dataset)

    def update(self, model, batch):
        if self._fitted_for != id(self.ctx.dataset):
            self._fit(self.ctx.dataset)
        ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
        prev, target = ids[:, :-1], labels[:, 1:]
        scored = target != -100
        t = target.clamp_min(0)
        self.uni_nll += float(-(self.log_uni[t])[scored].sum())
        self.bi_nll += float(-(self.log_bi[prev, t])[scored].sum())
        self.tokens += float(scored.sum())
        self.bytes += float(_token_bytes(self.ctx.dataset)[t][scored].sum())

    def compute(self):
        n, b = max(self.tokens, 1.0), max(self.bytes, 1.0)
        return {"unigram_ppl": math.exp(self.uni_nll / n), "bigram_ppl": math.exp(self.bi_nll / n),
                "unigram_ppl_byte": math.exp(self.uni_nll / b), "bigram_ppl_byte": math.exp(self.bi_nll / b),
                "unigram_k": float(getattr(self, "k", float("nan"))), "bigram_lambda": float(getattr(self, "lam", float("nan")))}


@attrs.frozen
class PretrainReportConfig:
    """What pretraining an engram model cost, from its `pretrain_report.json`."""


class PretrainReport(Metric):
    """``pretrain/tokens_per_s``, ``pretrain/mfu`` (CUDA only), ``pretrain/train_seconds``,
    ``pretrain/parameters``, ``pretrain/epochs``, the last ``pretrain/val_loss`` and the best
    (``pretrain/best_val_loss`` at ``pretrain/best_val_step`` of ``pretrain/steps``: the
    overfitting check) of the `pretrained_lm` head's model (nothing for a model that was not
    pretrained here)."""

    groups = {"pretrain/*": "cost"}
    directions = {"pretrain/tokens_per_s": "higher", "pretrain/mfu": "higher"}
    shardable = False

    def __init__(self, cfg: PretrainReportConfig, build: BuildContext):
        self.add_state("report", None)

    def batches(self, dataset, split, batch_size):
        return iter([{}])  # reads no data: one call to update

    def update(self, model, batch):
        self.report = getattr(model.head, "pretrain_report", None)

    def compute(self):
        r = self.report or {}
        out = {f"pretrain/{k}": float(r[k]) for k in ("tokens_per_s", "train_seconds", "parameters", "epochs") if r.get(k) is not None}
        if r.get("mfu") is not None:
            out["pretrain/mfu"] = float(r["mfu"])
        if r.get("curve"):  # the last validation loss, and the best one with its step: a fall after the best is overfitting
            best = min(r["curve"], key=lambda row: row["val_loss"])
            out["pretrain/val_loss"] = float(r["curve"][-1]["val_loss"])
            out["pretrain/best_val_loss"] = float(best["val_loss"])
            out["pretrain/best_val_step"] = float(best["step"])
            out["pretrain/steps"] = float(r["curve"][-1]["step"])
        return out
