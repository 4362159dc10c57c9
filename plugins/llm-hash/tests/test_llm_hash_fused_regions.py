"""`fuse`: the block's elementwise work (conv path, context gate, residual) as torch.compile'd
regions, on by default on CUDA only, for tensors of 2^20 numbers and more. Compiled here on the CPU (`fuse = "compile"`), the block
gives the eager block's outputs and gradients, with and without padding; 'auto' compiles
nothing on the CPU, so the CPU numbers stay the eager ones bit for bit."""

import copy

import attrs
import pytest
import torch
from llm_hash_helpers import DIM, VOCAB, memory, perturb


def _pair(**kw):
    eager = memory(fuse="off", conv_kernel=3, orders=[1, 2], **kw)
    perturb(eager, scale=0.3, seed=1)  # the conv starts at zero: give it (and the gate) work to do
    fused = copy.deepcopy(eager)
    fused.blocks["0"].cfg = attrs.evolve(fused.blocks["0"].cfg, fuse="compile")
    return eager, fused


def _run(mem, hidden, ids, mask):
    h = hidden.clone().requires_grad_(True)
    out = mem(h, ids, attention_mask=mask)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in mem.named_parameters() if p.grad is not None}
    return out.detach(), h.grad, grads


@pytest.mark.parametrize("padded", [False, True])
def test_compiled_regions_equal_the_eager_block(padded):
    eager, fused = _pair()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (3, 12), generator=g)
    hidden = torch.randn(3, 5, DIM, generator=g)  # the last 5 positions of 12 (a window of the history)
    mask = None
    if padded:
        mask = torch.ones(3, 12, dtype=torch.long)
        mask[1, :4] = 0  # left padding in one row
    assert fused.blocks["0"].fused(torch.device("cpu"), 1) and not eager.blocks["0"].fused(torch.device("cpu"), 1)
    out_e, dh_e, grads_e = _run(eager, hidden, ids, mask)
    out_f, dh_f, grads_f = _run(fused, hidden, ids, mask)
    torch.testing.assert_close(out_f, out_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dh_f, dh_e, rtol=1e-4, atol=1e-5)
    assert grads_f.keys() == grads_e.keys() and {"blocks.0.conv.weight", "blocks.0.norm_h.weight", "blocks.0.gate_bias"} <= grads_e.keys()
    for name in grads_e:
        torch.testing.assert_close(grads_f[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)


def test_auto_compiles_only_on_cuda_and_only_large_tensors():
    from engram_llm_hash.blocks import FUSE_MIN_ELEMENTS

    block = memory().blocks["0"]
    assert block.cfg.fuse == "auto"
    big, small = FUSE_MIN_ELEMENTS, FUSE_MIN_ELEMENTS - 1
    assert not block.fused(torch.device("cpu"), big)  # the CPU keeps the eager operations (published rows)
    assert block.fused(torch.device("cuda"), big)
    assert not block.fused(torch.device("cuda"), small)  # a small model, a decode step: no compilation to pay for
    block.cfg = attrs.evolve(block.cfg, fuse="off")
    assert not block.fused(torch.device("cuda"), big)
