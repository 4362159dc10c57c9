"""Exact-match accuracy by greedy generation, overall and per category, with latency.

One metric entry scores the split its stage evaluates (the seen keys, in the llm-hash
recipes); a second entry with ``split = "test"`` and ``prefix = "unseen"`` scores keys no
stage trains on beside it, as ``unseen/exact_match``, in every evaluation — so each stage's
seen number has its unseen counterpart (the chance level of a memorising memory)."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import attrs
import torch

from engram_core.components import BuildContext, Metric
from engram_core.config import ConfigError, field, in_range, non_negative


def _tag_group_ok(inst, attribute, value):
    if not value or "/" in value or not value.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(attribute.name, f"must be a tag group name (letters, digits, '_' or '-'; no '/'), got {value!r}; e.g. 'unseen'")


@attrs.frozen
class ExactMatchMetricConfig:
    """Greedy generation from each prompt; a hit when the text up to EOS equals the answer."""

    use_cache: bool = field(True, help="generate with the KV cache")
    max_examples: int = field(0, help="evaluate at most this many examples of the split (0 = all)", validator=non_negative)
    max_new_tokens: int = field(0, help="generation budget; 0 = longest answer + 2", validator=non_negative)
    batch_size: int = field(0, help="prompts per generate call (0 = the stage's batch size)", validator=in_range(0, None))
    split: str = field("", help="the split to score instead of the stage's ('' = the stage's), e.g. 'test' (keys no stage trains on); its forwards leave the memory's telemetry alone")
    prefix: str = field("eval", help="tag group: <prefix>/exact_match, <prefix>/exact_match_<category>, ...", validator=_tag_group_ok)


class ExactMatchMetric(Metric):
    """`exact_match`, `exact_match_<category>` (for long_recall the categories are the
    distraction buckets), `gen_ms_per_token` and `gen_ms_per_example`. Prompts are
    grouped by token length, so no prompt is padded (padding would shift learned
    positions and make results depend on batch composition). With `split`, it scores that
    split whatever the stage evaluates; with `prefix`, its tags are `<prefix>/...`."""

    directions = {"exact_match": "higher", "exact_match_*": "higher", "gen_ms_per_token": "lower", "gen_ms_per_example": "lower",
                  "*/exact_match": "higher", "*/exact_match_*": "higher", "*/gen_ms_per_token": "lower", "*/gen_ms_per_example": "lower"}
    groups = {"gen_ms_per_*": "cost", "*/gen_ms_per_*": "cost"}

    def __init__(self, cfg: ExactMatchMetricConfig, build: BuildContext):
        self.cfg = cfg
        if cfg.split and build.dataset is not None and cfg.split not in getattr(build.dataset, "splits", (cfg.split,)):
            raise ConfigError("split", f"the data set has no split {cfg.split!r}; it has {', '.join(build.dataset.splits)}")
        self.add_state("hits", defaultdict(int), dist_reduce_fx="sum")  # {category: count}, summed per key
        self.add_state("counts", defaultdict(int), dist_reduce_fx="sum")
        self.add_state("gen_s", 0.0, dist_reduce_fx="sum")
        self.add_state("gen_tokens", 0, dist_reduce_fx="sum")
        self.add_state("n", 0, dist_reduce_fx="sum")

    def batches(self, dataset, split, batch_size):
        codec = dataset.codec
        exs = dataset.examples(self.cfg.split or split)
        if self.cfg.max_examples:
            exs = exs[: self.cfg.max_examples]
        bs = self.cfg.batch_size or batch_size
        groups: dict[int, list] = defaultdict(list)
        for ex in exs:
            groups[len(codec.prompt_ids(ex.prompt))].append(ex)
        budget = self.cfg.max_new_tokens or (max(len(codec.encode(e.completion)) for e in exs) + 2 if exs else 1)
        for n in sorted(groups):
            g = groups[n]
            for i in range(0, len(g), bs):
                chunk = g[i : i + bs]
                ids = torch.tensor([codec.prompt_ids(e.prompt) for e in chunk], dtype=torch.long)
                yield {"prompt_ids": ids, "answers": [e.completion for e in chunk], "category": [e.category for e in chunk], "budget": budget}

    def update(self, model, batch):
        codec = self.ctx.dataset.codec if self.ctx is not None else None
        head = model.head
        ids = batch["prompt_ids"]
        dev = next(head.parameters()).device
        ids = ids.to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        # a side split leaves the memory's telemetry to the stage's own split
        untracked = getattr(model.memory, "untracked", None) if self.cfg.split else None
        t = time.perf_counter()
        with untracked() if untracked is not None else contextlib.nullcontext():
            out = head.generate(ids, batch["budget"], use_cache=self.cfg.use_cache, eos_id=codec.eos_id)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        self.gen_s += time.perf_counter() - t
        self.gen_tokens += out.shape[0] * out.shape[1]
        self.n += out.shape[0]
        for row, ans, cat in zip(out, batch["answers"], batch["category"]):
            hit = int(codec.decode(row.tolist()) == ans)
            self.hits[cat] += hit
            self.counts[cat] += 1

    def compute(self):
        total = sum(self.counts.values())
        out = {"exact_match": sum(self.hits.values()) / total if total else 0.0}
        for cat in sorted(self.counts):
            out[f"exact_match_{cat}"] = self.hits[cat] / self.counts[cat]
        out["gen_ms_per_token"] = 1000 * self.gen_s / max(self.gen_tokens, 1)
        out["gen_ms_per_example"] = 1000 * self.gen_s / max(self.n, 1)
        if self.cfg.prefix == "eval":
            return out  # the engine logs a bare name as eval/<name>
        return {f"{self.cfg.prefix}/{k}": v for k, v in out.items()}
