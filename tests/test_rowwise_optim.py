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


# ---- where the table's update happens: in backward (the CUDA default) or at step() ----------
# `auto_policy` answers "auto" as on CUDA (in_backward_by_default) for a CPU tensor, so the
# CUDA default runs here and is compared with the dense path.


def on_cuda(device):
    return True


def table_and_head(seed):
    from engram_core.tables.row_tables import make_row_table

    torch.manual_seed(seed)
    table = make_row_table("device", ROWS, DIM)
    head = nn.Linear(DIM, 1)
    return table, head


def groups_of(table, head):
    return [{"params": [table.weight], "rowwise": True}, {"params": list(head.parameters()), "rowwise": False}]


def head_loss(table, head, ids):
    return head(table(ids).sin()).pow(2).sum()


def train(table, head, opt, steps, micro=1, clip=None, seed=5):
    """`steps` optimiser steps of `micro` backwards each; returns, per backward, whether the
    table's gradient was sparse and whether p.grad held a table gradient after it."""
    seen = []
    handle = table.weight.register_hook(lambda g: seen.append(g.is_sparse))
    kept = []
    for k, ids in enumerate(batches(steps * micro, seed=seed)):
        if k % micro == 0:
            opt.zero_grad()
        head_loss(table, head, ids).backward()
        kept.append(table.weight.grad is not None)
        if k % micro == micro - 1:
            if clip is not None:
                torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
            opt.step()
    handle.remove()
    return seen, kept


@pytest.mark.parametrize("cls", [RowwiseAdagrad, RowwiseAdam])
@pytest.mark.parametrize("micro", [1, 3])
def test_in_backward_default_equals_the_dense_path(cls, micro):
    """"auto" as on CUDA: the table's gradient is sparse, never kept in p.grad, and the
    parameters after 6 steps equal the dense path's (fused_backward=False), with one
    backward a step (updated inside the backward) or three (rows summed, applied at step)."""
    runs = {}
    for name, setting in (("dense", False), ("in_backward", "auto")):
        table, head = table_and_head(seed=6)
        opt = cls(groups_of(table, head), lr=0.05, weight_decay=0.01, fused_backward=setting, auto_policy=on_cuda)
        seen, kept = train(table, head, opt, steps=6, micro=micro)
        runs[name] = (table.weight.detach().clone(), [p.detach().clone() for p in head.parameters()], seen, kept, opt)
    dense, fused = runs["dense"], runs["in_backward"]
    assert not any(dense[2]) and all(dense[3]), "the dense path: dense gradients in p.grad, as before"
    assert all(fused[2]) and not any(fused[3]), "in backward: row gradients, taken out of p.grad"
    assert fused[4]._mode == ("backward" if micro == 1 else "accumulate")
    torch.testing.assert_close(fused[0], dense[0], rtol=1e-6, atol=1e-7)
    for a, b in zip(fused[1], dense[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls", [RowwiseAdagrad, RowwiseAdam])
def test_the_update_happens_inside_the_backward(cls):
    table, head = table_and_head(seed=7)
    opt = cls(groups_of(table, head), lr=0.05, auto_policy=on_cuda)
    train(table, head, opt, steps=1)  # the first step learns how many backwards make a step
    before = table.weight.detach().clone()
    ids = torch.tensor([[1, 2, 3]])
    head_loss(table, head, ids).backward()
    changed = (table.weight.detach() != before).any(1).nonzero().squeeze(1)
    assert changed.tolist() == [1, 2, 3], "rows read were updated before step()"
    assert table.weight.grad is None and head.weight.grad is not None, "the rest waits for step() (and clipping)"
    opt.step()
    with pytest.raises(RuntimeError, match="second backward before optimizer.step"):
        head_loss(table, head, ids).backward()
        head_loss(table, head, ids).backward()


def test_cpu_default_is_todays_path():
    """"auto" on the CPU (the default policy): dense gradients, updated at step(), so
    published CPU results reproduce bit for bit."""
    table, head = table_and_head(seed=8)
    opt = RowwiseAdam(groups_of(table, head), lr=0.05)
    assert not opt.updates_in_backward and not table.row_gradients
    seen, kept = train(table, head, opt, steps=2)
    assert not any(seen) and all(kept)


def test_clipping_sees_no_table_gradient_and_clips_the_rest():
    """In backward, the table is outside the global norm (as a sparse table's gradient is in
    the engine): torch's clip_grad_norm_ runs, over the other parameters only."""
    runs = {}
    for name, setting in (("in_backward", "auto"), ("rest_only", False)):
        table, head = table_and_head(seed=9)
        opt = RowwiseAdam(groups_of(table, head), lr=0.05, fused_backward=setting, auto_policy=on_cuda)
        if name == "rest_only":  # the reference: clip only the head's gradient, update the table unclipped
            for ids in batches(4, seed=5):
                opt.zero_grad()
                head_loss(table, head, ids).backward()
                torch.nn.utils.clip_grad_norm_(list(head.parameters()), 0.01)
                opt.step()
        else:
            train(table, head, opt, steps=4, clip=0.01)
        runs[name] = [table.weight.detach().clone(), *[p.detach().clone() for p in head.parameters()]]
    for a, b in zip(runs["in_backward"], runs["rest_only"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls", [RowwiseAdagrad, RowwiseAdam])
def test_resume_of_an_in_backward_optimiser_is_exact(cls):
    table, head = table_and_head(seed=10)
    opt = cls(groups_of(table, head), lr=0.05, auto_policy=on_cuda)
    train(table, head, opt, steps=3, seed=11)
    saved = copy.deepcopy((table.state_dict(), head.state_dict(), opt.state_dict()))
    train(table, head, opt, steps=3, seed=12)
    table2, head2 = table_and_head(seed=0)
    table2.load_state_dict(saved[0])
    head2.load_state_dict(saved[1])
    opt2 = cls(groups_of(table2, head2), lr=0.05, auto_policy=on_cuda)
    opt2.load_state_dict(saved[2])
    train(table2, head2, opt2, steps=3, seed=12)
    assert torch.equal(table2.weight, table.weight)
    assert all(torch.equal(a, b) for a, b in zip(head2.parameters(), head.parameters()))


def test_fp16_autocast_falls_back_to_the_dense_path():
    """Under fp16 autocast (loss scaling: the scaler must unscale the table's gradient and may
    skip the step) the optimiser gives the table back at its first read: dense gradients in
    p.grad, updated at step(), equal to fused_backward=False."""
    runs = {}
    for setting in ("auto", False):
        table, head = table_and_head(seed=13)
        opt = RowwiseAdagrad(groups_of(table, head), lr=0.05, fused_backward=setting, auto_policy=on_cuda)
        assert opt.updates_in_backward == (setting == "auto")
        with torch.autocast("cpu", dtype=torch.float16):
            seen, kept = train(table, head, opt, steps=3)
        assert not opt.updates_in_backward and not table.row_gradients
        assert all(kept) and not any(seen)
        runs[setting] = table.weight.detach().clone()
    assert torch.equal(runs["auto"], runs[False])
    table, head = table_and_head(seed=13)
    opt = RowwiseAdagrad(groups_of(table, head), lr=0.05, auto_policy=on_cuda)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 needs no loss scaling: rows, in backward
        seen, kept = train(table, head, opt, steps=2)
    assert all(seen) and not any(kept)


def test_a_newer_optimiser_takes_the_table_and_release_gives_it_back():
    table, head = table_and_head(seed=14)
    first = RowwiseAdam(groups_of(table, head), lr=0.05, auto_policy=on_cuda)
    second = RowwiseAdam([{"params": [table.weight]}], lr=0.05, auto_policy=on_cuda)
    head_loss(table, head, torch.tensor([[1, 2]])).backward()
    assert id(table.weight) in second._pending and not first._pending, "only the newest optimiser takes the gradient"
    second.zero_grad()
    second.release()
    assert not table.row_gradients, "released: the table makes the gradient it made before"
    head_loss(table, head, torch.tensor([[1, 2]])).backward()
    assert table.weight.grad is not None and not table.weight.grad.is_sparse


def test_fused_backward_must_be_auto_true_or_false():
    with pytest.raises(ValueError, match="fused_backward must be 'auto', True or False"):
        RowwiseAdam(nn.Embedding(3, 2).parameters(), fused_backward="yes")


def test_compiled_forward_keeps_row_gradients_and_equals_eager():
    """Under torch.compile a table read with row gradients runs eagerly (inductor cannot
    lower a sparse gradient): the rest is compiled, and the run equals the eager one."""
    runs = {}
    for compiled in (False, True):
        table, head = table_and_head(seed=15)
        opt = RowwiseAdam(groups_of(table, head), lr=0.05, auto_policy=on_cuda)
        torch.compiler.reset()
        loss = torch.compile(head_loss) if compiled else head_loss
        seen = []
        table.weight.register_hook(lambda g, seen=seen: seen.append(g.is_sparse))
        for ids in batches(3, seed=16):
            opt.zero_grad()
            loss(table, head, ids).backward()
            opt.step()
        assert seen and all(seen), "row gradients, compiled or not"
        runs[compiled] = table.weight.detach().clone()
    torch.testing.assert_close(runs[True], runs[False], rtol=1e-6, atol=1e-7)


def test_a_table_also_read_whole_gets_one_gradient_in_backward():
    """A memory that reads rows and also scans the whole table (hybrid_hash_content's
    content retrieval): the two gradients meet as one (dense) before it is accumulated, and
    the update in backward equals the dense path's."""
    runs = {}
    for setting in ("auto", False):
        table, head = table_and_head(seed=17)
        opt = RowwiseAdagrad(groups_of(table, head), lr=0.05, fused_backward=setting, auto_policy=on_cuda)
        query = torch.linspace(-1, 1, DIM)
        for ids in batches(3, seed=18):
            opt.zero_grad()
            (head_loss(table, head, ids) + (table.full_weight @ query).softmax(0).max()).backward()
            assert table.weight.grad is None or setting is False
            opt.step()
        runs[setting] = table.weight.detach().clone()
    torch.testing.assert_close(runs["auto"], runs[False], rtol=1e-6, atol=1e-7)


def test_a_model_with_a_table_updated_in_backward_still_pickles(tmp_path):
    """torch.save(model) pickles parameters with their attributes: the mark is saved as no
    owner (the loaded table makes the gradient it made before)."""
    table, head = table_and_head(seed=19)
    opt = RowwiseAdam(groups_of(table, head), lr=0.05, auto_policy=on_cuda)
    assert table.row_gradients and opt.updates_in_backward
    torch.save(table, tmp_path / "table.pt")
    loaded = torch.load(tmp_path / "table.pt", weights_only=False)
    assert torch.equal(loaded.weight, table.weight) and not loaded.row_gradients


@pytest.mark.parametrize("cls", [RowwiseAdagrad, RowwiseAdam])
def test_sparse_reads_summing_to_zero_leave_the_row_and_its_state(cls):
    """Rows read with gradients that cancel (and rows read many times) in a sparse gradient:
    the cancelled rows, their weight decay and their state stay bit-identical, as the dense
    path leaves them; the others equal the dense path."""
    torch.manual_seed(0)
    runs = {}
    for sparse in (False, True):
        emb = nn.Embedding(ROWS, DIM, sparse=sparse)
        with torch.no_grad():
            emb.weight.copy_(torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(1)))
        opt = cls(emb.parameters(), lr=0.05, weight_decay=0.1, fused_backward=False)
        ids = torch.tensor([[3, 3, 7, 7, 7, 9], [9, 9, 11, 3, 7, 12]])
        sign = torch.tensor([[1.0, -1.0, 1.0, 1.0, 1.0, 2.0], [-1.0, -1.0, 1.0, 0.0, 1.0, 1.0]])  # row 3 and row 9 cancel
        for _ in range(3):
            opt.zero_grad()
            (emb(ids) * sign[..., None]).sum().backward()
            opt.step()
        runs[sparse] = (emb.weight.detach().clone(), {k: v.clone() for k, v in opt.state[emb.weight].items()})
    (dense_w, dense_state), (sparse_w, sparse_state) = runs[False], runs[True]
    start = torch.randn(ROWS, DIM, generator=torch.Generator().manual_seed(1))
    for row in (3, 9):  # summed gradient exactly zero: never updated, no decay
        assert torch.equal(sparse_w[row], start[row]) and torch.equal(dense_w[row], start[row])
        assert all(float(v[row].abs().sum()) == 0.0 for v in sparse_state.values())
    torch.testing.assert_close(sparse_w, dense_w, rtol=1e-6, atol=1e-7)
    for k in dense_state:
        torch.testing.assert_close(sparse_state[k], dense_state[k], rtol=1e-6, atol=1e-7)


def test_a_sparse_gradient_is_summed_without_reading_the_device():
    """`summed_reads` keeps every shape fixed by the number of reads: no coalesce, no
    nonzero, no scalar read (each a host synchronisation on a GPU, mid-backward)."""
    from torch.profiler import ProfilerActivity, profile

    from engram_core.tables.rowwise import summed_reads

    emb = nn.Embedding(ROWS, DIM, sparse=True)
    emb(torch.tensor([[1, 4, 4, 2, 1, 1]])).pow(2).sum().backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        rows, g, keep = summed_reads(emb.weight.grad)
    names = {e.name for e in prof.events()}
    assert not names & {"aten::coalesce", "aten::_coalesce", "aten::nonzero", "aten::item", "aten::_local_scalar_dense"}, names
    assert rows.shape == (6,) and g.shape == (6, DIM) and bool(keep.all())
    dense = emb.weight.grad.to_dense()
    assert torch.allclose(g, dense.index_select(0, rows))  # every read carries its row's whole gradient
