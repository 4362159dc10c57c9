"""Logits only where scored: the core backbone's `scored_logits`, and `token_lm` /
`completion_accuracy` on it, equal the full-vocabulary computation at every position
(loss, gradients, accuracy), with and without a memory at each point; heads without
`scored_logits` keep the full path."""

import pytest
import torch
import torch.nn.functional as F

from engram_core.builtin.backbone import (
    CausalBackbone,
    CausalBackboneConfig,
    check_scored_bound,
    scored_positions,
)
from engram_core.builtin.lm import (
    CompletionAccuracy,
    CompletionAccuracyConfig,
    TokenLMConfig,
    TokenLMObjective,
)
from engram_core.components import BuildContext, DataSpec, Memory, Model


class ShiftLayer(Memory):
    """layer: adds a learned embedding of the previous token."""

    def __init__(self, width=16, vocab=32):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)

    def layer_indices(self):
        return (0,)

    def apply_layer(self, index, hidden, ids):
        if index != 0:
            return hidden
        return hidden + self.emb(F.pad(ids, (1, 0))[:, :-1])


class MeanContext(Memory):
    """context: two prefix vectors, the masked mean of the token embeddings and its negative."""

    def __init__(self, width=16, vocab=32):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)

    def write_context(self, ids, mask):
        m = mask.unsqueeze(-1).float()
        mean = (self.emb(ids) * m).sum(1) / m.sum(1).clamp_min(1)
        return torch.stack([mean, -mean], 1)


class SumTrace(Memory):
    """trace: the masked sum of projected states; reads project it by the query."""

    def __init__(self, width=16):
        super().__init__()
        self.v = torch.nn.Linear(width, width, bias=False)
        self.q = torch.nn.Linear(width, width, bias=False)

    def write_trace(self, states, write_mask, key_states=None):
        return (self.v(states) * write_mask.to(states.dtype).unsqueeze(-1)).sum(1)

    def read_trace(self, trace, queries):
        return torch.tanh(self.q(queries)) * trace.unsqueeze(1)


VOCAB, LENGTH = 32, 20
POINTS = [(None, None), (ShiftLayer, "layer"), (MeanContext, "context"), (SumTrace, "trace")]


def _model(memory_cls=None, point=None, max_scored=None, seed=0):
    torch.manual_seed(seed)
    fields = {"vocab_size": VOCAB, "max_len": LENGTH}
    if max_scored is not None:
        fields["max_scored"] = max_scored
    head = CausalBackbone(CausalBackboneConfig(dim=16, n_layers=2, n_heads=2), BuildContext(spec=DataSpec("t", **fields)))
    return Model(head, memory_cls() if memory_cls else None, point).train()


def _batch(seed=1):
    """Context (8 positions) writes, the rest reads; rows score 3, 1, 0 and 5 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (4, LENGTH), generator=g)
    labels = torch.full_like(ids, -100)
    for row, where in enumerate([[9, 12, 19], [10], [], [9, 11, 13, 15, 17]]):
        labels[row, where] = ids[row, where]
    write = torch.zeros_like(ids)
    write[:, :8] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids), "write_mask": write, "read_mask": 1 - write}


def _full_loss(model, batch):
    """What token_lm computed before: cross-entropy over the full logits of every position."""
    logits, view = model.head.forward_batch(batch)
    target = view["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), target.reshape(-1), ignore_index=-100), logits


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("memory_cls,point", POINTS)
def test_scored_loss_and_gradients_equal_the_full_computation(memory_cls, point):
    batch = _batch()
    model = _model(memory_cls, point)
    full, _ = _full_loss(model, batch)
    full.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)

    loss, terms = TokenLMObjective(TokenLMConfig(), None)(model, batch)
    loss.backward()
    got = _grads(model)
    assert torch.allclose(loss, full, rtol=1e-6, atol=1e-6)
    assert set(got) == set(expected) and len(got) > 10  # memory parameters included where there is one
    for name in expected:
        assert torch.allclose(got[name], expected[name], rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("memory_cls,point", POINTS)
def test_scored_logits_are_the_full_logits_at_the_scored_positions(memory_cls, point):
    batch = _batch()
    model = _model(memory_cls, point).eval()
    with torch.no_grad():
        full, _ = model.head.forward_batch(batch)
        logits, targets, _ = model.head.scored_logits(batch)
    assert logits.shape == (4, 5, VOCAB)  # the largest count in the batch (5) per sequence
    positions, _ = scored_positions(batch["labels"], 5)
    expected = full.gather(1, positions[..., None].expand(-1, -1, VOCAB))
    assert torch.allclose(logits, expected, atol=1e-6)
    assert targets[0].tolist() == batch["labels"][0, [9, 12, 19]].tolist() + [-100, -100]
    assert targets[2].tolist() == [-100] * 5


def test_token_acc_is_a_masked_mean_over_the_scored_tokens():
    batch = _batch()
    model = _model()
    _, terms = TokenLMObjective(TokenLMConfig(), None)(model, batch)
    with torch.no_grad():
        _, logits = _full_loss(model, batch)
    target = batch["labels"][:, 1:]
    scored = target != -100
    expected = (logits[:, :-1].argmax(-1) == target)[scored].float().mean()
    assert terms["token_acc"].item() == expected.item()


@pytest.mark.parametrize("memory_cls,point", POINTS)
def test_completion_accuracy_counts_as_the_full_logits_do(memory_cls, point):
    torch.manual_seed(0)
    batch = _batch()
    model = _model(memory_cls, point).eval()
    # a model that gets some right: set some labels to its own argmax predictions
    with torch.no_grad():
        logits, _ = model.head.forward_batch(batch)
    pred = logits[:, :-1].argmax(-1)
    labels = batch["labels"].clone()
    labels[0, 12] = pred[0, 11]  # row 0: one of three right (teacher-forced: the input is unchanged)
    labels[1, 10] = pred[1, 9]  # row 1: its only token right
    batch = dict(batch, labels=labels)
    metric = CompletionAccuracy(CompletionAccuracyConfig(), None)
    metric.reset()
    metric.update(model, batch)
    out = metric.compute()
    target = labels[:, 1:]
    scored = target != -100
    right = (pred == target) & scored
    assert out["acc"] == int(right.sum()) / int(scored.sum())
    assert out["seq_acc"] == int(((right | ~scored).all(1) & scored.any(1)).sum()) / 3
    assert out["seq_acc"] >= 1 / 3


def test_a_declared_bound_fixes_the_shape_and_a_batch_over_it_is_refused():
    batch = _batch()
    model = _model(max_scored=6)
    logits, targets, _ = model.head.scored_logits(batch)
    assert logits.shape == (4, 6, VOCAB) and (targets != -100).sum(1).tolist() == [3, 1, 0, 5]
    full, _ = _full_loss(model, batch)
    loss, _ = TokenLMObjective(TokenLMConfig(), None)(model, batch)
    assert torch.allclose(loss, full, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="batch item 3 has 5 scored tokens, more than the 4 per sequence"):
        _model(max_scored=4).head.scored_logits(batch)
    check_scored_bound(batch["labels"], 5)  # exactly at the bound is fine


def test_classification_batches_project_one_position():
    spec = DataSpec("t", vocab_size=VOCAB, seq_len=8, label_offset=20)
    torch.manual_seed(0)
    head = CausalBackbone(CausalBackboneConfig(dim=16, n_layers=1, n_heads=2), BuildContext(spec=spec))
    batch = {"tokens": torch.randint(0, 20, (3, 8)), "label": torch.tensor([0, 1, 5])}
    logits, targets, _ = head.scored_logits(batch)
    assert logits.shape == (3, 1, VOCAB) and targets[:, 0].tolist() == [20, 21, 25]
    full, _ = head.forward_batch(batch)
    assert torch.allclose(logits[:, 0], full[:, -2], atol=1e-6)


class _PlainHead(torch.nn.Module):
    """A causal LM head with neither scored_logits nor forward_batch: head(input_ids, mask)."""

    def __init__(self, backbone):
        super().__init__()
        self.inner = backbone

    def forward(self, input_ids, attention_mask=None):
        return self.inner.lm(input_ids=input_ids, attention_mask=attention_mask)[0]


class _BatchHead(_PlainHead):
    """A head with forward_batch only (the interface heads of other plugins may offer)."""

    def forward_batch(self, batch):
        return self(batch["input_ids"], batch.get("attention_mask")), batch


@pytest.mark.parametrize("wrapper", [_PlainHead, _BatchHead])
def test_heads_without_scored_logits_keep_the_full_path(wrapper):
    batch = _batch()
    reference = _model()
    expected, _ = _full_loss(reference, batch)
    model = Model(wrapper(reference.head), None, None).train()
    loss, terms = TokenLMObjective(TokenLMConfig(), None)(model, batch)
    assert torch.allclose(loss, expected, rtol=1e-6, atol=1e-6)
    metric = CompletionAccuracy(CompletionAccuracyConfig(), None)
    metric.reset()
    metric.update(model.eval(), batch)
    assert 0.0 <= metric.compute()["acc"] <= 1.0


def test_host_checks_run_on_cpu_always_and_on_an_accelerator_once_per_mode():
    head = _model().head
    cpu = torch.zeros(1)
    assert head._checks_due(cpu) and head._checks_due(cpu)
    accelerator = torch.empty(1, device="meta")  # any non-CPU tensor takes the accelerator rule
    head.train()
    assert head._checks_due(accelerator) and not head._checks_due(accelerator)
    head.eval()
    assert head._checks_due(accelerator) and not head._checks_due(accelerator)
    head.train()
    assert not head._checks_due(accelerator)


def test_a_read_before_a_write_is_still_refused_through_scored_logits():
    batch = _batch()
    batch["write_mask"] = batch["write_mask"].clone()
    batch["write_mask"][1, 15] = 1
    with pytest.raises(ValueError, match="batch item 1 writes at position 15 but reads from position 8"):
        _model(SumTrace, "trace").head.scored_logits(batch)


# ---- on a GPU (skipped without CUDA) -----------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
@pytest.mark.parametrize("memory_cls,point", POINTS)
def test_on_cuda_the_scored_loss_and_gradients_equal_the_full_computation(memory_cls, point):
    batch = {k: v.cuda() for k, v in _batch().items()}
    model = _model(memory_cls, point).cuda()
    full, _ = _full_loss(model, batch)
    full.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    loss, _ = TokenLMObjective(TokenLMConfig(), None)(model, batch)
    loss.backward()
    assert torch.allclose(loss, full, rtol=1e-5, atol=1e-6)
    for name, grad in _grads(model).items():
        assert torch.allclose(grad, expected[name], rtol=1e-4, atol=1e-6), name


@cuda
@pytest.mark.parametrize("memory_cls,point", POINTS)
def test_on_cuda_sampling_and_the_objective_wait_for_nothing_after_the_first_batch(memory_cls, point):
    """With the data on the device and a declared bound, drawing a batch and computing the
    loss and its terms never make the host wait (sync debug mode raises on any wait). The
    backward is not checked: it is torch's own kernels (embedding backward may count on the host)."""
    from engram_core.builtin.mqar import MQARConfig, MQARDataset

    cfg = MQARConfig(n_pairs=4, seq_len=LENGTH, vocab_size=VOCAB, n_train=256, n_eval=32)
    data = MQARDataset(cfg)
    data.place(torch.device("cuda"))
    model = _model(memory_cls, point, max_scored=cfg.n_pairs).cuda()
    objective = TokenLMObjective(TokenLMConfig(), None)
    g = torch.Generator().manual_seed(0)
    loss, _ = objective(model, data.sample("train", 16, g))  # the first training batch runs the host-side checks
    loss.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            loss, terms = objective(model, data.sample("train", 16, g))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss) and 0.0 <= float(terms["token_acc"]) <= 1.0
