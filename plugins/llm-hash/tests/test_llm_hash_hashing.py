"""Invariants of the n-gram addressing (hypothesis)."""

import math

import hypothesis.strategies as st
import pytest
import torch
from engram_llm_hash.hashing import NgramHasher, byte_token_texts, canonical_map, is_prime, slice_sizes
from hypothesis import given, settings

SETTINGS = settings(max_examples=15, deadline=None)
VOCAB = 97


def ids_strategy(max_b=4, max_t=12):
    return st.tuples(st.integers(1, max_b), st.integers(1, max_t), st.integers(0, 2**31 - 1)).map(
        lambda a: torch.randint(0, VOCAB, (a[0], a[1]), generator=torch.Generator().manual_seed(a[2]))
    )


@SETTINGS
@given(ids=ids_strategy(), size=st.sampled_from([1, 7, 100, 5000, 10**6]), seed=st.integers(0, 100))
def test_addresses_deterministic_and_in_range(ids, size, seed):
    h1 = NgramHasher(VOCAB, size, (2, 3), 4, seed=seed)
    h2 = NgramHasher(VOCAB, size, (2, 3), 4, seed=seed)
    a = h1.addresses(ids)
    assert torch.equal(a, h2.addresses(ids))
    assert a.shape == ids.shape + (8,)
    assert int(a.min()) >= 0 and int(a.max()) < h1.total_rows
    # each head stays inside its own slice
    lo = h1.offsets
    hi = h1.offsets + h1.moduli
    assert bool(((a >= lo) & (a < hi)).all())


@SETTINGS
@given(ids=ids_strategy(max_b=5), other=ids_strategy(max_b=3))
def test_addresses_independent_of_batch_composition(ids, other):
    h = NgramHasher(VOCAB, 4099, (2, 3), 8, seed=1)
    t = min(ids.shape[1], other.shape[1])
    ids, other = ids[:, :t], other[:, :t]
    alone = h.addresses(ids)
    mixed = h.addresses(torch.cat([other, ids, other], 0))
    assert torch.equal(mixed[other.shape[0] : other.shape[0] + ids.shape[0]], alone)


@SETTINGS
@given(ids=ids_strategy(max_b=2, max_t=16), cut=st.integers(0, 15))
def test_address_depends_only_on_the_suffix_ngram(ids, cut):
    """Position t's rows for order n are a function of ids[t-n+1..t] (and the sequence
    start): dropping earlier ids changes nothing once t - cut >= max order - 1."""
    h = NgramHasher(VOCAB, 4099, (2, 3), 4, seed=2)
    full = h.addresses(ids)
    cut = min(cut, ids.shape[1] - 1)
    tail = h.addresses(ids[:, cut:])
    n_max = 3
    safe = range(cut + n_max - 1, ids.shape[1])
    for t in safe:
        assert torch.equal(full[:, t], tail[:, t - cut])


def test_slices_are_distinct_primes_and_size_one_control():
    sizes = slice_sizes(65536, 16)
    assert all(is_prime(p) for p in sizes) and len(set(sizes)) == 16
    assert 0.97 * 65536 < sum(sizes) <= 65536
    small = slice_sizes(40, 16)  # too few primes below 2: topped up above
    assert len(set(small)) == 16 and all(is_prime(p) for p in small)
    h = NgramHasher(VOCAB, 1, (2, 3), 8)
    assert h.total_rows == 1
    assert int(h.addresses(torch.randint(0, VOCAB, (2, 9))).max()) == 0


@pytest.mark.parametrize("p", [1009, 10007])
def test_collision_rate_matches_birthday_bound(p):
    """Distinct random 3-grams into p slots: the fraction sharing a slot with another is
    1 - (1 - 1/p)^(m-1) (the birthday bound) within sampling error."""
    from engram_llm_hash.telemetry import collision_stats

    g = torch.Generator().manual_seed(0)
    m = p // 2
    h = NgramHasher(50000, p * 8, (3,), 8, seed=3)
    ids = torch.randint(0, 50000, (1, 3 * m), generator=g)
    mixes = h.mixes(ids)[0, 2:]  # drop positions that see the sentinel
    observed, expected = collision_stats(mixes, h)
    assert math.isclose(expected, 1 - (1 - 1 / h.moduli.float().mean().item()) ** (mixes.unique().numel() - 1), rel_tol=0.05)
    # 8 heads * m n-grams: the standard error of the mean fraction is about 0.01
    assert abs(observed - expected) < 0.04, (observed, expected)


def test_canonical_map_merges_case_and_whitespace():
    texts = ["A", "a", " a", "b", None, "É", "e"]
    m = canonical_map(texts)
    assert m[0] == m[1] == m[2]
    assert m[3] != m[0]
    assert m[5] == m[6]  # accents stripped
    assert m[4] not in (m[0], m[3], m[5])
    byte_map = canonical_map(byte_token_texts())
    assert byte_map[ord("Q")] == byte_map[ord("q")] and byte_map[256] != byte_map[257]
    h = NgramHasher(259, 4099, (2, 3), 4, canonical=byte_map)
    a = torch.tensor([list(b"KEY:ab")])
    b = torch.tensor([list(b"key:AB")])
    assert torch.equal(h.addresses(a), h.addresses(b))


def test_bad_ids_give_one_clear_error_on_cpu():
    """Checked where it is free (CPU tensors); on a GPU the check would be a host sync."""
    h = NgramHasher(10, 101, (2, 3), 2)
    for bad in (torch.tensor([[1, 10]]), torch.tensor([[-1, 3]])):
        with pytest.raises(ValueError, match=r"token ids must be in \[0, 10\)"):
            h.addresses(bad)
