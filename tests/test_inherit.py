"""Recipe inheritance (`extends`): merge rules, errors naming the file, cycles, origins."""

import tomllib
from pathlib import Path

import pytest

from engram_core.errors import RecipeError
from engram_core.recipe import load_recipe
from engram_core.recipe.explain import origins_by_key, print_config
from engram_core.recipe.extends import load_tree
from engram_core.testing.cli import run_cli

MINIMAL = (Path(__file__).resolve().parents[1] / "recipes" / "minimal.toml").read_text()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def base(tmp_path):
    return write(tmp_path / "bases" / "base.toml", MINIMAL)


def test_tables_merge_lists_replace_and_patches_address_items(tmp_path, base):
    child = write(tmp_path / "child.toml", """
extends = ["bases/base.toml"]
[head]
hidden = 32
[data]
length = "__delete__"
[stages.0]
steps = 7
objective = { min_logvar = -5.0 }
[stages.2]
name = "again"
kind = "eval"
[[metrics]]
type = "loss"
""")
    raw, origins = load_tree(child)
    assert "extends" not in raw
    assert raw["head"] == {"type": "mlp_gaussian", "hidden": 32, "layers": 2}  # deep merge
    assert "length" not in raw["data"] and raw["data"]["dim"] == 8  # __delete__
    assert raw["stages"][0]["steps"] == 7 and raw["stages"][0]["lr"] == 3e-3  # patched item
    assert raw["stages"][0]["objective"] == {"type": "gaussian_nll", "min_logvar": -5.0}
    assert [s["name"] for s in raw["stages"]] == ["train", "final", "again"]  # appended
    assert raw["metrics"] == [{"type": "loss"}]  # a list is replaced whole
    assert origins.of(("head", "hidden")) == str(child)
    assert origins.of(("head", "layers")) == str(base)
    assert origins.of(("stages", "0", "lr")) == str(base)
    assert origins.of(("stages", "2", "name")) == str(child)


def test_bases_merge_left_to_right_then_the_recipe(tmp_path, base):
    write(tmp_path / "bases" / "wide.toml", "[head]\nhidden = 128\nlayers = 3\n")
    write(tmp_path / "bases" / "deep.toml", "[head]\nlayers = 5\n")
    child = write(tmp_path / "child.toml", 'extends = ["bases/base.toml", "bases/wide.toml", "bases/deep.toml"]\n[run]\nseed = 3\n')
    raw, origins = load_tree(child)
    assert raw["head"] == {"type": "mlp_gaussian", "hidden": 128, "layers": 5}
    assert origins.of(("head", "hidden")).endswith("wide.toml") and origins.of(("head", "layers")).endswith("deep.toml")
    assert load_recipe(child).run.seed == 3


def test_item_deletion_replace_and_memory_none(tmp_path, base):
    write(tmp_path / "with_memory.toml", 'extends = ["bases/base.toml"]\n[memory]\ntype = "x"\nsize = 3\n')
    child = write(tmp_path / "child.toml", """
extends = ["with_memory.toml"]
memory = "none"
[stages]
0 = "__delete__"
[stages.1]
__replace__ = true
name = "only"
kind = "eval"
""")
    raw, origins = load_tree(child)
    assert "memory" not in raw
    assert raw["stages"] == [{"name": "only", "kind": "eval"}]
    assert origins.of(("stages", "0", "name")) == str(child)  # indices moved with the deletion
    assert origins.of(("stages", "1", "name")) is None


def _one_error(r, *words):
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_a_cycle_is_one_line_exit_2(tmp_path):
    write(tmp_path / "a.toml", 'extends = ["b.toml"]\n')
    write(tmp_path / "b.toml", 'extends = ["a.toml"]\n')
    line = _one_error(run_cli(tmp_path / "a.toml", "--dry-run"), "extends", "cycle", "a.toml", "b.toml")
    assert line.count("->") == 2


def test_a_missing_base_is_one_line_exit_2(tmp_path):
    write(tmp_path / "a.toml", 'extends = ["nowhere.toml"]\n')
    _one_error(run_cli(tmp_path / "a.toml", "--dry-run"), "a.toml: extends:", "base recipe not found: nowhere.toml")


def test_extends_must_name_files(tmp_path):
    write(tmp_path / "a.toml", "extends = [1]\n")
    _one_error(run_cli("validate", tmp_path / "a.toml", tool="engram"), "extends", "list of recipe paths")


def test_an_index_past_the_end_names_the_file(tmp_path, base):
    child = write(tmp_path / "child.toml", 'extends = ["bases/base.toml"]\n[stages.5]\nsteps = 1\n')
    with pytest.raises(RecipeError) as exc:
        load_tree(child)
    assert str(child) in str(exc.value) and "stages.5" in str(exc.value) and "2 items" in str(exc.value)


def test_errors_name_the_file_each_value_came_from(tmp_path, base):
    write(tmp_path / "bases" / "bad.toml", 'extends = ["base.toml"]\n[head]\nhidden = -4\n')
    child = write(tmp_path / "child.toml", 'extends = ["bases/bad.toml"]\n[run]\nprecision = "fp64"\n')
    r = run_cli("validate", child, tool="engram")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2, r.stderr
    bad = next(line for line in lines if "head.hidden" in line)
    assert bad.startswith(f"error: {tmp_path / 'bases' / 'bad.toml'}: head.hidden: must be > 0") and f"inherited by {child}" in bad
    own = next(line for line in lines if "run.precision" in line)
    assert own.startswith(f"error: {child}: run.precision")


def test_print_config_shows_every_origin_and_is_the_recipe(tmp_path, base):
    child = write(tmp_path / "child.toml", 'extends = ["bases/base.toml"]\n[head]\nhidden = 32\n')
    recipe = load_recipe(child, ["stages.0.steps=9"])
    where = origins_by_key(recipe)
    assert where["head.hidden"] == "recipe"
    assert where["head.layers"] == f"base {base}"
    assert where["stages.0.steps"] == "override stages.0.steps=9"
    assert where["stages.0.momentum"] == "default" and where["run.out_dir"] == "default"
    text = print_config(recipe)
    assert any(line.startswith("hidden = 32 ") and line.endswith("# recipe") for line in text.splitlines())
    assert tomllib.loads(text) == recipe.to_dict()  # the commented output is the resolved recipe
    r = run_cli(child, "stages.0.steps=9", "--print-config")
    assert r.returncode == 0 and r.stdout == text
    r = run_cli("validate", child, "--print-config", tool="engram")
    assert r.returncode == 0 and r.stdout.startswith(print_config(load_recipe(child))) and "ok (2" in r.stdout


def test_the_run_directory_recipe_stands_alone(tmp_path, base):
    child = write(tmp_path / "child.toml", 'extends = ["bases/base.toml"]\n[stages.0]\nsteps = 4\neval_every = 0\ncheckpoint_every = 0\nwarmup_steps = 0\n[data]\nn_sequences = 8\nlength = 8\n')
    r = run_cli(child, "--out", tmp_path / "runs", "--quiet")
    assert r.returncode == 0, r.stderr
    written = next((tmp_path / "runs").rglob("recipe.toml"))
    assert "extends" not in written.read_text()
    moved = write(tmp_path / "elsewhere" / "recipe.toml", written.read_text())  # no base next to it
    assert load_recipe(moved).to_dict() == load_recipe(child, [f'run.out_dir="{tmp_path / "runs"}"']).to_dict()
    r = run_cli(moved, "--out", tmp_path / "runs2", "--quiet")
    assert r.returncode == 0, r.stderr
