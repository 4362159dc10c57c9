"""Row-wise table optimisers from the HF path: a plain PyTorch loop and transformers' Trainer."""

import pytest
import torch
from engram_llm_hash import add_engram, engram_optimizer, engram_param_groups
from hf_tiny import VOCAB, tiny_model

from engram_core.tables.rowwise import RowwiseAdam

transformers = pytest.importorskip("transformers")


def _ids(seed=7):
    return torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("fused", [False, True])
def test_plain_loop_updates_only_the_rows_read(fused):
    model = add_engram(tiny_model("llama"), memory_size=3000, inject_layers=[0], slot_dim=8, sparse=True)
    block = model.engram.blocks["0"]
    before = block.table.weight.detach().clone()
    opt = engram_optimizer(model, lr=1e-2, optimizer="rowwise_adam", fused_backward=fused)
    ids = _ids()
    model.train()
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        if fused:
            assert block.table.weight.grad is None  # applied in backward: no gradient kept
        opt.step()
    read = torch.unique(block.hasher.addresses(ids))
    changed = (block.table.weight.detach() != before).any(1).nonzero().squeeze(1)
    assert changed.numel() > 0 and set(changed.tolist()) <= set(read.tolist())
    state = opt.state[block.table.weight]
    unread = torch.ones(before.shape[0], dtype=torch.bool)
    unread[read] = False
    assert not state["exp_avg_sq"][unread].any() and state["exp_avg_sq"].shape == (before.shape[0],)


def test_groups_mark_tables_rowwise_and_the_rest_elementwise():
    model = add_engram(tiny_model("qwen2"), memory_size=500, inject_layers=[0, 1], slot_dim=8)
    groups = {g["name"]: g for g in engram_param_groups(model, lr=1e-3, rowwise_tables=True)}
    assert groups["engram_tables"]["rowwise"] is True and groups["engram"]["rowwise"] is False
    assert isinstance(engram_optimizer(model, lr=1e-3), RowwiseAdam)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=16):
        self.ids = torch.randint(3, VOCAB, (n, 10), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_with_rowwise_optimizer_and_its_scheduler(tmp_path):
    model = add_engram(tiny_model("llama"), memory_size=3000, inject_layers=[1], slot_dim=8, sparse=True)
    rows = model.engram.blocks["1"].table.weight.detach().clone()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="linear", report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
    )
    # fused: the sparse table's update happens in backward, so Trainer's gradient clipping
    # (which cannot take sparse gradients) never sees a table gradient
    opt = engram_optimizer(model, lr=args.learning_rate, optimizer="rowwise_adagrad", fused_backward=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Rows(), optimizers=(opt, None))
    trainer.train()
    assert not torch.equal(rows, model.engram.blocks["1"].table.weight)
    assert opt.param_groups[0]["lr"] < 1e-2 * 5  # Trainer's linear schedule drove this optimiser


def test_host_placement_from_the_hf_path(tmp_path):
    """add_engram(placement="host"): trains with engram_optimizer and prefetch, equals the
    device placement, generates (cached == uncached) and round-trips through save_pretrained."""
    from engram_llm_hash import from_pretrained

    models = {}
    for placement in ("device", "host"):
        torch.manual_seed(0)
        base = tiny_model("qwen2")
        torch.manual_seed(1)
        models[placement] = add_engram(base, memory_size=3000, inject_layers=[0, 1], slot_dim=8, placement=placement)
    opts = {k: engram_optimizer(m, lr=1e-2, optimizer="rowwise_adam") for k, m in models.items()}
    data = [_ids(seed) for seed in range(4)]
    models["host"].engram.prefetch(data[0])
    for i, ids in enumerate(data):
        if i + 1 < len(data):
            models["host"].engram.prefetch(data[i + 1])
        losses = {}
        for k, m in models.items():
            m.train()
            loss = m(input_ids=ids, labels=ids).loss
            opts[k].zero_grad()
            loss.backward()
            opts[k].step()
            losses[k] = loss.detach()
        assert torch.equal(losses["device"], losses["host"])
    host = models["host"].eval()
    assert host.engram.stats()["prefetch_hit_rate_l0"] == 1.0
    prompt = _ids(9)[:1, :6]
    opts_gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = host.generate(input_ids=prompt, use_cache=True, **opts_gen)
    assert torch.equal(cached, host.generate(input_ids=prompt, use_cache=False, **opts_gen))
    assert torch.equal(cached, models["device"].eval().generate(input_ids=prompt, use_cache=True, **opts_gen))
    host.save_pretrained(tmp_path / "saved")
    loaded = from_pretrained(tmp_path / "saved").eval()
    assert loaded.engram.cfg.placement == "host"
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=prompt).logits, host(input_ids=prompt).logits)


# ---- the CUDA default (tables updated inside the backward), forced on the CPU ---------------
def _as_on_cuda(device):
    return True


def test_in_backward_default_equals_the_dense_path():
    """engram_optimizer's "auto" as on CUDA (auto_policy): the table makes sparse gradients,
    updated inside the backward; every trainable parameter equals the dense path's
    (fused_backward=False: dense table gradient, update at step()) after 4 steps."""
    params = {}
    for setting in ("auto", False):
        torch.manual_seed(0)
        model = add_engram(tiny_model("llama"), memory_size=3000, inject_layers=[0, 1], slot_dim=8)
        opt = engram_optimizer(model, lr=1e-2, optimizer="rowwise_adam", fused_backward=setting, auto_policy=_as_on_cuda)
        table = model.engram.blocks["0"].table
        assert table.row_gradients == (setting == "auto")
        model.train()
        for seed in range(4):
            ids = _ids(seed)
            opt.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            assert (table.weight.grad is None) == (setting == "auto")
            opt.step()
        params[setting] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert params["auto"].keys() == params[False].keys()
    # the sparse gradient sums a row's reads in another order than the dense one; row-wise
    # Adam's division carries that rounding (2 of 18,288 table values 2e-6 apart after 4 steps)
    for n in params[False]:
        torch.testing.assert_close(params["auto"][n], params[False][n], rtol=1e-4, atol=1e-5)


def test_trainer_with_accumulation_and_clipping_under_the_cuda_default(tmp_path):
    """Trainer with gradient accumulation (2) and the tables updated from row gradients:
    the rows of both micro-batches are summed and applied at step(), equal to the dense
    path; with clipping on (max_grad_norm 1.0), clipping never meets a sparse table gradient."""
    tables = {}
    for setting, clip in (("auto", 0.0), (False, 0.0), ("auto", 1.0)):
        torch.manual_seed(0)
        model = add_engram(tiny_model("llama"), memory_size=3000, inject_layers=[1], slot_dim=8)
        before = model.engram.blocks["1"].table.weight.detach().clone()
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"out{setting}{clip}"), max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2,
            learning_rate=1e-2, max_grad_norm=clip, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
            disable_tqdm=True, seed=0,
        )
        opt = engram_optimizer(model, lr=args.learning_rate, optimizer="rowwise_adagrad", fused_backward=setting, auto_policy=_as_on_cuda)
        transformers.Trainer(model=model, args=args, train_dataset=_Rows(), optimizers=(opt, None)).train()
        assert opt._mode == ("accumulate" if setting == "auto" else "learn")
        tables[setting, clip] = model.engram.blocks["1"].table.weight.detach().clone()
        assert not torch.equal(tables[setting, clip], before)
    torch.testing.assert_close(tables["auto", 0.0], tables[False, 0.0], rtol=1e-4, atol=1e-5)


def test_fused_backward_is_checked():
    from engram_core.config import ConfigError

    model = add_engram(tiny_model("llama"), memory_size=300, inject_layers=[0], slot_dim=8)
    with pytest.raises(ConfigError, match="fused_backward"):
        engram_optimizer(model, lr=1e-2, fused_backward="always")
