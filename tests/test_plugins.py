"""Plugin loading: entry points one at a time, broken plugins reported, duplicates and
misspelled hooks caught at start-up, ENGRAM_PLUGINS limits what loads."""

import json
import os
import subprocess
import sys
import types

import attrs
import pytest

from engram_core import hookimpl
from engram_core.errors import PluginError, RecipeError
from engram_core.registry import load_registry


@attrs.frozen
class Empty:
    pass


def make_module(name, **hooks):
    mod = types.ModuleType(name)
    for k, v in hooks.items():
        setattr(mod, k, v)
    return mod


def fake_dist(tmp_path, dist, entry, target):
    """A minimal installed distribution on a path, with one `engram` entry point."""
    info = tmp_path / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[engram]\n{entry} = {target}\n")


def cli(args, tmp_path, plugins=None):
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if plugins is not None:
        env["ENGRAM_PLUGINS"] = plugins
    else:
        env.pop("ENGRAM_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", "engram_core.cli", *args], capture_output=True, text=True, env=env)


def test_broken_plugin_is_listed_and_others_still_work(tmp_path):
    fake_dist(tmp_path, "broken_pkg", "broken", "module_that_does_not_exist_xyz")
    (tmp_path / "good_plugin_xyz.py").write_text(
        "import attrs\nfrom engram_core import hookimpl\n"
        "@attrs.frozen\nclass C:\n    pass\n"
        "class M:\n    def __init__(self, c, b):\n        pass\n"
        "@hookimpl\ndef engram_metrics(register):\n    register('good_metric', M, C)\n"
    )
    fake_dist(tmp_path, "good_pkg", "good", "good_plugin_xyz")
    r = cli(["plugins", "--json"], tmp_path, plugins="broken,good")
    assert r.returncode == 0, r.stderr
    plugins = {p["name"]: p for p in json.loads(r.stdout)}
    assert plugins["broken"]["broken"] and "module_that_does_not_exist_xyz" in plugins["broken"]["error"]
    assert not plugins["good"]["broken"] and plugins["good"]["components"] == ["metric good_metric"]
    table = cli(["plugins"], tmp_path, plugins="broken,good")
    assert "broken" in table.stdout and "good_metric" in table.stdout


def test_env_var_limits_which_plugins_load(tmp_path):
    fake_dist(tmp_path, "broken_pkg", "broken", "module_that_does_not_exist_xyz")
    r = cli(["plugins", "--json"], tmp_path, plugins="")
    assert [p["name"] for p in json.loads(r.stdout)] == ["core", "engram-lm", "engram-tables", "engram-tools"]  # the core and its own optional parts


def test_recipe_needing_a_broken_plugin_says_so(tmp_path):
    fake_dist(tmp_path, "broken_pkg", "broken", "module_that_does_not_exist_xyz")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[data]\ntype = "broken:thing"\n[head]\ntype = "mlp_gaussian"\n[[stages]]\nkind = "eval"\n')
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "ENGRAM_PLUGINS": "broken"}
    r = subprocess.run([sys.executable, "-c", "from engram_core.cli import run_main; raise SystemExit(run_main())", str(recipe), "--dry-run"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    warning, error = r.stderr.strip().splitlines()
    assert warning.startswith("warning: plugin 'broken' is broken")
    assert "plugin 'broken', which is broken" in error


def test_misspelled_hook_is_a_start_up_error():
    @hookimpl
    def engram_memorys(register):  # noqa: ARG001 - misspelt on purpose
        pass

    reg = load_registry(extra={"typo": make_module("typo", engram_memorys=engram_memorys)})
    assert reg.plugins["typo"].broken
    assert "engram_memorys" in reg.plugins["typo"].error


def test_duplicate_qualified_name_names_both():
    class A:
        pass

    @hookimpl
    def engram_heads(register):
        register("twin", A, Empty)
        register("twin", A, Empty)

    with pytest.raises(PluginError, match="registered twice"):
        load_registry(extra={"dup": make_module("dup", engram_heads=engram_heads)})


def test_ambiguous_short_name_lists_candidates():
    class A:
        pass

    @hookimpl
    def engram_heads(register):
        register("mlp_gaussian", A, Empty)

    reg = load_registry(extra={"other": make_module("other", engram_heads=engram_heads)})
    with pytest.raises(RecipeError) as exc:
        reg.resolve("heads", "mlp_gaussian", "head.type")
    msg = str(exc.value)
    assert "ambiguous" in msg and "core:mlp_gaussian" in msg and "other:mlp_gaussian" in msg
    assert reg.resolve("heads", "other:mlp_gaussian", "head.type").plugin == "other"


def test_capability_mismatch_is_one_line_naming_both():
    from engram_core.recipe import resolve

    class Mem:  # implements the layer point (registration checks it)
        def layer_indices(self):
            return (0,)

        def apply_layer(self, index, hidden, ids):
            return hidden

    class Obj:
        pass

    @hookimpl
    def engram_memories(register):
        register("layer_mem", Mem, Empty, points=("layer",))

    @hookimpl
    def engram_objectives(register):
        register("needs_lm", Obj, Empty, requires=("causal_lm",))

    reg = load_registry(extra={"caps": make_module("caps", engram_memories=engram_memories, engram_objectives=engram_objectives)})
    raw = {"data": {"type": "synthetic_dynamics"}, "head": {"type": "mlp_gaussian"}, "memory": {"type": "layer_mem"},
           "stages": [{"objective": {"type": "needs_lm"}, "steps": 1}]}
    with pytest.raises(RecipeError) as exc:
        resolve(raw, reg, "r.toml")
    lines = exc.value.lines()
    assert any("memory 'layer_mem' attaches at 'layer', but head 'mlp_gaussian' offers 'residual'" in l for l in lines)
    assert any("objective 'needs_lm' requires 'causal_lm', but head 'mlp_gaussian' provides 'dynamics'" in l for l in lines)


def test_describe_lists_every_config_key():
    from engram_core.testing.cli import run_cli

    r = run_cli("describe", "head", "mlp_gaussian", tool="engram")
    assert r.returncode == 0
    for key in ("hidden", "layers", "min_log_sigma", "width of each hidden layer", "128"):
        assert key in r.stdout
    bad = run_cli("describe", "head", "mlp", tool="engram")
    assert bad.returncode == 2 and "unknown head" in bad.stderr


def test_earlier_point_keywords_still_register_with_a_warning():
    """`offers=` (a head's points) and a memory's `provides=` (its points) are the earlier
    spellings of `points=`: they register as before, for one release, with a warning."""
    import types

    from engram_core.registry import PluginInfo, Registry

    class Mem:
        def layer_indices(self):
            return (0,)

        def apply_layer(self, index, hidden, ids):
            return hidden

    plugin = types.ModuleType("earlier_keywords")

    @hookimpl
    def engram_heads(register):
        register("old_head", object, Empty, provides=("causal_lm",), offers=("layer",))

    @hookimpl
    def engram_memories(register):
        register("old_mem", Mem, Empty, provides=("layer",))

    plugin.engram_heads, plugin.engram_memories = engram_heads, engram_memories
    reg = Registry()
    with pytest.warns(DeprecationWarning, match="offers= is now points="):
        reg.add_plugin("earlier", plugin, PluginInfo("earlier", "earlier_keywords"))
    head = reg.components["heads"]["earlier:old_head"]
    mem = reg.components["memories"]["earlier:old_mem"]
    assert head.points == ("layer",) and head.provides == ("causal_lm",)
    assert mem.points == ("layer",) and mem.provides == ("layer",)  # read as both, as before
