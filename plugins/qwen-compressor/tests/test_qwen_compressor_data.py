"""digit_kv: determinism, cache, targets uniform over the removed statements, views, bad budgets, the HF tokenizer."""

import pytest
import torch
from engram_qwen_compressor.data import DigitKVConfig, DigitKVDataset
from qwen_compressor_helpers import batch, save_tiny_tokenizer, small_data

from engram_core.components import BuildContext
from engram_core.config import ConfigError, structure
from engram_core.nn import ByteTokenizer

TOK = ByteTokenizer()


def text(ids, mask=None):
    ids = ids.tolist() if mask is None else [i for i, m in zip(ids.tolist(), mask.tolist()) if m]
    return TOK.decode([i for i in ids if i < 256])


def test_same_seed_same_data_and_cache_round_trip(tmp_path):
    cfg = DigitKVConfig(n_train=16, n_eval=8, budgets=[64])
    a = DigitKVDataset(cfg, BuildContext(cache_dir=tmp_path))
    assert list((tmp_path / "qwen-compressor").glob("digit_kv-*.pt"))
    b = DigitKVDataset(cfg, BuildContext(cache_dir=tmp_path))  # from the cache
    c = DigitKVDataset(cfg, None)  # regenerated
    for split in ("train", "eval"):
        assert a.episodes(split, range(8)) == b.episodes(split, range(8)) == c.episodes(split, range(8))
    d = DigitKVDataset(DigitKVConfig(n_train=16, n_eval=8, budgets=[64], seed=1), None)
    assert d.episodes("train", range(8)) != a.episodes("train", range(8))


@pytest.mark.parametrize("budget", [64, 96, 128])
def test_target_is_removed_and_views_are_consistent(budget):
    ds = small_data(budgets=[64, 96, 128])
    b = batch(ds, n=16, budget=budget)
    for i in range(16):
        removed = text(b["removed_ids"][i], b["removed_mask"][i])
        kept = text(b["kept_ids"][i], b["kept_mask"][i])
        gold = text(b["gold_kv_ids"][i], b["gold_kv_mask"][i])
        key = f"KEY{int(b['key'][i]):02d}"
        assert gold in removed and key not in kept.split("Q:")[0]
        assert gold.startswith(key) and gold.strip().endswith(str(int(b["digit"][i])))
        assert kept.endswith(f"Q: {key} = ")
        assert len(kept.split("Q:")[0]) == budget  # exactly the budget of context tokens
        summary = text(b["summary_ids"][i], b["summary_mask"][i])
        assert gold in summary and len(summary.split("Q:")[0]) == budget
        full = text(b["full_ids"][i], b["full_mask"][i])
        assert full == removed + kept
        # logits at answer_pos predict the answer: it is the last real token of each view
        for view in ("full", "kept", "summary"):
            pos = int(b[f"{view}_answer_pos"][i])
            assert b[f"{view}_mask"][i, pos] == 1 and (pos + 1 == b[f"{view}_mask"].shape[1] or b[f"{view}_mask"][i, pos + 1] == 0)
    assert (b["answer"] == torch.tensor(ds.answer_ids)[b["digit"]]).all()
    assert (b["gold_digit_ids"][:, 0] == b["answer"]).all()


def test_summary_moves_the_gold_statement():
    ds = small_data()
    b = batch(ds, n=32)
    starts = {text(b["summary_ids"][i], b["summary_mask"][i]).index(text(b["gold_kv_ids"][i], b["gold_kv_mask"][i])) for i in range(32)}
    assert len(starts) > 3  # not always at the front: no positional shortcut


def test_template_diversity_mixes_templates():
    rigid = small_data()
    diverse = small_data(template_diversity=8)
    r = text(batch(rigid, 8)["full_ids"][0])
    d = " ".join(text(batch(diverse, 8)["full_ids"][i]) for i in range(8))
    assert " is the value of KEY" not in r and " is the value of KEY" in d and "set K" in d


def test_gold_fields_off():
    ds = small_data(gold_fields=False)
    b = batch(ds, n=5)
    assert "gold_kv_ids" not in b and "gold_digit_ids" not in b
    assert ds.num_examples("train") == 64 and ds.num_examples("eval") == 32


def test_budget_larger_than_prompt_is_a_config_error():
    with pytest.raises(ConfigError, match="the largest budget is 150"):
        DigitKVDataset(DigitKVConfig(n_train=4, n_eval=4, budgets=[151]), None)
    with pytest.raises(ConfigError, match="^budget: budget 155"):
        DigitKVDataset.dry_spec(DigitKVConfig(budget=155))
    assert DigitKVDataset.dry_spec(DigitKVConfig(budgets=[64, 150])).max_budget == 150
    # more templates: shorter shortest statements, so a lower limit, said before anything is generated
    spec = DigitKVDataset.dry_spec(DigitKVConfig(template_diversity=8, budgets=[64]))
    assert spec.max_budget < 150
    with pytest.raises(ConfigError, match="no whole statement"):
        batch(small_data(), budget=159)


@pytest.mark.parametrize("budget", [64, 96, 128])
def test_targets_are_uniform_over_the_removed_statements(budget):
    ds = small_data(budgets=[64, 96, 128], n_train=400)
    b = batch(ds, n=400, budget=budget)
    n_removed = int(b["n_removed"][0])
    assert (b["n_removed"] == n_removed).all() and n_removed == (160 - budget) // 10  # rigid: 10 tokens a statement
    counts = torch.bincount(b["target_pos"], minlength=16)
    assert counts[n_removed:].sum() == 0  # never a kept statement
    assert (counts[:n_removed] > 400 / n_removed * 0.5).all()  # every removed statement is a target, about equally
    # the value positions point at the digits of the removed statements, in order
    for i in range(4):
        pos = b["removed_value_pos"][i][b["removed_value_mask"][i].bool()]
        assert len(pos) == n_removed
        t = int(b["target_pos"][i])
        assert int(b["removed_ids"][i, pos[t]]) == int(b["answer"][i])


def test_smaller_budget_means_more_to_remember_and_prompt_range_keeps_some_targets():
    ds = small_data(budgets=[64, 96, 128])
    assert [int(batch(ds, 4, budget=bb)["n_removed"][0]) for bb in (64, 96, 128)] == [9, 6, 3]
    wide = small_data(budgets=[64], target_range="prompt", n_train=200)
    b = batch(wide, n=200, budget=64)
    kept_targets = b["target_pos"] >= b["n_removed"]
    assert 0.2 < float(kept_targets.float().mean()) < 0.6  # 7 of 16 statements are (at least partly) kept
    with pytest.raises(ConfigError, match="target_range"):
        structure({"target_range": "tail"}, DigitKVConfig)


def test_hf_tokenizer_gives_its_own_ids_and_budgets_count_its_tokens(tmp_path):
    tok = save_tiny_tokenizer(tmp_path / "tok")
    ds = DigitKVDataset(DigitKVConfig(n_train=16, n_eval=8, n_turns=32, budgets=[64, 96, 128], tokenizer=str(tmp_path / "tok")),
                        BuildContext(cache_dir=tmp_path / "cache"))
    assert ds.spec.vocab_size == len(tok) and ds.spec.tokenizer == str(tmp_path / "tok")
    b = batch(ds, n=4, budget=64)
    assert b["kept_ids"].max() < len(tok) and (b["kept_mask"].sum(1) == 1 + 64 + b["question_mask"].sum(1)).all()
    kept = tok.decode(b["kept_ids"][0][1:int(b["kept_answer_pos"][0]) + 1])
    assert kept.rstrip().endswith(f"Q: KEY{int(b['key'][0]):02d} =")
    assert [tok.decode([i]) for i in ds.answer_ids] == [str(d) for d in range(10)]
    with pytest.raises(ConfigError, match="tokenizer"):
        DigitKVDataset.dry_spec(DigitKVConfig(tokenizer=str(tmp_path / "missing")))


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError) as e:
        structure({"n_turns": 0}, DigitKVConfig)
    assert "n_turns" in str(e.value)
    with pytest.raises(ConfigError, match="n_keys"):
        DigitKVConfig(n_turns=20, n_keys=10)
    with pytest.raises(ConfigError, match="budgets"):
        DigitKVConfig(budgets=[])
    with pytest.raises(ConfigError, match="split"):
        small_data().sample("test", 2, torch.Generator())


def test_a_val_split_leaves_train_and_eval_as_they_were(tmp_path):
    base = DigitKVDataset(DigitKVConfig(n_train=16, n_eval=8, budgets=[64]), BuildContext(cache_dir=tmp_path / "a"))
    with_val = DigitKVDataset(DigitKVConfig(n_train=16, n_eval=8, n_val=8, budgets=[64]), BuildContext(cache_dir=tmp_path / "b"))
    assert base.splits == ("train", "eval") and with_val.splits == ("train", "val", "eval")
    for split in ("train", "eval"):
        assert base.episodes(split, range(8)) == with_val.episodes(split, range(8))
    assert with_val.num_examples("val") == 8
    assert with_val.episodes("val", range(8)) != with_val.episodes("eval", range(8))
    with pytest.raises(ConfigError, match="got 'val'"):
        base.episodes("val", [0])
