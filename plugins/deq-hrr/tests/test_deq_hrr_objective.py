"""The objective (CE + λ·InfoNCE), its events (per_epoch.csv, TensorBoard, LR restart) and the metric."""

import csv

import pytest
import torch
from engram_deq_hrr.data import NeedleConfig, NeedleDataset
from engram_deq_hrr.head import DEQClassifier, DEQClassifierConfig
from engram_deq_hrr.memories import HRRMemory, HRRMemoryConfig
from engram_deq_hrr.metrics import DEQHRRAccuracy, DEQHRRAccuracyConfig
from engram_deq_hrr.objective import PER_EPOCH_COLUMNS, DEQHRRTaskConfig, DEQHRRTaskObjective
from engram_deq_hrr.scheduler import NCESchedulerConfig

from engram_core.components import BuildContext, Event, Model


class Logger:
    def __init__(self):
        self.scalars = {}

    def scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, float(value)))


def build(tmp_path, memory=True, **sched):
    ds = NeedleDataset(NeedleConfig(seq_len=24, n_pairs=2, n_train=64, n_eval=16), BuildContext(cache_dir=tmp_path))
    b = BuildContext(spec=ds.spec, seed=0, cache_dir=tmp_path)
    head = DEQClassifier(DEQClassifierConfig(hidden=16, embed=16), b)
    b.head = head
    mem = HRRMemory(HRRMemoryConfig(dim=32, n_buckets=2), b) if memory else None
    model = Model(head, mem, "trace")
    cfg = DEQHRRTaskConfig(nce_scheduler=NCESchedulerConfig(**sched))
    return ds, model, DEQHRRTaskObjective(cfg, b)


def test_loss_terms_and_lambda(tmp_path):
    ds, model, obj = build(tmp_path, warm_start_epochs=0, require_read=False, lambda_start=0.5, lambda_max=0.5)
    batch = ds.sample("train", 8, torch.Generator().manual_seed(0))
    loss, terms = obj(model, batch)
    assert terms["lambda"] == 0 and torch.isclose(loss, terms["ce"])
    obj.scheduler.epoch_end(0.0, 0.1)
    loss, terms = obj(model, batch)
    assert terms["lambda"] == 0.5 and torch.isclose(loss, terms["ce"] + 0.5 * terms["nce"], atol=1e-5)
    loss.backward()
    assert model.memory.prototypes.grad is not None


def test_without_memory_is_plain_cross_entropy(tmp_path):
    ds, model, obj = build(tmp_path, memory=False)
    loss, terms = obj(model, ds.sample("train", 8, torch.Generator().manual_seed(0)))
    assert "nce" not in terms and torch.isclose(loss, terms["ce"])


def test_eval_end_writes_csv_logs_and_restarts_lr(tmp_path):
    ds, model, obj = build(tmp_path, warm_start_epochs=0, require_read=False, lr_restart_factor=0.5, lr_restart_epochs=2,
                           write_cooldown_batches=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logger = Logger()
    batch = ds.sample("train", 8, torch.Generator().manual_seed(0))
    obj(model, batch)  # one training batch feeds the read-quality accumulator
    metrics = {"eval/acc": 0.25, "memory/raw_read_cos": 0.1, "memory/solver_iters": 5.0}
    obj.on_eval_end(Event(10, "train", model, metrics, logger, opt, tmp_path))
    assert obj.scheduler.gate_open and opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert obj.scheduler.in_cooldown
    obj.on_step_end(Event(11, "train", model, {}, logger, opt, tmp_path))
    assert not obj.scheduler.in_cooldown
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)  # not compounded when nothing rewrites it
    obj.on_eval_end(Event(20, "train", model, {"eval/acc": 0.3}, logger, opt, tmp_path))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.075)
    obj.on_eval_end(Event(30, "eval", model, {"eval/acc": 0.3}, logger, None, tmp_path))  # eval stage: no epoch
    rows = list(csv.DictReader((tmp_path / "per_epoch.csv").open()))
    assert len(rows) == 2 and list(rows[0]) == list(PER_EPOCH_COLUMNS)
    assert rows[0]["val_acc"] == "0.25" and rows[0]["gate_open"] == "1" and rows[0]["solver_iters"] == "5"
    assert float(rows[0]["train_read_cos"]) == pytest.approx(float(rows[0]["read_ema"]))
    assert [s for s, _ in logger.scalars["memory/lambda"]] == [10, 20]
    assert "memory/post_gate_drop" in logger.scalars


def test_objective_state_round_trip(tmp_path):
    ds, model, obj = build(tmp_path, warm_start_epochs=0, read_threshold=0.0)
    obj.scheduler.epoch_end(0.5, 0.5)
    obj._read_sum, obj._read_count = 1.5, 3
    path = tmp_path / "o.pt"
    torch.save(obj.state_dict(), path)
    _, _, other = build(tmp_path, warm_start_epochs=0, read_threshold=0.0)
    other.load_state_dict(torch.load(path, weights_only=True))
    assert other.scheduler.gate_open and other._read_count == 3
    assert other.scheduler.get_extra_state() == obj.scheduler.get_extra_state()


def test_metric_reports_accuracy_best_and_telemetry(tmp_path):
    ds, model, obj = build(tmp_path)
    model.eval()
    metric = DEQHRRAccuracy(DEQHRRAccuracyConfig(), BuildContext())
    metric.reset()
    with torch.no_grad():
        for batch in ds.eval_batches("eval", 8):
            metric.update(model, batch)
    out = metric.compute()
    for key in ("acc", "best_acc", "memory/raw_read_cos", "memory/clean_read_cos", "memory/read_gap", "memory/write_cos",
                "memory/collisions", "memory/bucket_coverage", "memory/read_gate", "memory/solver_iters"):
        assert key in out, key
    assert 0 <= out["acc"] <= 1 and out["best_acc"] == out["acc"]
    metric.reset()
    metric.correct, metric.total = 0, 1
    assert metric.compute()["best_acc"] == out["acc"]  # best survives a worse evaluation
    state = metric.state_dict()
    fresh = DEQHRRAccuracy(DEQHRRAccuracyConfig(), BuildContext())
    fresh.load_state_dict(state)
    assert fresh.best == metric.best


def test_read_threshold_from_the_capacity_cosine(tmp_path):
    """read_threshold_capacity · 1/sqrt(n_pairs + 1): the data set here holds 2 pairs."""
    _, _, obj = build(tmp_path, read_threshold_capacity=0.5)
    assert obj.scheduler.cfg.read_threshold == pytest.approx(0.5 / 3 ** 0.5)
    _, _, plain = build(tmp_path, read_threshold=0.3)
    assert plain.scheduler.cfg.read_threshold == 0.3


def test_metric_reports_lengths_schedule_and_majority(tmp_path):
    from engram_core.components import EvalContext

    ds = NeedleDataset(NeedleConfig(seq_len=24, n_pairs=2, n_train=64, n_eval=16, eval_lengths=(40,)),
                       BuildContext(cache_dir=tmp_path))
    b = BuildContext(spec=ds.spec, seed=0, cache_dir=tmp_path)
    head = DEQClassifier(DEQClassifierConfig(hidden=16, embed=16), b)
    b.head = head
    model = Model(head, HRRMemory(HRRMemoryConfig(dim=32), b), "trace").eval()
    obj = DEQHRRTaskObjective(DEQHRRTaskConfig(nce_scheduler=NCESchedulerConfig(warm_start_epochs=0, require_read=False)), b)
    obj.scheduler.epoch_end(0.1, 0.2)  # opens at epoch 1
    results = {}
    for stage, lengths_in in (("final", ("*",)), ("train", ("final",))):
        metric = DEQHRRAccuracy(DEQHRRAccuracyConfig(lengths_in=lengths_in), b)
        metric.bind(EvalContext(model, ds, "eval", 0, stage, obj, 8, torch.device("cpu")))
        metric.reset()
        with torch.no_grad():
            for batch in metric.batches(ds, "eval", 8):
                metric.update(model, batch)
        results[stage] = metric.compute()
    final = results["final"]
    assert set(final) >= {"acc@24", "acc@40", "majority_acc", "memory/gate_open_epoch", "memory/gate_open_fraction"}
    assert final["acc@24"] == final["acc"] and 0 <= final["acc@40"] <= 1
    assert final["memory/gate_open_epoch"] == 1 and final["memory/gate_open_fraction"] == 1.0
    labels = ds._splits["train"]["label"]
    top = int(torch.bincount(labels).argmax())
    assert final["majority_acc"] == pytest.approx(float((ds._splits["eval"]["label"] == top).float().mean()))
    assert "acc@40" not in results["train"]  # lengths_in = ["final"]: skipped during training
