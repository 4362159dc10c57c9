"""Row-wise table optimisers (engram_core.optim): the rule, lazy rows, sparse/dense/fused, resume."""

import copy

import pytest
import torch
from torch import nn

from engram_core.registry import load_registry
from engram_core.tables.rowwise import RowwiseAdagrad, RowwiseAdam

ROWS, DIM = 50, 6


def reference_step(kind, w, state, grad, lr, eps=1e-8, betas=(0.9, 0.999), wd=0.0):
    """A dense, loop-per-row reference of the same rule: only rows with a non-zero
    gradient row change (the touched rows of a dense gradient)."""
    w = w.clone()
    for r in range(w.shape[0]):
        g = grad[r]
        if not bool((g != 0).any()):
            continue
        w[r] *= 1 - lr * wd
        if kind == "adagrad":
            state["sum"][r] += float((g * g).mean())
            w[r] -= lr * g / (state["sum"][r] ** 0.5 + eps)
        else:
            b1, b2 = betas
            state["step"][r] += 1
            t = state["step"][r]
            state["m"][r] = b1 * state["m"][r] + (1 - b1) * g
            state["v"][r] = b2 * state["v"][r] + (1 - b2) * float((g * g).mean())
            mhat = state["m"][r] / (1 - b1**t)
            vhat = state["v"][r] / (1 - b2**t)
            w[r] -= lr * mhat / (vhat**0.5 + eps)
    return w


def fresh_reference(kind):
    if kind == "adagrad":
        return {"sum": [0.0] * ROWS}
    return {"step": [0] * ROWS, "m": torch.zeros(ROWS, DIM), "v": [0.0] * ROWS}


def batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, ROWS // 2, (7, 3), generator=g) for _ in range(n)]  # rows >= 25 never read


def loss_of(emb, ids):
    out = emb(ids)
    return (out.sin() * torch.arange(1, DIM + 1)).sum()


@pytest.mark.parametrize("kind,cls", [("adagrad", RowwiseAdagrad), ("adam", RowwiseAdam)])
@pytest.mark.parametrize("sparse", [False, True])
def test_equals_dense_reference_and_leaves_untouched_rows(kind, cls, sparse):
    torch.manual_seed(0)
    emb = nn.Embedding(ROWS, DIM, sparse=sparse)
    ref_w = emb.weight.detach().clone()
    ref_state = fresh_reference(kind)
    opt = cls(emb.parameters(), lr=0.05, weight_decay=0.01)
    for ids in batches(6):
        opt.zero_grad()
        loss_of(emb, ids).backward()
        grad = emb.weight.grad.to_dense() if sparse else emb.weight.grad
        ref_w = reference_step(kind, ref_w, ref_state, grad.detach(), lr=0.05, wd=0.01)
        opt.step()
        torch.testing.assert_close(emb.weight.detach(), ref_w, rtol=1e-5, atol=1e-6)
    state = opt.state[emb.weight]
    untouched = torch.arange(ROWS // 2, ROWS)
    for t in state.values():
        assert not t[untouched].any()  # no state for rows never read
    assert emb.weight.shape == (ROWS, DIM)


@pytest.mark.parametrize("cls", [RowwiseAdagrad, RowwiseAdam])
def test_untouched_rows_and_state_are_bit_identical(cls):
    torch.manual_seed(1)
    emb = nn.Embedding(ROWS, DIM, sparse=True)
    opt = cls(emb.parameters(), lr=0.1)
    loss_of(emb, torch.tensor([[1, 2, 3]])).backward()
    opt.step()
    before_w = emb.weight.detach().clone()
    before_state = {k: v.clone() for k, v in opt.state[emb.weight].items()}
    opt.zero_grad()
    loss_of(emb, torch.tensor([[3, 4]])).backward()
    opt.step()
    same = torch.tensor([0, 1, 2] + list(range(5, ROWS)))
    assert torch.equal(emb.weight.detach()[same], before_w[same])
    for k, v in opt.state[emb.weight].items():
        assert torch.equal(v[same], before_state[k][same])
    assert not torch.equal(emb.weight.detach()[3], before_w[3])


@pytest.mark.parametrize("cls", [RowwiseAdagrad, RowwiseAdam])
def test_sparse_dense_and_fused_backward_agree(cls):
    torch.manual_seed(2)
    base = nn.Embedding(ROWS, DIM)
    runs = {}
    for name, sparse, fused in (("dense", False, False), ("sparse", True, False), ("fused", True, True)):
        emb = nn.Embedding(ROWS, DIM, sparse=sparse)
        emb.load_state_dict(base.state_dict())
        opt = cls(emb.parameters(), lr=0.05, fused_backward=fused)
        for ids in batches(5, seed=3):
            opt.zero_grad()
            loss_of(emb, ids).backward()
            if fused:
                assert emb.weight.grad is None  # applied in backward, gradient freed
            opt.step()
        runs[name] = emb.weight.detach()
    torch.testing.assert_close(runs["sparse"], runs["dense"], rtol=1e-6, atol=1e-7)
    assert torch.equal(runs["fused"], runs["sparse"])


@pytest.mark.parametrize("cls", [RowwiseAdagrad, RowwiseAdam])
def test_state_dict_resume_is_exact(cls):
    torch.manual_seed(3)
    emb = nn.Embedding(ROWS, DIM, sparse=True)
    opt = cls(emb.parameters(), lr=0.05)
    data = batches(8, seed=4)

    def train(e, o, items):
        for ids in items:
            o.zero_grad()
            loss_of(e, ids).backward()
            o.step()

    train(emb, opt, data[:4])
    saved_model, saved_opt = copy.deepcopy(emb.state_dict()), copy.deepcopy(opt.state_dict())
    train(emb, opt, data[4:])
    resumed = nn.Embedding(ROWS, DIM, sparse=True)
    resumed.load_state_dict(saved_model)
    ropt = cls(resumed.parameters(), lr=0.05)
    ropt.load_state_dict(saved_opt)
    train(resumed, ropt, data[4:])
    assert torch.equal(resumed.weight, emb.weight)


def test_elementwise_groups_are_adamw():
    """rowwise=False: every element updated, as torch.optim.AdamW (one optimiser for a
    model's tables and its other parameters, what Trainer takes)."""
    torch.manual_seed(4)
    lin = nn.Linear(4, 3)
    ref = copy.deepcopy(lin)
    opt = RowwiseAdam([{"params": lin.parameters(), "rowwise": False}], lr=0.01, weight_decay=0.1)
    ropt = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.1)
    x = torch.randn(5, 4)
    for _ in range(5):
        for m, o in ((lin, opt), (ref, ropt)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for a, b in zip(lin.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_registered_for_recipes():
    known = load_registry().extensions["optimizers"]
    assert {"adamw", "adam", "sgd", "sparse_adam", "rowwise_adagrad", "rowwise_adam"} <= set(known)
