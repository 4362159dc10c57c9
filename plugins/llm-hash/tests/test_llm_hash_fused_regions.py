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


@pytest.mark.parametrize("kernel,dilation", [(4, 3), (3, 1), (1, 2)])
def test_conv_taps_equal_the_convolution(kernel, dilation):
    """`conv_impl`: the shifted taps (what compiled code runs under 'auto') give the
    convolution's values and gradients, with a padding mask, for any kernel and dilation."""
    from engram_llm_hash.blocks import conv_mix

    g = torch.Generator().manual_seed(kernel * 10 + dilation)
    v = torch.randn(2, 9, 6, generator=g)
    norm_weight = 1 + 0.1 * torch.randn(6, generator=g)
    conv_weight = torch.randn(6, 1, kernel, generator=g)
    valid = torch.ones(2, 9)
    valid[1, :3] = 0
    receptive = (kernel - 1) * dilation
    results = []
    for impl in ("conv1d", "taps"):
        leaves = [t.clone().requires_grad_(True) for t in (v, norm_weight, conv_weight)]
        out = conv_mix(leaves[0], leaves[1], 1e-6, leaves[2], valid, receptive, dilation, impl)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), [t.grad for t in leaves]))
    (out_c, grads_c), (out_t, grads_t) = results
    torch.testing.assert_close(out_t, out_c, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads_t, grads_c):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_conv_taps_in_bf16_are_as_close_to_fp32_as_the_convolution():
    """In bf16 the taps are summed in fp32 and rounded once, as the convolution accumulates:
    their distance from the fp32 result is the convolution's, not K roundings more."""
    from engram_llm_hash.blocks import conv_mix

    g = torch.Generator().manual_seed(7)
    v = torch.randn(2, 64, 32, generator=g)
    norm_weight = 1 + 0.1 * torch.randn(32, generator=g)
    conv_weight = torch.randn(32, 1, 4, generator=g)
    args = (1e-6, conv_weight, None, 9, 3)
    reference = conv_mix(v, norm_weight, *args, "conv1d")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        errors = {impl: (conv_mix(v.bfloat16(), norm_weight, *args, impl).float() - reference).norm() / reference.norm()
                  for impl in ("conv1d", "taps")}
    assert errors["taps"] <= 1.05 * errors["conv1d"], errors  # summed in bf16 per tap: 1.11×
