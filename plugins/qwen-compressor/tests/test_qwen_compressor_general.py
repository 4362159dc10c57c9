"""qwen-compressor with a general pretrained LM as the reader (issue 31): `engram:NAME` for the
data's tokenizer and the HF reader, the prefix as `inputs_embeds` of a transformers causal LM,
the existing memories through it, a check that never pretrains, and the general recipes.

A tiny size of engram_core.lm's model (a few standard-library files, a 300-id BPE, a 16-wide
Llama, 6 steps) stands in for stdlib-lm-cpu, as in tests/test_general_lm.py: seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from engram_qwen_compressor.data import DigitKVConfig, DigitKVDataset  # noqa: E402
from engram_qwen_compressor.memories import Gather, GatherConfig, MemEncoder, MemEncoderConfig  # noqa: E402
from engram_qwen_compressor.metrics import DigitAccuracy, DigitAccuracyConfig  # noqa: E402
from engram_qwen_compressor.objectives import answer_ce  # noqa: E402
from engram_qwen_compressor.reader import MODES, CompressorReader, ReaderConfig  # noqa: E402

from engram_core.components import BuildContext, Model  # noqa: E402
from engram_core.errors import ConfigError  # noqa: E402
from engram_core.lm import pretrain as pretrain_module  # noqa: E402
from engram_core.lm.corpus import CorpusConfig  # noqa: E402
from engram_core.lm.pretrain import PretrainConfig  # noqa: E402
from engram_core.lm.tokens import TokensConfig  # noqa: E402
from engram_core.testing.cli import run_cli  # noqa: E402

TINY = PretrainConfig(tokens=TokensConfig(vocab_size=300, corpus=CorpusConfig(max_files=6)), hidden=16, layers=1, heads=2,
                      kv_heads=1, intermediate=32, context=32, steps=6, batch_size=4, warmup_steps=2, eval_every=3, eval_windows=4)
NAME = "engram:stdlib-lm-tiny"
RECIPES = Path(__file__).resolve().parents[3] / "recipes"


@pytest.fixture
def tiny_size(monkeypatch):
    monkeypatch.setitem(pretrain_module.SIZES, "stdlib-lm-tiny", TINY)
    return NAME


def tiny_data(cache, **kw):
    cfg = DigitKVConfig(**{"tokenizer": NAME, "n_turns": 6, "n_train": 32, "n_eval": 16, "n_val": 8, "budget": 16,
                           "budgets": [16], "template_diversity": 2, **kw})
    return DigitKVDataset(cfg, BuildContext(cache_dir=cache))


def tiny_reader(ds, cache, dry_run=False, **kw):
    build = BuildContext(spec=ds.spec, dataset=ds, cache_dir=cache, dry_run=dry_run)
    head = CompressorReader(ReaderConfig(backend="hf", hf_path=NAME, **kw), build)
    build.head = head
    return head, build


def test_digit_kv_reads_the_general_lms_tokenizer(tmp_path, tiny_size):
    """`data.tokenizer = "engram:NAME"` is the LM's own BPE: BOS/PAD are its <s>/<pad>, every
    digit one token, budgets count its tokens; only the BPE is made for it, not the model."""
    ds = tiny_data(tmp_path)
    from transformers import AutoTokenizer

    from engram_core.lm import cached_model, tokenizer_folder

    tok = AutoTokenizer.from_pretrained(str(tokenizer_folder(NAME, tmp_path)))
    assert ds.spec.tokenizer == NAME and ds.spec.vocab_size == len(tok) == 300
    assert (ds.spec.bos_id, ds.spec.pad_id) == (tok.bos_token_id, tok.pad_token_id)
    assert [tok.decode([i]) for i in ds.spec.answer_token_ids] == [str(d) for d in range(10)]
    b = ds.sample("val", 4, torch.Generator().manual_seed(0))
    kept = b["kept_ids"][0, 1:b["kept_answer_pos"][0] + 1].tolist()
    q_len = int(b["question_mask"][0].sum())
    assert len(kept) - q_len == 16  # the budget is 16 of the LM's tokens
    assert cached_model(NAME, tmp_path) is None  # the tokenizer did not pretrain the model


def test_hf_reader_takes_the_prefix_as_inputs_embeds_of_the_general_lm(tmp_path, tiny_size):
    """The memory's K vectors enter the frozen LM as `inputs_embeds` right after BOS, then the
    kept tail and the question; the answer logits are the LM's own at the answer position."""
    ds = tiny_data(tmp_path)
    head, build = tiny_reader(ds, tmp_path)
    assert head.width == 16 and head.lm.config.model_type == "llama"
    mem = MemEncoder(MemEncoderConfig(n_slots=3, dim=16, n_heads=2, n_cross_layers=1), build)
    model = Model(head, mem, "context")
    b = ds.sample("train", 3, torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = head.answer_logits(b, "latent")
        prefix = mem(b["removed_ids"], b["removed_mask"])
        emb = head.lm.get_input_embeddings()(b["kept_ids"])
        seq = torch.cat([emb[:, :1], prefix, emb[:, 1:]], 1)
        mask = torch.cat([b["kept_mask"][:, :1], torch.ones(3, 3, dtype=torch.long), b["kept_mask"][:, 1:]], 1)
        direct = head.lm(inputs_embeds=seq, attention_mask=mask).logits
    rows = torch.arange(3)
    torch.testing.assert_close(logits, direct[rows, b["kept_answer_pos"] + 3])
    for mode in [m for m in MODES if m not in ("oracle_digit", "oracle_kv")] + ["oracle_kv"]:
        assert head.answer_logits(b, mode).shape == (3, ds.spec.vocab_size)
    # the answer CE reaches the memory through the frozen LM
    ce, _, _ = answer_ce(head, b, "latent", digits_only=False)
    ce.backward()
    assert model.memory.proj.weight.grad.abs().sum() > 0


def test_gather_and_oracle_slots_are_the_lms_input_embeddings(tmp_path, tiny_size):
    """With the general reader there is no token shift: oracle_slots is the LM's embedding of
    each removed value digit, and gather the LM's embeddings at offset + stride·j."""
    ds = tiny_data(tmp_path)
    head, build = tiny_reader(ds, tmp_path)
    b = ds.sample("train", 2, torch.Generator().manual_seed(2))
    table = head.lm.get_input_embeddings().weight
    prefix, mask = head.prefix_for(b, "oracle_slots")
    digits = b["removed_ids"].gather(1, b["removed_value_pos"])
    torch.testing.assert_close(prefix, table[digits])
    gather = Gather(GatherConfig(n_slots=2, offset=1, stride=3), build)
    torch.testing.assert_close(gather(b["removed_ids"], b["removed_mask"]), table[b["removed_ids"][:, [1, 4]]])


def test_a_check_builds_the_shape_and_never_pretrains(tmp_path, tiny_size):
    """`engram validate` builds the head on the meta device: a model of the LM's shape, and no
    pretraining when it is not cached; when it is, its config (its weights are not read)."""
    ds = tiny_data(tmp_path)
    with torch.device("meta"):
        head, _ = tiny_reader(ds, tmp_path, dry_run=True)
    assert head.width == 16
    assert not list((tmp_path / "lm").glob("general_lm-*"))
    tiny_reader(ds, tmp_path)  # a run pretrains it
    with torch.device("meta"):
        head, _ = tiny_reader(ds, tmp_path, dry_run=True)
    assert head.width == 16 and head.lm.get_input_embeddings().weight.is_meta


def test_random_init_is_the_same_architecture_without_pretraining(tmp_path, tiny_size):
    """`hf_init = "random"`: the control for what pretraining gives a reader. The architecture is
    the LM's, its weights a fresh initialisation, and nothing is pretrained for it."""
    ds = tiny_data(tmp_path)
    fresh, _ = tiny_reader(ds, tmp_path, hf_init="random")
    assert not list((tmp_path / "lm").glob("general_lm-*"))
    pretrained, _ = tiny_reader(ds, tmp_path)
    a, b = fresh.lm.state_dict(), pretrained.lm.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"])


def test_engram_names_are_checked_in_one_line(tmp_path, tiny_size):
    with pytest.raises(ConfigError, match="hf_path.*no engram model 'engram:nope'.*engram:stdlib-lm-cpu"):
        ReaderConfig(backend="hf", hf_path="engram:nope")
    ds = tiny_data(tmp_path)
    with pytest.raises(ConfigError, match="hf_path: the reader is engram:stdlib-lm-cpu but the data are tokenized by "
                                          "engram:stdlib-lm-tiny"):
        CompressorReader(ReaderConfig(backend="hf", hf_path="engram:stdlib-lm-cpu"),
                         BuildContext(spec=ds.spec, dataset=ds, cache_dir=tmp_path, dry_run=True))


def test_mean_over_budgets_pools_every_budget(tmp_path, tiny_size):
    ds = tiny_data(tmp_path, budgets=[8, 16])
    head, build = tiny_reader(ds, tmp_path)
    model = Model(head, None, None)
    metric = DigitAccuracy(DigitAccuracyConfig(modes=["discard", "full"], breakdown=[], greedy=True,
                                               mean_over_budgets=True, max_examples=16), build)
    with torch.no_grad():
        for batch in metric.batches(ds, "eval", 8):
            metric.update(model, batch)
    out = metric.compute()
    for kind in ("acc", "greedy"):
        for mode in ("discard", "full"):
            assert out[f"{kind}/{mode}_mean"] == pytest.approx((out[f"{kind}/{mode}_b8"] + out[f"{kind}/{mode}_b16"]) / 2)


def _tiny_model_dir(tmp_path, monkeypatch) -> Path:
    """The tiny general LM's cached folder: a local HF directory the recipes can name in a subprocess."""
    monkeypatch.setitem(pretrain_module.SIZES, "stdlib-lm-tiny", TINY)
    from engram_core.lm import resolve_model

    return resolve_model(NAME, tmp_path / "lmcache", "cpu")


GENERAL_SHRINK = ["data.n_turns=6", "data.n_train=48", "data.n_eval=8", "data.n_val=8", "data.budget=16",
                  "data.budgets=[8, 16]", "memory.n_slots=4", "metrics.0.max_examples=8", "metrics.1.max_examples=8",
                  "metrics.1.budget=16"]


@pytest.mark.parametrize("name", ["general_compressor_sweep", "general_compressor_gather", "general_compressor_tuned",
                                  "general_compressor_lora", "general_compressor_contrastive",
                                  "general_compressor_token_select"])
def test_general_recipes_run_choose_on_val_and_report_test(name, tmp_path, monkeypatch):
    folder = _tiny_model_dir(tmp_path, monkeypatch)
    extra = [f"head.hf_path={folder}", f"data.tokenizer={folder}"] + GENERAL_SHRINK
    train = {"general_compressor_gather": None, "general_compressor_tuned": 1}.get(name, 0)
    if train is not None:
        extra += [f"stages.{train}.objective.budgets=[8, 16]", f"stages.{train}.batch_size=4", f"stages.{train}.eval_every=0",
                  f'sweep."stages.{train}.steps"=[1, 2]', f'sweep."stages.{train}.lr"=[1e-3]', 'select.then={ "run.seed" = [0, 1] }']
    if name == "general_compressor_tuned":
        extra.append('stages.0.options={steps = 2, lr = 1e-3, batch_size = 4, modes = ["summary"], budgets = [8, 16]}')
    r = run_cli(RECIPES / f"{name}.toml", *extra, "--out", tmp_path / "runs", "--quiet", plugins="qwen-compressor",
                env={"ENGRAM_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("summary.json")]
    assert summaries and all(s["status"] == "completed" for s in summaries)
    final = summaries[0]["final"]
    assert {f"{k}/{m}_b{b}" for k in ("acc", "greedy") for m in ("discard", "summary", "full", "latent", "oracle_slots")
            for b in (8, 16)} <= set(final)
    if train is not None:  # two grid points chosen between on val, then the winner again with seed 1
        assert len(summaries) == 3
        selection = json.loads(next((tmp_path / "runs").rglob("selection.json")).read_text())
        assert selection["metric"] == "val:acc/latent_mean" and len(selection["values"]) == 2
        assert len(selection["then"]) == 1 and "run.seed=1" in selection["then"][0]
        for s in summaries:  # val chooses, test (the last stage, `final`) reports
            assert "acc/latent_mean" in s["stages"]["val"] and s["final"] == s["stages"]["test"]
    else:
        assert len(summaries) == 1 and list(summaries[0]["stages"]) == ["test"]


# ---- stdlib_assign: NAME = VALUE in a removed span of real stdlib source ----------------------


def tiny_assign(cache, **kw):
    from engram_qwen_compressor.stdlib_assign import StdlibAssignConfig, StdlibAssignDataset

    cfg = StdlibAssignConfig(**{"tokenizer": NAME, "context_tokens": 64, "max_line_tokens": 48, "budget": 16,
                                "budgets": [8, 16], "n_train": 24, "n_eval": 8, "n_val": 8, **kw})
    return StdlibAssignDataset(cfg, BuildContext(cache_dir=cache))


def test_stdlib_assign_removes_an_inserted_assignment_and_asks_for_its_value(tmp_path, tiny_size):
    ds = tiny_assign(tmp_path)
    from transformers import AutoTokenizer

    from engram_core.lm import tokenizer_folder
    from engram_core.lm.corpus import CorpusConfig, corpus_files, read_text

    tok = AutoTokenizer.from_pretrained(str(tokenizer_folder(NAME, tmp_path)))
    test_files = corpus_files(CorpusConfig())["test"]
    test_text = "\n".join(read_text(p) for p in test_files)
    for budget in (8, 16):
        b = ds.make_batch(ds.episodes("eval", range(8)), budget)
        for i in range(8):
            removed = tok.decode(b["removed_ids"][i][b["removed_mask"][i].bool()])
            answer = tok.decode(b["answer_ids"][i][b["answer_mask"][i].bool()])
            question = tok.decode(b["question_ids"][i][b["question_mask"][i].bool()])
            name = question.strip().rstrip(" =")
            value = answer.strip()
            assert answer == f" {value}\n" and value.isdigit() and 0 <= int(value) <= 9999
            assert f"{name} = {value}\n" in removed  # the line is in the removed span ...
            kept = tok.decode(b["kept_ids"][i][1:b["kept_answer_pos"][i] + 1])
            assert f"= {value}" not in kept and kept.endswith(question)  # ... not in the kept tail
            summary = tok.decode(b["summary_ids"][i][1:b["summary_answer_pos"][i] + 1])
            assert f"{name} = {value}\n" in summary  # the summary view hands it back as text
            at = b["removed_value_pos"][i][b["removed_value_mask"][i].bool()]
            assert tok.decode(b["removed_ids"][i][at]) == f" {value}"
            # the view holds the answer after the question (teacher forcing)
            p = int(b["kept_answer_pos"][i])
            assert tok.decode(b["kept_ids"][i][p + 1:p + 1 + len(tok.encode(answer, add_special_tokens=False))]) == answer
        assert len(b["kept_ids"][0]) - int(b["kept_answer_pos"].max()) > b["answer_ids"].shape[1]  # room to generate
    # eval episodes are windows of the LM corpus's test files (code the LM never trained on)
    e = ds.episodes("eval", [0])[0]
    line_start, line_end = e.line
    after = tok.decode(e.context[line_end:line_end + 12])
    assert after.strip()[:20] in test_text


def test_every_episode_removes_its_line_at_the_largest_budget(tmp_path, tiny_size):
    """The line ends before the largest budget's tail in every episode (whatever its name's and
    indentation's length), and a budget beyond the data's largest is one line."""
    ds = tiny_assign(tmp_path, n_train=300, budgets=[8, 24], budget=16, context_tokens=96, max_line_tokens=40)
    for split in ("train", "val", "eval"):
        eps = ds.episodes(split, range(ds.num_examples(split)))
        assert all(e.line[1] <= len(e.context) - 24 and e.line[1] - e.line[0] <= 40 for e in eps)
        ds.make_batch(eps, 24)
    with pytest.raises(ConfigError, match="budgets: budget 20 leaves no room for the inserted line"):
        tiny_assign(tmp_path, budgets=[8, 20], context_tokens=40, max_line_tokens=24)
    from engram_qwen_compressor.data import check_budgets

    with pytest.raises(ConfigError, match="budget 30"):
        check_budgets([30], ds.spec)


def test_value_ce_and_greedy_match_through_the_general_reader(tmp_path, tiny_size):
    from engram_qwen_compressor.metrics import ValueMatch, ValueMatchConfig
    from engram_qwen_compressor.objectives import value_ce

    ds = tiny_assign(tmp_path)
    head, build = tiny_reader(ds, tmp_path)
    mem = MemEncoder(MemEncoderConfig(n_slots=3, dim=16, n_heads=2, n_cross_layers=1), build)
    model = Model(head, mem, "context")
    b = ds.sample("train", 4, torch.Generator().manual_seed(0))
    ce, token_acc, exact, prefix = value_ce(head, b, "latent")
    assert prefix.shape == (4, 3, 16) and torch.isfinite(ce) and 0 <= float(token_acc) <= 1
    ce.backward()
    assert model.memory.proj.weight.grad.abs().sum() > 0
    # greedy generation equals step-by-step argmax of the LM on its own growing answer
    generated = head.greedy_answer(b, "summary", 3)
    ids = b["summary_ids"][0, : int(b["summary_answer_pos"][0]) + 1].tolist()
    for j in range(3):
        with torch.no_grad():
            nxt = int(head.lm(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        assert nxt == int(generated[0, j])
        ids.append(nxt)
    metric = ValueMatch(ValueMatchConfig(modes=["summary", "latent"], mean_over_budgets=True, max_examples=8), build)
    with torch.no_grad():
        for batch in metric.batches(ds, "eval", 4):
            metric.update(model, batch)
    out = metric.compute()
    assert {f"{t}/{m}_b{bb}" for t in ("match", "tf_match", "token_acc") for m in ("summary", "latent") for bb in (8, 16)} <= set(out)
    assert out["match/chance"] == pytest.approx(1 / 10000)


def test_a_learned_answer_is_generated_and_matched(tmp_path, tiny_size):
    """The exact match is not stuck at zero: a reader whose LM head is taught one episode's
    answer (full view) generates it, and the metric counts it."""
    from engram_qwen_compressor.metrics import ValueMatch, ValueMatchConfig
    from engram_qwen_compressor.objectives import value_ce

    ds = tiny_assign(tmp_path)
    head, build = tiny_reader(ds, tmp_path)
    model = Model(head, None, None)
    b = ds.make_batch(ds.episodes("eval", [0, 0]), 16)
    opt = torch.optim.Adam(head.parameters(), lr=3e-2)
    for _ in range(60):
        ce, _, exact, _ = value_ce(head, b, "full")
        opt.zero_grad()
        ce.backward()
        opt.step()
    assert float(exact) == 1.0
    metric = ValueMatch(ValueMatchConfig(modes=["full"], budgets=[16], max_examples=1), build)
    with torch.no_grad():
        for batch in metric.batches(ds, "eval", 1):
            metric.update(model, batch)
    assert metric.compute()["match/full_b16"] == 1.0


@pytest.mark.parametrize("name", ["general_assign_sweep", "general_assign_lora"])
def test_stdlib_assign_recipes_choose_on_val_and_report_test(name, tmp_path, monkeypatch):
    folder = _tiny_model_dir(tmp_path, monkeypatch)
    extra = [f"head.hf_path={folder}", f"data.tokenizer={folder}", "data.context_tokens=64", "data.max_line_tokens=48",
             "data.budget=16", "data.budgets=[8, 16]", "data.n_train=24", "data.n_eval=8", "data.n_val=8",
             "memory.n_slots=4", "metrics.0.max_examples=8", "stages.0.objective.budgets=[8, 16]", "stages.0.batch_size=4",
             "stages.0.eval_every=0", 'sweep."stages.0.steps"=[1, 2]', 'sweep."stages.0.lr"=[1e-3]',
             'select.then={ "run.seed" = [0, 1] }']
    r = run_cli(RECIPES / f"{name}.toml", *extra, "--out", tmp_path / "runs", "--quiet", plugins="qwen-compressor",
                env={"ENGRAM_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summaries = [json.loads(p.read_text()) for p in (tmp_path / "runs").rglob("summary.json")]
    assert len(summaries) == 3 and all(s["status"] == "completed" for s in summaries)
    for s in summaries:
        assert {f"{t}/{m}_b{b}" for t in ("match", "tf_match", "token_acc")
                for m in ("discard", "summary", "full", "latent", "oracle_slots") for b in (8, 16)} <= set(s["final"])
        assert "token_acc/latent_mean" in s["stages"]["val"] and s["final"] == s["stages"]["test"]
    selection = json.loads(next((tmp_path / "runs").rglob("selection.json")).read_text())
    assert selection["metric"] == "val:token_acc/latent_mean" and len(selection["values"]) == 2
