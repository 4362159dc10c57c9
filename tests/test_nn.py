"""Shared building blocks: Gaussian NLL, soft top-k retrieval, the causal transformer."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_core.nn import (
    ByteTokenizer,
    CausalTransformer,
    CausalTransformerConfig,
    gaussian_nll,
    soft_topk,
    soft_topk_weights,
)
from engram_core.testing import tensors


@settings(max_examples=30, deadline=None)
@given(mu=tensors((4, 3), -5, 5), ls=tensors((4, 3), -3, 3), x=tensors((4, 3), -5, 5))
def test_gaussian_nll_matches_torch_distributions(mu, ls, x):
    ref = -torch.distributions.Normal(mu, ls.exp()).log_prob(x).sum(-1).mean()
    assert torch.allclose(gaussian_nll(mu, ls, x), ref, atol=1e-4, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(q=tensors((5, 4), -20, 20), keys=tensors((9, 4), -20, 20), k=st.integers(1, 12), tau=st.floats(1e-2, 10.0))
def test_soft_topk_weights_sum_to_one_and_pick_nearest(q, keys, k, tau):
    idx, w = soft_topk_weights(q, keys, k, tau)
    assert torch.allclose(w.sum(-1), torch.ones(5), atol=1e-5)
    d2 = torch.cdist(q.double(), keys.double()) ** 2
    nearest = d2.min(-1).values
    picked = d2.gather(1, idx[:, :1]).squeeze(1)
    assert torch.allclose(picked, nearest, rtol=1e-3, atol=1e-2)


def test_soft_topk_equals_the_dense_top_k_in_value_and_gradient():
    """Choosing the k nearest without gradient and recomputing their distances gives what a
    differentiable top-k over every pair's distance gives: the same picks, retrieved values
    and gradients for the queries and for a table used as keys and values (the hybrid
    memory's case)."""
    torch.manual_seed(0)
    query = torch.randn(3, 40, 8, dtype=torch.float64, requires_grad=True)
    table = torch.randn(300, 8, dtype=torch.float64, requires_grad=True)
    ref_q, ref_t = query.detach().clone().requires_grad_(True), table.detach().clone().requires_grad_(True)
    out, w = soft_topk(query, table, table, k=5, tau=0.7)
    flat = ref_q.reshape(-1, 8)
    d2 = (flat[:, None, :] - ref_t[None]).pow(2).sum(-1)  # every pair, differentiable
    neg, idx = torch.topk(-d2, 5, dim=-1)
    ref_w = torch.softmax(neg / 0.7, dim=-1)
    ref = (ref_w.unsqueeze(-1) * ref_t[idx]).sum(-2).reshape(3, 40, 8)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(w, ref_w.reshape(3, 40, 5))
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref.backward(grad_out)
    torch.testing.assert_close(query.grad, ref_q.grad)
    torch.testing.assert_close(table.grad, ref_t.grad)


def test_soft_topk_with_one_neighbour_returns_its_value():
    keys = torch.eye(3)
    values = torch.tensor([[1.0], [2.0], [3.0]])
    out, w = soft_topk(torch.tensor([[0.0, 0.9, 0.1]]), keys, values, k=1, tau=1.0)
    assert out.item() == 2.0 and w.item() == 1.0


def tiny():
    torch.manual_seed(0)
    return CausalTransformer(CausalTransformerConfig(dim=32, n_layers=2, n_heads=4, max_len=64))


def test_generation_with_and_without_kv_cache_agree():
    m = tiny()
    ids = torch.randint(0, 256, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, :3] = 0
    prefix = torch.randn(3, 2, 32)
    assert torch.equal(m.generate(ids, 12, use_cache=True), m.generate(ids, 12, use_cache=False))
    assert torch.equal(m.generate(ids, 12, use_cache=True, attention_mask=mask), m.generate(ids, 12, use_cache=False, attention_mask=mask))
    assert torch.equal(m.generate(ids, 12, use_cache=True, prefix_embeds=prefix), m.generate(ids, 12, use_cache=False, prefix_embeds=prefix))


def test_block_hooks_see_every_id_under_kv_cache():
    m = tiny()
    seen = []
    m.block_hooks.append(lambda i, h, ids, pos: (seen.append((ids.shape[1], int(pos[-1]))), h)[1])
    ids = torch.randint(0, 256, (1, 5))
    m.generate(ids, 3, use_cache=True)
    lengths = sorted({n for n, _ in seen})
    assert lengths == [5, 6, 7]  # the hook sees the whole history, not just the new token


def test_causality():
    m = tiny()
    a = torch.randint(0, 256, (1, 10))
    b = a.clone()
    b[0, 7:] = (b[0, 7:] + 1) % 256
    la, _ = m(a)
    lb, _ = m(b)
    assert torch.allclose(la[0, :7], lb[0, :7], atol=1e-6)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert tok.decode(tok.encode("KEY05 = 8 · ü", bos=True, eos=True)) == "KEY05 = 8 · ü"
    ids, mask = tok.batch(["ab", "abcd"], pad_left=True)
    assert ids.shape == (2, 5) and mask[0].tolist() == [0, 0, 1, 1, 1]


def test_plain_causal_attention_takes_the_maskless_path_with_the_same_outputs():
    """No cache, window or padding: SDPA runs with is_causal (its fused kernels may run) and
    gives what the explicit causal mask gives; with a cache the masked path still serves."""
    torch.manual_seed(0)
    cfg = CausalTransformerConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, max_len=64)
    m = CausalTransformer(cfg).eval()
    ids = torch.randint(0, 50, (3, 40))
    with torch.no_grad():
        plain = m(ids)[0]
        masked = m(ids, attention_mask=torch.ones(3, 40, dtype=torch.long))[0]
        _, cache = m(ids[:, :39], use_cache=True)
        last = m(ids[:, 39:], cache=cache, use_cache=True)[0]
    torch.testing.assert_close(plain, masked, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last[:, -1], plain[:, -1], rtol=1e-5, atol=1e-5)
