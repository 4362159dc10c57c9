"""engram_core.cache: what the key covers, hits and misses, damaged entries, `engram cache`."""

import json

import attrs
import pytest
import torch

from engram_core import cache
from engram_core.testing.cli import run_cli
from engram_core.tools import cache_listing


@attrs.frozen
class Cfg:
    n: int = 3
    name: str = "a"
    sizes: list = attrs.field(factory=lambda: [1, 2])


def build_a(cfg):
    return list(range(cfg.n))


def build_b(cfg):  # same behaviour, other source
    return [i for i in range(cfg.n)]


def make(root, **kw):
    args = dict(plugin="demo", kind="thing", config=Cfg(), seed=0, version=1, builder=build_a, ext="json")
    args.update(kw)
    return cache.entry(root, **args)


def save_json(value, path):
    path.write_text(json.dumps(value))


def load_json(path):
    return json.loads(path.read_text())


def test_key_covers_kind_config_seed_version_source_and_inputs(tmp_path):
    base = make(tmp_path).key
    assert make(tmp_path).key == base  # deterministic
    assert make(tmp_path / "elsewhere").key == base  # the folder is not part of the key
    others = [
        make(tmp_path, kind="other"),
        make(tmp_path, plugin="other"),
        make(tmp_path, config=Cfg(n=4)),
        make(tmp_path, config=Cfg(sizes=[1, 3])),
        make(tmp_path, seed=1),
        make(tmp_path, seed=None),
        make(tmp_path, version=2),
        make(tmp_path, builder=build_b),
        make(tmp_path, inputs={"init": "abc"}),
    ]
    keys = [e.key for e in others]
    assert base not in keys and len(set(keys)) == len(keys)


def test_canonical_json_is_order_free_and_exact():
    assert cache.canonical_json({"b": 1, "a": [1, (2, 3)]}) == cache.canonical_json({"a": [1, [2, 3]], "b": 1})
    assert cache.canonical_json(Cfg()) == cache.canonical_json({"n": 3, "name": "a", "sizes": [1, 2]})
    with pytest.raises(TypeError, match="cannot encode"):
        cache.canonical_json({"x": object()})  # never a repr with an address in it


def test_digests_of_tensors_and_generators():
    a = {"w": torch.zeros(3), "b": torch.ones(2)}
    assert cache.tensors_digest(a) == cache.tensors_digest({"b": torch.ones(2), "w": torch.zeros(3)})
    assert cache.tensors_digest(a) != cache.tensors_digest({"w": torch.zeros(3), "b": torch.ones(2) * 2})
    assert cache.tensors_digest(a) != cache.tensors_digest({"w": torch.zeros(3, dtype=torch.float64), "b": torch.ones(2)})
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert cache.generator_digest(g1) == cache.generator_digest(g2)
    torch.rand(1, generator=g2)  # same initial seed, advanced state: another key
    assert cache.generator_digest(g1) != cache.generator_digest(g2)


def test_miss_then_hit_with_sidecar(tmp_path, capsys):
    e = make(tmp_path)
    calls = []

    def build():
        calls.append(1)
        return [1, 2, 3]

    assert cache.load_or_build(e, build, save_json, load_json) == [1, 2, 3]
    assert cache.load_or_build(make(tmp_path), build, save_json, load_json) == [1, 2, 3]
    assert len(calls) == 1
    out = capsys.readouterr().out.splitlines()
    assert out == [f"cache miss demo/thing {e.key[:16]} (building)", f"cache hit demo/thing {e.key[:16]}"]
    assert e.path == tmp_path / "demo" / f"thing-{e.key[:16]}.json"
    meta = json.loads(e.meta_path.read_text())
    assert meta["key"] == e.key and meta["kind"] == "thing" and meta["plugin"] == "demo"
    assert meta["config"] == {"n": 3, "name": "a", "sizes": [1, 2]} and meta["seed"] == 0 and meta["version"] == 1
    assert meta["size"] == e.path.stat().st_size and meta["created"] and len(meta["source"]) == 64
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [e.path.name, e.meta_path.name]  # no temp left


def test_a_changed_setting_misses(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return len(calls)

    for kw in ({}, {"config": Cfg(n=9)}, {"seed": 7}, {"version": 2}, {"builder": build_b}, {}):
        cache.load_or_build(make(tmp_path, **kw), build, save_json, load_json)
    assert len(calls) == 5  # the last, like the first, hits
    assert len(list((tmp_path / "demo").glob("*.meta.json"))) == 5


@pytest.mark.parametrize("damage", ["truncate", "no_sidecar", "other_key", "bad_json", "load_raises"])
def test_a_damaged_entry_is_rebuilt(tmp_path, damage, capsys):
    e = make(tmp_path)
    cache.load_or_build(e, lambda: list(range(100)), save_json, load_json)
    load = load_json
    if damage == "truncate":
        e.path.write_text(e.path.read_text()[:-5])
    elif damage == "no_sidecar":
        e.meta_path.unlink()
    elif damage == "other_key":
        meta = json.loads(e.meta_path.read_text())
        e.meta_path.write_text(json.dumps({**meta, "key": "0" * 64}))
    elif damage == "bad_json":
        e.meta_path.write_text("{not json")
    else:
        def load(path):
            raise ValueError("corrupt")
    capsys.readouterr()
    assert cache.load_or_build(make(tmp_path), lambda: ["fresh"], save_json, load) == ["fresh"]
    assert "damaged" in capsys.readouterr().out
    assert load_json(e.path) == ["fresh"] and e.exists()


def test_folder_artefacts_and_caching_off(tmp_path):
    e = make(tmp_path, ext="store")

    def save_dir(value, path):
        path.mkdir()
        (path / "a.txt").write_text(value)

    cache.load_or_build(e, lambda: "hello", save_dir, lambda p: (p / "a.txt").read_text())
    assert e.exists() and e.path.is_dir()
    # a damaged folder is replaced as a whole
    (e.path / "a.txt").write_text("hell")
    assert cache.load_or_build(e, lambda: "again", save_dir, lambda p: (p / "a.txt").read_text()) == "again"
    off = make(None)
    assert off.path is None and not off.exists() and off.key == make(tmp_path).key
    assert cache.load_or_build(off, lambda: 5, save_json, load_json) == 5


def _fill(root):
    for kind, n in (("reader", 1), ("reader", 2), ("digit_kv", 1)):
        cache.load_or_build(make(root, plugin="qwen-compressor", kind=kind, config=Cfg(n=n)),
                            lambda: list(range(1000)), save_json, load_json)
    cache.load_or_build(make(root, plugin="deq-hrr", kind="needle"), lambda: [1], save_json, load_json)


def test_cli_cache_list(tmp_path):
    env = {"ENGRAM_CACHE": str(tmp_path), "COLUMNS": "200"}
    r = run_cli("cache", "list", tool="engram", env=env)
    assert r.returncode == 0 and "0 entries" in r.stdout
    _fill(tmp_path)
    r = run_cli("cache", "list", tool="engram", env=env)
    assert r.returncode == 0, r.stderr
    assert "qwen-compressor" in r.stdout and "digit_kv" in r.stdout and "4 entries" in r.stdout
    assert "KiB" in r.stdout and "n=2" in r.stdout
    r = run_cli("cache", "list", "--json", tool="engram", env=env)
    data = json.loads(r.stdout)
    assert len(data["entries"]) == 4 and data["total_size"] == sum(x["size"] for x in data["entries"])
    reader = [x for x in data["entries"] if x["kind"] == "reader"][0]
    assert reader["plugin"] == "qwen-compressor" and len(reader["key"]) == 16 and reader["created"]
    assert reader["meta"]["config"]["n"] in (1, 2) and not reader["damaged"]


def test_cli_cache_clear_pattern_then_all(tmp_path):
    env = {"ENGRAM_CACHE": str(tmp_path)}
    _fill(tmp_path)
    before = {p.name for p in (tmp_path / "qwen-compressor").iterdir()}
    r = run_cli("cache", "clear", "qwen-compressor/reader-*", tool="engram", env=env)  # not a terminal: no question
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("remove qwen-compressor/reader-") == 2 and "removed 2 entries, freed" in r.stdout
    after = {p.name for p in (tmp_path / "qwen-compressor").iterdir()}
    assert after == {n for n in before if n.startswith("digit_kv-")} and len(after) == 2  # artefact + sidecar
    r = run_cli("cache", "clear", "nothing-*", tool="engram", env=env)
    assert r.returncode == 0 and "nothing to remove" in r.stdout
    r = run_cli("cache", "clear", "deq-hrr", "--yes", tool="engram", env=env)  # a bare plugin name: all of it
    assert "removed 1 entries" in r.stdout and not list((tmp_path / "deq-hrr").iterdir())
    r = run_cli("cache", "clear", "--yes", tool="engram", env=env)
    assert "removed 1 entries" in r.stdout
    freed = int(r.stdout.rsplit("(", 1)[1].split()[0])
    assert freed > 0
    assert json.loads(run_cli("cache", "list", "--json", tool="engram", env=env).stdout)["entries"] == []


def test_cli_cache_lists_and_clears_orphans(tmp_path):
    env = {"ENGRAM_CACHE": str(tmp_path)}
    (tmp_path / "llm-hash").mkdir()
    (tmp_path / "llm-hash" / "exact_match-0123456789abcdef.jsonl").write_text("old, no sidecar\n")
    r = run_cli("cache", "list", "--json", tool="engram", env=env)
    (item,) = json.loads(r.stdout)["entries"]
    assert item["damaged"] and item["kind"] == "exact_match" and item["key"] == "0123456789abcdef"
    r = run_cli("cache", "clear", "llm-hash/exact_match-*", tool="engram", env=env)
    assert "removed 1 entries" in r.stdout and not list((tmp_path / "llm-hash").iterdir())


def test_a_second_builder_keeps_the_first_complete_entry(tmp_path):
    """Two runs that miss at once both build; the one that finishes second must not remove the
    entry the first is already reading (it did, for folder stores: a KeyError mid-read)."""
    e = make(tmp_path, ext="store")

    def save_dir(value, path):
        path.mkdir()
        (path / "a.txt").write_text(value)

    cache.save(e, "first", save_dir)
    inode = (e.path / "a.txt").stat().st_ino
    cache.save(e, "second", save_dir)  # the late builder
    assert (e.path / "a.txt").read_text() == "first" and (e.path / "a.txt").stat().st_ino == inode
    assert e.exists() and not [p for p in tmp_path.rglob("*") if ".tmp" in p.name or ".old-" in p.name]


def test_concurrent_builders_build_once(tmp_path):
    """Runs that miss at once wait on the entry's lock: one builds, the others load it (the
    zarr store race: a second builder removed the store a first run was reading)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    with ctx.Pool(3) as pool:
        out = pool.map(_build_slowly, [str(tmp_path)] * 3)
    assert sorted(out) == ["built", "loaded", "loaded"]
    assert [p.name for p in cache_listing.scan(tmp_path)] == [make(tmp_path).name]


def _build_slowly(root):
    import time

    e = make(root)
    built = []

    def build():
        built.append(1)
        time.sleep(0.5)
        return [1, 2]

    cache.load_or_build(e, build, save_json, load_json)
    return "built" if built else "loaded"
