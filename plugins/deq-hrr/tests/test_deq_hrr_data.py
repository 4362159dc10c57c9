"""Needle and ListOps-lite: determinism, layout, caching, bad input."""

import pytest
import torch
from engram_deq_hrr.data import (
    QUERY,
    ListOpsLiteConfig,
    ListOpsLiteDataset,
    ListOpsRecallConfig,
    ListOpsRecallDataset,
    NeedleConfig,
    NeedleDataset,
    generate_listops,
    generate_needle,
)

from engram_core.components import BuildContext
from engram_core.config import ConfigError, structure


def test_needle_layout_and_labels():
    cfg = NeedleConfig(seq_len=40, n_pairs=3, n_keys=8, n_values=5, n_fillers=4)
    d = generate_needle(cfg, 64, 0)
    key0 = 2 + cfg.n_fillers
    val0 = key0 + cfg.n_keys
    toks = d["tokens"]
    assert toks.shape == (64, 40)
    for i in range(64):
        row = toks[i]
        is_key = (row[:-1] >= key0) & (row[:-1] < val0)
        assert int(is_key.sum()) == 3  # exactly n_pairs keys before the query
        kpos = is_key.nonzero().flatten()
        assert (row[kpos + 1] >= val0).all()  # each key is followed by its value
        assert len(set(row[kpos].tolist())) == 3  # distinct keys
        q = row[-1]
        hit = kpos[row[kpos] == q]
        assert len(hit) == 1
        assert int(row[hit + 1]) - val0 == int(d["label"][i])
        assert int(d["needle_pos"][i]) == int(hit + 1)


def test_needle_is_deterministic_and_cached(tmp_path):
    cfg = NeedleConfig(seq_len=32, n_train=20, n_eval=10)
    a = NeedleDataset(cfg, BuildContext(cache_dir=tmp_path))
    assert list((tmp_path / "deq-hrr").glob("needle-*.pt"))
    b = NeedleDataset(cfg, BuildContext(cache_dir=tmp_path / "other"))
    assert torch.equal(a._splits["train"]["tokens"], b._splits["train"]["tokens"])
    c = NeedleDataset(NeedleConfig(seq_len=32, n_train=20, n_eval=10, seed=1), BuildContext(cache_dir=tmp_path))
    assert not torch.equal(a._splits["train"]["tokens"], c._splits["train"]["tokens"])
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(a.sample("train", 4, g1)["tokens"], a.sample("train", 4, g2)["tokens"])
    assert sum(len(x["label"]) for x in a.eval_batches("eval", 3)) == 10
    assert a.spec.n_classes == 16 and a.spec.vocab_size == 2 + 32 + 64 + 16


def test_needle_shorter_than_layout_is_a_config_error():
    with pytest.raises(ConfigError, match="shorter than the needle layout"):
        structure({"seq_len": 8, "n_pairs": 4}, NeedleConfig)
    with pytest.raises(ConfigError, match="distinct keys"):
        structure({"n_pairs": 5, "n_keys": 4}, NeedleConfig)


def test_listops_values_are_correct():
    cfg = ListOpsLiteConfig(seq_len=64, max_depth=2, max_args=3)
    d = generate_listops(cfg, 50, 0)
    names = {12: max, 13: min}
    for i in range(50):
        toks = d["tokens"][i, : d["lengths"][i]].tolist()
        assert toks[-1] == QUERY

        assert _evaluate(toks, 0, names)[0] == int(d["label"][i])
    assert d["mask"].sum(1).tolist() == d["lengths"].tolist()


def test_listops_dataset_and_errors(tmp_path):
    ds = ListOpsLiteDataset(ListOpsLiteConfig(n_train=10, n_eval=5), BuildContext(cache_dir=tmp_path))
    assert ds.spec.n_classes == 10
    with pytest.raises(ConfigError, match="shorter than the longest expression"):
        structure({"seq_len": 16, "max_depth": 3, "max_args": 4}, ListOpsLiteConfig)
    with pytest.raises(ConfigError, match="unknown split"):
        ds.sample("test", 2, torch.Generator())
    with_val = ListOpsRecallDataset(ListOpsRecallConfig(seq_len=40, n_train=10, n_eval=5, n_val=4), BuildContext(cache_dir=tmp_path))
    assert with_val.splits == ("train", "eval", "val") and with_val.sample("val", 2, torch.Generator())["tokens"].shape == (2, 40)


def _evaluate(toks, pos, names):
    """Reference evaluator of a prefix expression (independent of the generator)."""
    t = toks[pos]
    if 2 <= t <= 11:
        return t - 2, pos + 1
    args, pos = [], pos + 1
    while toks[pos] != 16:
        v, pos = _evaluate(toks, pos, names)
        args.append(v)
    if t in names:
        val = names[t](args)
    elif t == 14:
        val = sorted(args)[len(args) // 2]
    else:
        val = sum(args) % 10
    return val, pos + 1


def test_needle_length_splits():
    from engram_deq_hrr.data import NeedleDataset as ND

    ds = ND(NeedleConfig(seq_len=32, n_pairs=2, n_train=8, n_eval=4, train_lengths=(16,), eval_lengths=(16, 64)))
    assert set(ds.splits) == {"train", "eval", "train@16", "eval@16", "eval@64"}
    assert ds._splits["eval@64"]["tokens"].shape == (4, 64) and ds._splits["train@16"]["tokens"].shape == (8, 16)
    assert not torch.equal(ds._splits["eval@16"]["tokens"], ds._splits["train@16"]["tokens"][:4])
    with pytest.raises(ConfigError, match="eval_lengths"):
        structure({"n_pairs": 4, "eval_lengths": [6]}, NeedleConfig)


def test_needle_validation_splits_leave_train_and_eval_unchanged():
    from engram_deq_hrr.data import NeedleDataset as ND

    cfg = dict(seq_len=32, n_pairs=2, n_train=8, n_eval=4, train_lengths=(16,), eval_lengths=(16,))
    plain, with_val = ND(NeedleConfig(**cfg)), ND(NeedleConfig(**cfg, n_val=6))
    assert set(with_val.splits) == set(plain.splits) | {"val", "val@16"}
    for name in plain.splits:  # a validation split is a stream of its own
        assert torch.equal(plain._splits[name]["tokens"], with_val._splits[name]["tokens"])
    assert with_val._splits["val@16"]["tokens"].shape == (6, 16) and with_val._splits["val"]["tokens"].shape == (6, 32)
    rows = {tuple(r) for name in ("train@16", "eval@16") for r in with_val._splits[name]["tokens"].tolist()}
    assert not any(tuple(r) in rows for r in with_val._splits["val@16"]["tokens"].tolist())


def test_listops_recall_layout_and_labels():
    from engram_deq_hrr.data import LISTOPS_VOCAB as VAR0
    from engram_deq_hrr.data import ListOpsRecallConfig, generate_listops_recall

    cfg = ListOpsRecallConfig(seq_len=40, n_vars=8, n_defs=3, n_operands=2, n_fillers=4)
    d = generate_listops_recall(cfg, 64, 0)
    ops = {12: max, 13: min, 14: lambda a: sorted(a)[len(a) // 2], 15: lambda a: sum(a) % 10}
    for i in range(64):
        row = d["tokens"][i].tolist()
        body, expr = row[:-4], row[-4:]
        is_var = [VAR0 <= t < VAR0 + cfg.n_vars for t in body]
        defs = {body[p]: body[p + 1] - 2 for p, v in enumerate(is_var) if v}
        assert len(defs) == 3 and all(0 <= x <= 9 for x in defs.values())  # distinct variables, digit values
        op, digits, var = expr[0], [t - 2 for t in expr[1:3]], expr[3]
        assert var in defs and int(d["read_target"][i]) == defs[var]
        assert row[int(d["needle_pos"][i]) - 1] == var
        assert ops[op](digits + [defs[var]]) == int(d["label"][i])
    with pytest.raises(ConfigError, match="shorter than the layout"):
        structure({"seq_len": 8, "n_defs": 4}, ListOpsRecallConfig)


def test_a_val_split_leaves_train_and_eval_as_they_were(tmp_path):
    base = NeedleDataset(NeedleConfig(seq_len=32, n_train=20, n_eval=10), BuildContext(cache_dir=tmp_path / "a"))
    with_val = NeedleDataset(NeedleConfig(seq_len=32, n_train=20, n_eval=10, n_val=10), BuildContext(cache_dir=tmp_path / "b"))
    assert "val" not in base.splits and "val" in with_val.splits
    for split in ("train", "eval"):
        for k, v in base._split(split).items():
            assert torch.equal(v, with_val._split(split)[k]), (split, k)
    assert not torch.equal(with_val._split("val")["tokens"], with_val._split("eval")["tokens"])
