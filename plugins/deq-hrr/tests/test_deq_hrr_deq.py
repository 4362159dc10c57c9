"""Solvers, implicit and phantom gradients, the DEQ head."""

import pytest
import torch
from engram_deq_hrr.data import NeedleConfig, NeedleDataset
from engram_deq_hrr.deq import DEQFixedPoint, anderson, fixed_point_iteration
from engram_deq_hrr.head import DEQClassifier, DEQClassifierConfig
from engram_deq_hrr.memories import HRRMemory, HRRMemoryConfig

from engram_core.components import BuildContext, Model


def contraction(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g)
    W = 0.8 * W / torch.linalg.matrix_norm(W, ord=2)
    x = torch.randn(3, n, generator=g)
    return W, x


@pytest.mark.parametrize("solver", [fixed_point_iteration, anderson])
def test_solvers_find_the_fixed_point(solver):
    W, x = contraction()
    f = lambda z: torch.tanh(z @ W.T + x)  # noqa: E731
    z, stats = solver(f, torch.zeros_like(x), 200, 1e-6)
    assert stats.converged and stats.residual < 1e-6
    assert torch.allclose(f(z), z, atol=1e-5)


def test_anderson_needs_fewer_iterations_than_plain_iteration():
    W, x = contraction(1)
    W = W / 0.8 * 0.97  # a slow contraction
    f = lambda z: torch.tanh(z @ W.T + x)  # noqa: E731
    _, fp = fixed_point_iteration(f, torch.zeros_like(x), 500, 1e-6)
    _, aa = anderson(f, torch.zeros_like(x), 500, 1e-6)
    assert aa.converged and aa.iterations < fp.iterations


def _grads(grad, steps=1):
    W, x = contraction(2)
    W = W.clone().requires_grad_()
    deq = DEQFixedPoint("anderson", 100, 1e-8, grad, backward_max_iter=200, backward_tol=1e-10, phantom_steps=steps)
    z = deq(lambda z: torch.tanh(z @ W.T + x), torch.zeros_like(x))
    z.pow(2).sum().backward()
    return W.grad, deq


def test_implicit_gradient_matches_unrolled_autodiff():
    W, x = contraction(2)
    W = W.clone().requires_grad_()
    z = torch.zeros_like(x)
    for _ in range(200):  # unrolled to convergence
        z = torch.tanh(z @ W.T + x)
    z.pow(2).sum().backward()
    implicit, deq = _grads("implicit")
    assert torch.allclose(implicit, W.grad, atol=1e-4, rtol=1e-3)
    assert deq.backward_stats.iterations > 1


def test_phantom_gradient_is_close_but_cheaper():
    implicit, _ = _grads("implicit")
    phantom, deq = _grads("phantom", steps=5)
    cos = torch.nn.functional.cosine_similarity(implicit.flatten(), phantom.flatten(), dim=0)
    assert cos > 0.9 and deq.backward_stats.iterations == 0


def _head(cache, **kw):
    ds = NeedleDataset(NeedleConfig(seq_len=24, n_pairs=2, n_train=16, n_eval=8), BuildContext(cache_dir=cache))
    build = BuildContext(spec=ds.spec, seed=0, cache_dir=cache)
    head = DEQClassifier(DEQClassifierConfig(hidden=16, embed=16, **kw), build)
    build.head = head
    return ds, head, build


@pytest.mark.parametrize("kw", [{}, {"grad": "phantom", "solver": "fixed_point"}, {"pool": "last_mean", "spectral_norm": False}])
def test_head_forward_backward_and_solver_stats(tmp_path, kw):
    ds, head, build = _head(tmp_path, **kw)
    model = Model(head, HRRMemory(HRRMemoryConfig(dim=32), build), "trace")
    batch = ds.sample("train", 4, torch.Generator().manual_seed(0))
    out = head.forward_detailed(batch)
    assert out["logits"].shape == (4, ds.spec.n_classes)
    assert 1 <= out["solver_iters"] <= head.cfg.max_iter and out["solver_residual"] < 1.0
    out["logits"].sum().backward()
    for name, p in model.named_parameters():
        if name.startswith(("memory.read_gate", "memory.out_proj")) or "classifier" in name or "state_map" in name:
            assert p.grad is not None, name


def test_spectral_norm_keeps_the_state_map_contractive(tmp_path):
    _, head, _ = _head(tmp_path, contraction=0.9)
    with torch.nn.utils.parametrize.cached():
        for _ in range(5):  # a few power iterations
            _ = head.state_map.weight
    z1, z2 = torch.randn(2, 24, 16), torch.randn(2, 24, 16)
    ratio = (head._mix(z1) - head._mix(z2)).norm() / (z1 - z2).norm()
    assert ratio < 0.95


def test_memory_knock_out_changes_logits_and_enabled_flag(tmp_path):
    ds, head, build = _head(tmp_path)
    mem = HRRMemory(HRRMemoryConfig(dim=32), build)
    Model(head, mem, "trace").eval()
    batch = ds.sample("eval", 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        on = head.forward_classify(batch)
        mem.enabled = False
        off = head.forward_detailed(batch)
    assert "memory" not in off and not torch.allclose(on, off["logits"])


def test_gru_trunk_is_a_plain_recurrent_cell(tmp_path):
    """trunk = 'gru': causal states from a GRU (a later token cannot change an earlier state), no solver."""
    ds, head, build = _head(tmp_path, trunk="gru")
    Model(head, HRRMemory(HRRMemoryConfig(dim=32), build), "trace")
    batch = ds.sample("train", 4, torch.Generator().manual_seed(0))
    out = head.forward_detailed(batch)
    assert out["solver_iters"] == 0 and out["logits"].shape == (4, ds.spec.n_classes)
    out["logits"].sum().backward()
    assert head.rnn.weight_hh_l0.grad is not None and head.rnn.weight_hh_l0.grad.abs().sum() > 0
    tokens = batch["tokens"].clone()
    z1 = head.equilibrium(tokens)
    tokens[:, -1] = (tokens[:, -1] + 1) % ds.spec.vocab_size
    z2 = head.equilibrium(tokens)
    assert torch.allclose(z1[:, :-1], z2[:, :-1]) and not torch.allclose(z1[:, -1], z2[:, -1])


def test_gated_read_logits_vanish_with_a_closed_read_gate(tmp_path):
    ds, head, build = _head(tmp_path, read_logits_gated=True)
    mem = HRRMemory(HRRMemoryConfig(dim=32, read_gate_bias=-60.0), build)
    Model(head, mem, "trace").eval()
    batch = ds.sample("eval", 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        gated = head.forward_classify(batch)
        mem.enabled = False
        without = head.forward_classify(batch)
    assert torch.allclose(gated, without, atol=1e-5)  # closed gate: neither the read nor its vote reaches the logits
    _, head2, build2 = _head(tmp_path / "b")
    mem2 = HRRMemory(HRRMemoryConfig(dim=32, read_gate_bias=-60.0), build2)
    Model(head2, mem2, "trace").eval()
    with torch.no_grad():
        ungated = head2.forward_classify(batch)
        mem2.enabled = False
        assert not torch.allclose(ungated, head2.forward_classify(batch), atol=1e-3)  # the ungated vote remains
