"""digit_kv: determinism, cache, the target always removed, views, bad budgets."""

import pytest
import torch
from engram_qwen_compressor.data import DIGIT_IDS, DigitKVConfig, DigitKVDataset
from qwen_compressor_helpers import batch, small_data

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
    assert (b["answer"] == torch.tensor(DIGIT_IDS)[b["digit"]]).all()
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
    assert " is the value of KEY" not in r and " is the value of KEY" in d and "set KEY" in d


def test_gold_fields_off():
    ds = small_data(gold_fields=False)
    b = batch(ds, n=5)
    assert "gold_kv_ids" not in b and "gold_digit_ids" not in b
    assert ds.num_examples("train") == 64 and ds.num_examples("eval") == 32


def test_budget_larger_than_prompt_is_a_config_error():
    with pytest.raises(ConfigError, match="larger than the prompt"):
        DigitKVDataset(DigitKVConfig(n_train=4, n_eval=4, budgets=[200]), None)
    ds = small_data()
    with pytest.raises(ConfigError, match="larger than the prompt"):
        batch(ds, budget=155)


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
