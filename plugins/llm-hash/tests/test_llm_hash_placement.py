"""Table placements of engram_hash: the row-table seam, and the host placement (rows in host
memory, prefetched; the same results as on the device, through the engine too)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
import torch
from engram_llm_hash.memories import EngramHashConfig
from llm_hash_helpers import DIM, VOCAB, memory, perturb

from engram_core.config import ConfigError
from engram_core.recipe.extends import load_tree
from engram_core.tables.device_rows import DeviceRowTable
from engram_core.tables.host_rows import HostRowTable
from engram_core.tables.rowwise import RowwiseAdagrad, RowwiseAdam


def test_device_placement_is_an_embedding_with_full_weight():
    m = memory()
    table = m.blocks["0"].table
    assert isinstance(table, DeviceRowTable) and isinstance(table, torch.nn.Embedding)
    assert table.full_weight is table.weight
    assert "blocks.0.table.weight" in m.state_dict()
    rows = torch.randint(0, table.num_embeddings, (3, 5, 4))
    assert torch.equal(table(rows), table.weight[rows])
    m.set_table_dtype(torch.bfloat16)
    assert table.weight.dtype == torch.bfloat16


def test_unknown_placement_is_one_config_error():
    with pytest.raises(ConfigError, match="placement.*must be one of 'device', 'host', 'sharded'"):
        EngramHashConfig(placement="gpu")


def test_a_placement_a_plugin_registers_is_built_and_named_in_errors(monkeypatch):
    import types

    from engram_core import registry
    from engram_core.hookspecs import hookimpl
    from engram_core.tables.row_tables import make_row_table

    plugin = types.ModuleType("placement_plugin")

    @hookimpl
    def engram_placements(register):
        register("plain", lambda num_rows, dim, sparse=False: torch.nn.Embedding(num_rows, dim, sparse=sparse), help="for a test")

    plugin.engram_placements = engram_placements
    monkeypatch.setattr(registry, "_cached", registry.load_registry(extra={"placement-test": plugin}))
    table = make_row_table("plain", 5, 3)
    assert isinstance(table, torch.nn.Embedding) and tuple(table.weight.shape) == (5, 3)
    with pytest.raises(ConfigError, match="'gpu' is not a placement; use one of 'device', 'host', 'sharded', 'plain'") as err:
        make_row_table("gpu", 5, 3)
    assert err.value.key == "placement"


# ---- host placement --------------------------------------------------------------------------
RECIPES = Path(__file__).resolve().parents[3] / "recipes"
TELEMETRY = ("prefetch_hit_rate", "host_rows_per_step", "host_bytes_per_step", "sync_fetches", "eval_fetch_rate", "_ms_per_example", "_ms_per_token", "_ms_per_step")


def twin_memories(**kw):
    """The same memory twice, device and host placement, from the same random stream."""
    out = []
    for placement in ("device", "host"):
        torch.manual_seed(0)
        out.append(memory(placement=placement, layers=[0, 1], **kw))
    return out


def batches(n, seed=1, b=3, t=9):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, t, DIM, generator=g), torch.randint(0, VOCAB, (b, t), generator=g)) for _ in range(n)]


def loss_of(mem, hidden, ids):
    h = mem.apply_layer(0, hidden, ids)
    return mem.apply_layer(1, h, ids), h


@pytest.mark.parametrize("cls", [RowwiseAdagrad, RowwiseAdam])
@pytest.mark.parametrize("prefetch", ["ahead", "just_before", "never"])
def test_host_equals_device_after_ten_steps_exactly(cls, prefetch):
    """Same outputs at every step and the same parameters after 10 (fp32, bit for bit),
    whether rows were prefetched a step ahead (the engine), just before, or never (all misses)."""
    dev, host = twin_memories()
    assert isinstance(host.blocks["0"].table, HostRowTable)
    assert torch.equal(dev.blocks["0"].table.weight, host.blocks["0"].table.full_weight)
    opts = [cls(m.parameters(), lr=0.05) for m in (dev, host)]
    data = batches(10)
    if prefetch == "ahead":
        host.prefetch(data[0][1])
    for i, (hidden, ids) in enumerate(data):
        if prefetch == "ahead" and i + 1 < len(data):
            host.prefetch(data[i + 1][1])  # before this step's forward: its update must patch it
        elif prefetch == "just_before":
            host.prefetch(ids)
        outs = []
        for m, o in zip((dev, host), opts):
            o.zero_grad()
            out, _ = loss_of(m, hidden, ids)
            (out.pow(2).sum() + out.sum()).backward()
            o.step()
            outs.append(out.detach())
        assert torch.equal(outs[0], outs[1]), f"step {i}"
    d, h = dev.state_dict(), host.state_dict()
    assert set(d) == {k for k in h if ".optimizer." not in k}
    for k in d:
        assert torch.equal(d[k], h[k]), k
    again = memory(placement="device", layers=[0, 1])
    again.load_state_dict(h)  # a host checkpoint loads into the device placement (rows; the state is the optimiser's there)
    assert torch.equal(again.blocks["0"].table.weight, dev.blocks["0"].table.weight)
    for key in ("0", "1"):  # the row-wise state, held beside the host rows, equals the optimiser's
        held = host.blocks[key].table.optimizer_state
        mine = opts[0].state[dev.blocks[key].table.weight]
        assert set(held) == set(mine) and all(torch.equal(held[n], mine[n]) for n in mine)
    stats = host.stats()
    expected_hits = {"ahead": 1.0, "just_before": 1.0, "never": 0.0}[prefetch]
    assert stats["prefetch_hit_rate_l0"] == expected_hits
    assert stats["host_bytes_per_step_l0"] > 0
    assert stats["sync_fetches_l0"] == (0 if prefetch != "never" else 10)


def test_host_table_update_reads_nothing_on_the_host():
    """The optimiser's step over host-held rows (the working set taken from the device, the
    row-wise rule, the write-back) makes no host read of a device tensor: the rows a step
    read with an all-zero gradient are kept by a mask made on the device, not found with
    `nonzero` (on CUDA a synchronisation that waited for the whole backward: an H100's
    host-table step spent 23.5 ms in its last table's update)."""
    from engram_core.testing.host_reads import HostReads

    _, host = twin_memories()
    opt = RowwiseAdam([b.table.weight for b in host.blocks.values()], lr=0.05)  # the host rows' handles only
    for hidden, ids in batches(3):
        opt.zero_grad()
        out, _ = loss_of(host, hidden, ids)
        (out.pow(2).sum() + out.sum()).backward()
        with HostReads() as reads:
            opt.step()
        assert reads.found == []


def test_host_matches_sparse_device_gradients():
    dev, host = twin_memories(sparse=True)
    opts = [RowwiseAdam(m.parameters(), lr=0.05) for m in (dev, host)]
    for hidden, ids in batches(5, seed=2):
        host.prefetch(ids)
        for m, o in zip((dev, host), opts):
            o.zero_grad()
            loss_of(m, hidden, ids)[0].pow(2).sum().backward()
            o.step()
    torch.testing.assert_close(dev.blocks["0"].table.weight, host.blocks["0"].table.full_weight, rtol=1e-6, atol=1e-7)


def test_eval_and_generation_read_rows_not_prefetched():
    dev, host = twin_memories()
    perturb(dev, 0.3)
    host.load_state_dict(dev.state_dict())  # a device checkpoint loads into the host placement
    hidden, ids = batches(1, seed=3)[0]
    with torch.no_grad():
        assert torch.equal(loss_of(dev, hidden, ids)[0], loss_of(host, hidden, ids)[0])
        for t in range(4, ids.shape[1] + 1):  # incremental (KV-cache) calls: each new row a miss
            a = dev.apply_layer(0, hidden[:, t - 1 : t], ids[:, :t])
            b = host.apply_layer(0, hidden[:, t - 1 : t], ids[:, :t])
            assert torch.equal(a, b)
    stats = host.stats()
    assert stats["eval_fetch_rate_l0"] == 1.0 and stats["sync_fetches_l0"] > 0 and "prefetch_hit_rate_l0" not in stats


def test_padded_batches_prefetch_the_rows_they_read():
    _, host = twin_memories()
    opt = RowwiseAdagrad(host.parameters(), lr=0.1)
    hidden, ids = batches(1, seed=4)[0]
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    host.prefetch({"input_ids": ids, "attention_mask": mask})
    host.apply_layer(0, hidden, ids, attention_mask=mask).sum().backward()
    opt.step()
    assert host.stats()["prefetch_hit_rate_l0"] == 1.0


def test_host_table_without_a_rowwise_optimizer_says_so():
    _, host = twin_memories()
    torch.optim.AdamW(host.parameters())
    hidden, ids = batches(1)[0]
    with pytest.raises(RuntimeError, match="row-wise optimiser"):
        host.apply_layer(0, hidden, ids)
    host.requires_grad_(False)  # a frozen table needs none
    host.apply_layer(0, hidden, ids)


# ---- through the engine: kv_memorisation with memory.placement=host ---------------------------
def _tiny_kv_recipe(tmp_path: Path, name: str, steps: int, **memory) -> Path:
    raw, _ = load_tree(RECIPES / "kv_memorisation.toml")
    raw.pop("sweep")
    raw["run"] = {"out_dir": str(tmp_path / "runs"), "name": name}
    raw["data"]["n_synthetic"] = 40
    raw["head"].update(dim=32, n_layers=2, n_heads=2)
    raw["memory"].update(memory_size=4099, heads_per_order=2, **memory)
    for st in raw["stages"]:
        if "steps" in st:
            st.update(steps=steps if st["name"] == "train_engram" else 4, batch_size=8)
            st.pop("eval_every", None)
            st.pop("warmup_steps", None)
    raw["stages"][2]["param_groups"][0]["optimizer"] = "rowwise_adam"
    for m in raw.get("metrics", []):
        m["max_examples"] = 8
    path = tmp_path / f"{name}.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def _summary(tmp_path, name):
    (run,) = (tmp_path / "runs" / name).iterdir()
    return run, json.loads((run / "summary.json").read_text())


def _device_and_host(tmp_path, steps, *overrides):
    from engram_core.cli import run_main

    finals = {}
    for placement in ("device", "host"):
        name = f"{placement}{len(overrides)}"
        path = _tiny_kv_recipe(tmp_path, name, steps=steps)
        assert run_main([str(path), f"memory.placement={json.dumps(placement)}", *overrides, "--quiet"]) == 0
        run, s = _summary(tmp_path, name)
        assert s["status"] == "completed"
        # on CPU, so the two compare: the host run's table was saved from host memory, the device run's from the GPU
        finals[placement] = (s, torch.load(run / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")["model"])
    return finals["device"], finals["host"]


def test_kv_memorisation_host_placement_is_the_device_run_exactly(tmp_path, monkeypatch):
    """`recipes/kv_memorisation.toml memory.placement=host` (its table group on a row-wise
    optimiser; no gradient clipping, whose norm sums in another order) for 10 memory steps:
    the same metrics and bit-identical weights as on the device. On a GPU the device run's
    embedding backward adds duplicate rows with atomics, in no fixed order, so there the
    weights agree to rounding."""
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    (sd, md), (sh, mh) = _device_and_host(tmp_path, 10, "stages.2.grad_clip=0.0")
    assert sh["stages"]["train_engram"]["memory/prefetch_hit_rate"] == 1.0
    if torch.cuda.is_available():
        for k in md:
            torch.testing.assert_close(mh[k], md[k], rtol=1e-4, atol=1e-5)
        assert sh["final"]["eval/exact_match"] == sd["final"]["eval/exact_match"]
        return
    assert all(torch.equal(md[k], mh[k]) for k in md), "same parameters after the run"
    drop = TELEMETRY
    assert {k: v for k, v in sh["final"].items() if not k.endswith(drop)} == {k: v for k, v in sd["final"].items() if not k.endswith(drop)}


def test_kv_memorisation_host_placement_same_accuracy_with_clipping(tmp_path, monkeypatch):
    """The recipe as it is (gradient clipping on: the host rows' gradients count in the
    norm) for 60 memory steps: the same accuracy, weights equal to rounding."""
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    (sd, md), (sh, mh) = _device_and_host(tmp_path, 60)
    assert sd["final"]["eval/exact_match"] > 0, "the memory learnt something, so the comparison says something"
    assert sh["final"]["eval/exact_match"] == sd["final"]["eval/exact_match"]
    # on an H200 (atomic scatter-add on top of the norm's order) 28 of 65k table values
    # differed by up to 7.1e-5 after the 60 steps; on the CPU they agree to 1e-5
    atol = 2e-4 if torch.cuda.is_available() else 1e-5
    for k in md:
        torch.testing.assert_close(mh[k], md[k], rtol=1e-4, atol=atol)


def test_kv_memorisation_host_without_rowwise_optimizer_is_one_line(tmp_path, capsys, monkeypatch):
    from engram_core.cli import run_main

    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    path = _tiny_kv_recipe(tmp_path, "adam", steps=2, placement="host")
    code = run_main([str(path), 'stages.2.param_groups.0.optimizer="adam"', "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "stages.2.param_groups.0.optimizer" in err[0] and "'adam' cannot update" in err[0] and "rowwise_adam" in err[0], err
    assert not list((tmp_path / "runs").rglob("last.pt")), "refused before any stage ran"


def test_host_placement_kill_and_resume_same_final_metrics(tmp_path, monkeypatch):
    from engram_core.cli import run_main

    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    path = _tiny_kv_recipe(tmp_path, "ref", steps=60, placement="host")
    killed = tmp_path / "killed.toml"
    killed.write_text(path.read_text().replace('name = "ref"', 'name = "killed"'))
    # one thread in all three runs (reference, killed, resumed): another thread count sums in
    # another order, and the automatic share (engram_core.run.threads) depends on what else runs
    args = ["stages.2.checkpoint_every=5", "stages.2.eval_every=30", "run.threads=1"]
    assert run_main([str(path), *args, "--quiet"]) == 0
    _, expected = _summary(tmp_path, "ref")
    cli = [sys.executable, "-c", "from engram_core.cli import run_main; raise SystemExit(run_main())"]
    proc = subprocess.Popen([*cli, str(killed), *args, "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, ckpt = time.time() + 120, None
    while time.time() < deadline and proc.poll() is None:
        runs = list((tmp_path / "runs" / "killed").glob("*/checkpoints/last.pt"))
        if runs:
            try:
                state = torch.load(runs[0], weights_only=True)
            except Exception:  # noqa: BLE001 - being replaced as we read it
                continue
            if state["stage_index"] == 2 and not state["stage_done"]:  # mid-way through the host-table stage
                ckpt = runs[0]
                break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ckpt is not None, "the run never wrote a checkpoint inside the memory stage"
    run = ckpt.parents[1]
    assert run_main(["--resume", str(run), "--quiet"]) == 0
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["status"] == "completed"
    # timings, and the transfer averages (over the steps this process ran since the last
    # evaluation: telemetry is not checkpointed), aside
    same = lambda m: {k: v for k, v in m.items() if not k.endswith(TELEMETRY)}  # noqa: E731
    assert same(resumed["final"]) == same(expected["final"])
    assert {k: same(v) for k, v in resumed["stages"].items()} == {k: same(v) for k, v in expected["stages"].items()}


def test_large_host_tables_initialise_in_chunks(monkeypatch):
    monkeypatch.setattr(HostRowTable, "INIT_CHUNK", 64)
    table = HostRowTable(1000, 8)
    assert torch.isfinite(table.rows).all() and 0.9 < float(table.rows.std()) < 1.1
    assert not torch.equal(table.rows[:8], table.rows[8:16])  # every chunk drew its own numbers
    torch.manual_seed(3)
    a = HostRowTable(1000, 8).rows
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the chunks' generators, not the threads' order, decide the rows
    try:
        torch.manual_seed(3)
        b = HostRowTable(1000, 8).rows
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [RowwiseAdagrad, RowwiseAdam])
def test_cuda_host_placement_equals_device_placement(cls):
    """The asynchronous path (worker thread, side stream, pinned buffers, write-back) on a
    GPU: host == device for 10 steps prefetched one step ahead, then after a reload."""
    dev, host = twin_memories()
    dev, host = dev.cuda(), host.cuda()
    assert host.blocks["0"].table.rows.is_pinned()
    opts = [cls(m.parameters(), lr=0.05) for m in (dev, host)]
    data = [(h.cuda(), i) for h, i in batches(10)]
    host.prefetch(data[0][1])
    for i, (hidden, ids) in enumerate(data):
        if i + 1 < len(data):
            host.prefetch(data[i + 1][1])
        outs = []
        for m, o in zip((dev, host), opts):
            o.zero_grad()
            out, _ = loss_of(m, hidden, ids.cuda())
            out.pow(2).sum().backward()
            o.step()
            outs.append(out.detach())
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    d, h = dev.state_dict(), host.state_dict()
    for k in d:
        torch.testing.assert_close(h[k].cuda(), d[k], rtol=1e-5, atol=1e-6)
    assert host.stats()["prefetch_hit_rate_l0"] == 1.0
