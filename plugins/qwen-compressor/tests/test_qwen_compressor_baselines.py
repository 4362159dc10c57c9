"""The warm start's named baselines and greedy scoring: the parameter-free `gather` memory
reads exactly the value positions (the `oracle_slots` prefix on the rigid template, other
tokens on mixed templates) and has nothing to train; `digit_accuracy`'s greedy mode scores
the generated answer, which agrees with the teacher-forced digit accuracy where the reader
generates a digit and differs where it generates something else."""

import types

import pytest
import torch
from engram_qwen_compressor.memories import Gather, GatherConfig
from engram_qwen_compressor.metrics import DigitAccuracy, DigitAccuracyConfig
from qwen_compressor_helpers import batch, small_data, small_model

from engram_core.components import BuildContext, Model


def gather_model(ds, **kw):
    model, build = small_model(ds, memory=False)
    mem = Gather(GatherConfig(**kw), build)
    return Model(model.head, mem, "context"), build


def test_gather_has_no_trainable_parameters():
    ds = small_data()
    model, _ = gather_model(ds)
    assert list(model.memory.parameters()) == [] and model.memory.state_dict() == {}
    assert model.memory.stats()["param_update"] == 0.0


@pytest.mark.parametrize("budget, n_removed", [(64, 9), (96, 6), (128, 3)])
def test_gather_is_the_oracle_slots_prefix_on_the_rigid_template(budget, n_removed):
    """The rigid byte template puts statement j's value digit at 8 + 10j: the gather's slots,
    found from those two constants, are the generator-labelled oracle_slots vectors, slot for
    slot, and the slots past the removed statements are masked out."""
    ds = small_data(budgets=[64, 96, 128])
    model, _ = gather_model(ds, n_slots=16)
    b = batch(ds, n=6, budget=budget)
    with torch.no_grad():
        gathered, gmask = model.head.prefix_for(b, "latent")
        oracle, omask = model.head.prefix_for(b, "oracle_slots")
    n = oracle.shape[1]
    assert gathered.shape[1] == 16 and int(gmask.sum(1).min()) == int(gmask.sum(1).max()) == n_removed
    assert torch.equal(gmask[:, :n].bool(), omask.bool()) and not gmask[:, n:].any()
    assert torch.equal(gathered[:, :n] * omask[..., None], oracle * omask[..., None])
    assert not gathered[:, n:].any()
    positions, valid = model.memory.positions(b["removed_mask"])
    assert torch.equal(positions[valid].reshape(6, n_removed), b["removed_value_pos"][:, :n_removed])


def test_gather_reads_fixed_positions_not_the_labels():
    """With mixed templates the value digits move; the gather still reads 8 + 10j (it has
    no labels), so on some slots it reads a token that is not a value digit."""
    ds = small_data(budgets=[64], template_diversity=4)
    model, _ = gather_model(ds, n_slots=16)
    b = batch(ds, n=8, budget=64)
    positions, valid = model.memory.positions(b["removed_mask"])
    k = b["removed_value_pos"].shape[1]
    both = valid[:, :k] & b["removed_value_mask"].bool()
    assert bool((positions[:, :k][both] != b["removed_value_pos"][both]).any())
    assert torch.equal(positions[0, :3], torch.tensor([8, 18, 28]))


class FixedLogitsHead:
    """A reader whose answer logits are given: the gold answer token gets `gold`, the digit
    `wrong_digit` gets `wrong`, token `other` gets `other_logit`, everything else 0."""

    def __init__(self, spec, gold, wrong_digit=None, wrong=0.0, other=None, other_logit=0.0):
        self.answer_token_ids = tuple(spec.answer_token_ids)
        self.vocab_size = spec.vocab_size
        self.memory_active = False
        self.gold, self.wrong_digit, self.wrong, self.other, self.other_logit = gold, wrong_digit, wrong, other, other_logit

    def answer_logits(self, batch, mode):
        logits = torch.zeros(batch["answer"].shape[0], self.vocab_size)
        logits[torch.arange(logits.shape[0]), batch["answer"]] = self.gold
        if self.wrong_digit is not None:
            logits[:, self.answer_token_ids[self.wrong_digit]] = self.wrong
        if self.other is not None:
            logits[:, self.other] = self.other_logit
        return logits

    def digit_logits(self, logits):
        return logits[:, list(self.answer_token_ids)]


def scores(ds, head, greedy=True):
    metric = DigitAccuracy(DigitAccuracyConfig(modes=["discard"], budgets=[64], breakdown=[], greedy=greedy,
                                               max_examples=16),
                           BuildContext(spec=ds.spec, dataset=ds))
    model = types.SimpleNamespace(head=head)
    for b in metric.batches(ds, "eval", 8):
        metric.update(model, b)
    return metric.compute()


def test_greedy_equals_teacher_forced_for_a_reader_that_copies_the_answer():
    ds = small_data()
    out = scores(ds, FixedLogitsHead(ds.spec, gold=5.0))  # copies the gold digit
    assert out["acc/discard_b64"] == out["greedy/discard_b64"] == 1.0 and out["greedy_nondigit/discard_b64"] == 0.0
    # a reader that always answers the same digit: generated and teacher-forced agree episode by episode
    out = scores(ds, FixedLogitsHead(ds.spec, gold=1.0, wrong_digit=3, wrong=4.0))
    assert out["acc/discard_b64"] == out["greedy/discard_b64"] < 1.0


def test_greedy_differs_where_the_reader_would_generate_a_non_digit():
    """Teacher forcing scores the best digit; greedy generation emits the best token. A reader
    whose top token is a space but whose best digit is the gold one is right teacher-forced
    and wrong generated."""
    ds = small_data()
    space = ds.tok.encode(" ")[0]
    assert space not in ds.spec.answer_token_ids
    out = scores(ds, FixedLogitsHead(ds.spec, gold=5.0, other=space, other_logit=9.0))
    assert out["acc/discard_b64"] == 1.0 and out["greedy/discard_b64"] == 0.0
    assert out["greedy_nondigit/discard_b64"] == 1.0


def test_greedy_hits_are_teacher_forced_hits_on_a_real_reader():
    """Generating the gold digit means it is also the best digit, never the reverse."""
    ds = small_data(budgets=[64, 96])
    model, build = small_model(ds)
    metric = DigitAccuracy(DigitAccuracyConfig(modes=["summary", "latent", "oracle_slots"], greedy=True, max_examples=32),
                           build)
    with torch.no_grad():
        for b in metric.batches(ds, "eval", 16):
            metric.update(model, b)
    out = metric.compute()
    for key in [k for k in out if k.startswith("acc/") and k != "acc/chance"]:
        assert out["greedy/" + key[4:]] <= out[key]


def test_greedy_is_off_by_default_and_adds_no_keys():
    ds = small_data()
    out = scores(ds, FixedLogitsHead(ds.spec, gold=5.0), greedy=False)
    assert not any(k.startswith("greedy") for k in out) and DigitAccuracyConfig().greedy is False


def test_learned_memories_keep_every_slot_visible():
    """Only a memory with `context_mask` masks slots: the learned memories' latent path is unchanged."""
    ds = small_data()
    model, _ = small_model(ds)
    with torch.no_grad():
        prefix, mask = model.head.prefix_for(batch(ds), "latent")
    assert mask is None and prefix.shape[1] == model.memory.cfg.n_slots
