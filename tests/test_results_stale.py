"""A results row's recorded resolved recipe is checked against today's code (CI), and
`engram results stale` lists the rows whose code path changed since their commit.

No training runs here: each test builds a tiny checkout (a git repository in tmp_path with a
page, a recipe that extends a base, and a row JSON written by hand)."""

import json
import subprocess
import tomllib
from pathlib import Path

import pytest

from engram_core.testing.cli import run_cli
from engram_core.tools import results as R
from engram_core.tools import row_recipe, stale

BASE = """\
[run]
name = "r"
device = "cpu"

[data]
type = "synthetic_dynamics"
dim = 4
n_sequences = 8
length = 16

[head]
type = "mlp_gaussian"
hidden = 8
layers = 1

[[stages]]
name = "train"
objective = { type = "gaussian_nll" }
steps = 20
batch_size = 4

[[metrics]]
type = "loss"
"""

RECIPE = """\
extends = "bases/base.toml"

[head]
hidden = 16
"""

OVERRIDES = ["stages.0.steps=5"]


def git(root, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=root,
                          check=True, capture_output=True, text=True).stdout.strip()


def commit_all(root, message):
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", message)
    return git(root, "rev-parse", "HEAD")


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def row_json(root, commit, resolved: str | None = "today", **extra) -> dict:
    d = {"page": "fake", "row": "r", "label": "", "recipe": "recipes/r.toml", "overrides": OVERRIDES, "point": None,
         "seeds": [0], "commit": commit, "dirty": [], "device": ["cpu"], "wall_time_s": [1.0], "status": ["completed"],
         "metrics": {}, "runs": [{"seed": 0, "status": "completed", "wall_time_s": 1.0, "metrics": {}, "curves": {}}]}
    if resolved == "today":
        resolved = row_recipe.text_today(row_recipe.resolve_today(root / "recipes/r.toml", OVERRIDES, None))
    if resolved is not None:
        d["resolved_recipe"] = resolved
    d.update(extra)
    write(root / "docs/results/data/fake/r.json", json.dumps(d, indent=2))
    return d


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A checkout at its first commit: a page `fake`, its recipe (extending a base), a kernel
    file, a tools file and a README; the row JSON is the test's to write."""
    root = tmp_path / "repo"
    write(root / "docs/results/fake.toml", '[[rows]]\nid = "r"\nrecipe = "recipes/r.toml"\noverrides = ["stages.0.steps=5"]\nseeds = [0]\n')
    write(root / "docs/results/fake.md", "# fake\n\nNo tables.\n")
    write(root / "recipes/bases/base.toml", BASE)
    write(root / "recipes/r.toml", RECIPE)
    write(root / "recipes/other.toml", BASE)
    write(root / "engram_core/registry.py", "# kernel\n")
    write(root / "engram_core/tools/results.py", "# the pipeline\n")
    write(root / "README.md", "readme\n")
    git(root, "init", "-q")
    first = commit_all(root, "first")
    monkeypatch.setenv(R.CHECKOUT_ENV, str(root))
    return root, first


def page_problems(root):
    return R.check_page(R.load_page("fake", root / "docs/results"))


def stale_report(root):
    return stale.stale_rows(root, {"fake": R.load_data(R.load_page("fake", root / "docs/results"))})


# ---- the recorded resolved recipe ------------------------------------------------------


def test_the_record_holds_defaults_and_leaves_out_the_pipelines_per_run_keys(checkout):
    root, _ = checkout
    text = row_recipe.text_today(row_recipe.resolve_today(root / "recipes/r.toml", OVERRIDES, None))
    tables = tomllib.loads(text)
    assert tables["head"]["hidden"] == 16 and tables["stages"][0]["steps"] == 5  # the recipe and the override
    assert tables["stages"][0]["weight_decay"] == 0.0 and tables["stages"][0]["schedule"] == "constant"  # defaults
    assert "seed" not in tables["run"] and "out_dir" not in tables["run"]
    run_dir = root / "run"
    write(run_dir / "recipe.toml", text.replace("[run]\n", '[run]\nseed = 7\nout_dir = "/tmp/x/seed7/runs"\n', 1))
    assert row_recipe.from_run_dir(run_dir) == text  # a run directory's recipe.toml, normalised


def test_a_row_whose_resolved_recipe_equals_todays_passes_the_check(checkout):
    root, first = checkout
    row_json(root, first)
    assert page_problems(root) == []


def test_a_changed_default_fails_the_check_naming_the_row_and_the_key(checkout):
    root, first = checkout
    today = row_recipe.text_today(row_recipe.resolve_today(root / "recipes/r.toml", OVERRIDES, None))
    assert "weight_decay = 0.0\n" in today
    row_json(root, first, resolved=today.replace("weight_decay = 0.0\n", "weight_decay = 0.01\n"))  # made when the default was 0.01
    problems = page_problems(root)
    assert len(problems) == 1, problems
    line = problems[0]
    assert "r.json: row r was made by another recipe" in line
    assert "stages.0.weight_decay 0.01 -> 0.0" in line
    assert "engram results run fake --rows r" in line


def test_an_edited_base_recipe_fails_the_check(checkout):
    root, first = checkout
    row_json(root, first)
    write(root / "recipes/bases/base.toml", BASE.replace("layers = 1", "layers = 2"))
    problems = page_problems(root)
    assert len(problems) == 1 and "head.layers 1 -> 2" in problems[0], problems


def test_a_row_made_before_resolved_recipes_is_not_a_check_failure_but_is_listed_stale(checkout):
    root, first = checkout
    row_json(root, first, resolved=None)
    assert page_problems(root) == []
    (row,) = stale_report(root)["rows"]
    assert row["reasons"] == [stale.NOT_RECORDED] and row["changed"] == []


def test_a_row_no_run_of_which_finished_is_listed_as_not_finished(checkout):
    # a sweep a device call's deadline stopped: the JSON records how far each point got, no
    # resolved recipe, and the row is still to be made (not an old row)
    root, first = checkout
    row_json(root, first, resolved=None, status=["timeout"], seeds=[0],
             runs=[{"seed": 0, "status": "timeout", "wall_time_s": 9.0, "points_reached": []}])
    assert page_problems(root) == []
    (row,) = stale_report(root)["rows"]
    assert row["reasons"] == [f"{stale.NOT_FINISHED} (status: timeout)"] and row["changed"] == []
    assert row["remake"] == "engram results run fake --rows r"


def test_the_pipeline_keeps_one_record_per_row_and_any_seed_that_differs():
    runs = [{"seed": 1, "status": "failed", "resolved_recipe": "b = 1\n"},
            {"seed": 0, "status": "completed", "resolved_recipe": "a = 1\n"},
            {"seed": 2, "status": "completed", "resolved_recipe": "a = 1\n"}]
    assert R._row_resolved_recipe(runs) == "a = 1\n"  # a completed run's
    assert [r.get("resolved_recipe") for r in runs] == ["b = 1\n", None, None]


# ---- engram results stale ----------------------------------------------------------------


@pytest.mark.parametrize("touched, listed", [
    ("recipes/bases/base.toml", True),   # a file the recipe extends
    ("recipes/r.toml", True),            # the recipe itself
    ("engram_core/registry.py", True),   # the kernel
    ("engram_core/tools/results.py", False),  # the commands: not on a run's path
    ("README.md", False),
    ("recipes/other.toml", False),       # another recipe
])
def test_stale_lists_a_row_only_when_a_file_on_its_path_changed(checkout, touched, listed):
    root, first = checkout
    row_json(root, first)
    path = root / touched
    path.write_text(path.read_text() + "# touched\n")
    commit_all(root, "second")
    report = stale_report(root)
    assert report["checked"] == 1
    if listed:
        (row,) = report["rows"]
        assert row["changed"] == [touched] and row["commit"] == first
        assert row["reasons"] == [f"1 file on its path changed ({touched})"]
        line = stale.format_report(report)[0]
        assert line.startswith(f"fake  r  {first[:9]}  1 file on its path changed ({touched})")
    else:
        assert report["rows"] == []


def test_a_renamed_file_counts_as_changed_under_both_names(checkout):
    root, first = checkout
    row_json(root, first)
    git(root, "mv", "engram_core/registry.py", "engram_core/registries.py")  # a move with no edit
    git(root, "mv", "recipes/bases/base.toml", "recipes/bases/renamed.toml")
    write(root / "recipes/r.toml", RECIPE.replace("bases/base.toml", "bases/renamed.toml"))
    commit_all(root, "rename")
    (row,) = stale_report(root)["rows"]
    # today's path holds the new base; the kernel folder holds both of the moved file's names
    assert set(row["changed"]) == {"recipes/bases/renamed.toml", "recipes/r.toml",
                                   "engram_core/registry.py", "engram_core/registries.py"}
    assert all(f.startswith("recipes/") for f in row["changed"][:2])  # the most specific files first


def test_a_commit_missing_from_history_is_reported_not_fatal(checkout):
    root, _ = checkout
    row_json(root, "0123456789" * 4)
    (row,) = stale_report(root)["rows"]
    assert row["reasons"] == [stale.COMMIT_NOT_FOUND]


def test_plugin_folders_come_from_the_registry_components_modules(checkout, monkeypatch):
    root, _ = checkout
    write(root / "plugins/fake/engram_fake_stale/__init__.py", "")
    write(root / "plugins/fake/engram_fake_stale/memory.py", "def factory(cfg):\n    return cfg\n")
    monkeypatch.syspath_prepend(str(root / "plugins/fake"))
    recipe = row_recipe.resolve_today(root / "recipes/r.toml", OVERRIDES, None)
    modules = stale.used_modules(recipe, core_registry())
    assert modules and all(m.startswith("engram_core.") for m in modules)  # core components only: the kernel's
    monkeypatch.setattr(stale, "used_modules", lambda recipe, registry: modules | {"engram_fake_stale.memory"})
    path = stale.code_path(root, root / "recipes/r.toml", recipe)
    assert path.include == ("engram_core", "plugins/fake/engram_fake_stale", "recipes/r.toml", "recipes/bases/base.toml")
    assert path.holds("plugins/fake/engram_fake_stale/memory.py") and not path.holds("plugins/fake/README.md")
    assert not path.holds("engram_core/testing/contract.py")


def core_registry():
    from engram_core.registry import load_registry

    return load_registry()


def test_a_real_plugin_recipe_has_its_plugin_package_on_its_path():
    pytest.importorskip("engram_llm_hash")
    root = R.checkout()
    recipe = row_recipe.resolve_today(root / "recipes/exact_match.toml", [], None)
    path = stale.code_path(root, root / "recipes/exact_match.toml", recipe)
    assert "plugins/llm-hash/engram_llm_hash" in path.include
    assert "recipes/bases/llm_hash.toml" in path.include


def test_engram_results_stale_cli(checkout, tmp_path):
    root, first = checkout
    row_json(root, first)
    write(root / "engram_core/registry.py", "# kernel, edited\n")
    commit_all(root, "second")
    r = run_cli("results", "stale", tool="engram", env={R.CHECKOUT_ENV: str(root)})
    assert r.returncode == 0, r.stderr
    assert "fake  r  " in r.stdout and "engram_core/registry.py" in r.stdout
    assert "1 of 1 rows stale" in r.stdout and "engram results run fake --rows r" in r.stdout
    r = run_cli("results", "stale", "fake", "--json", tool="engram", env={R.CHECKOUT_ENV: str(root)})
    assert r.returncode == 0 and json.loads(r.stdout)["rows"][0]["changed"] == ["engram_core/registry.py"]
    r = run_cli("results", "stale", "nope", tool="engram", env={R.CHECKOUT_ENV: str(root)})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "no results page spec" in r.stderr
    not_git = tmp_path / "copy"
    write(not_git / "docs/results/fake.toml", (root / "docs/results/fake.toml").read_text())
    r = run_cli("results", "stale", tool="engram", env={R.CHECKOUT_ENV: str(not_git)})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "not a git checkout" in r.stderr, r.stderr


def test_an_option_added_at_its_default_is_not_a_difference():
    """A config key the record lacks, holding its default today (an option added since the row
    was made), does not fail the check; the same key at another value does."""

    import tomli_w

    from engram_core.recipe import load_recipe

    minimal = Path(__file__).resolve().parents[1] / "recipes" / "minimal.toml"
    for override, expected in (([], []), (["stages.0.momentum=0.5"], ["stages.0.momentum"])):
        r = load_recipe(minimal, override)
        today = row_recipe.text_today(r)
        tables = tomllib.loads(today)
        del tables["stages"][0]["momentum"]  # as a row made before the key existed records it
        recorded = tomli_w.dumps(tables)
        assert [k for k, _, _ in row_recipe.differences(recorded, today, r)] == expected
        assert [k for k, _, _ in row_recipe.differences(recorded, today)] == ["stages.0.momentum"]  # without the recipe: strict


def test_the_core_lm_plugin_is_on_the_path_only_of_rows_that_use_it(checkout, monkeypatch):
    """engram_core/lm is a plugin of engram-core's own that the kernel never imports: a row
    that uses none of its components does not go stale when the general LM's code changes."""
    root, _ = checkout
    recipe = row_recipe.resolve_today(root / "recipes/r.toml", OVERRIDES, None)
    plain = stale.code_path(root, root / "recipes/r.toml", recipe)
    assert not plain.holds("engram_core/lm/pretrain.py") and not plain.holds("engram_core/lm/plugin.py")
    assert plain.holds("engram_core/registry.py") and plain.holds("engram_core/tables/rowwise.py")
    modules = stale.used_modules(recipe, core_registry())
    monkeypatch.setattr(stale, "used_modules", lambda recipe, registry: modules | {"engram_core.lm.components"})
    using = stale.code_path(root, root / "recipes/r.toml", recipe)
    assert "engram_core/lm" in using.include
    assert using.holds("engram_core/lm/pretrain.py") and using.holds("engram_core/registry.py")
    assert not using.holds("engram_core/tools/results.py")


def test_a_general_lm_recipe_has_the_core_lm_plugin_on_its_path():
    pytest.importorskip("transformers")
    root = R.checkout()
    recipe = row_recipe.resolve_today(root / "recipes/general_lm.toml", [], None)
    path = stale.code_path(root, root / "recipes/general_lm.toml", recipe)
    assert "engram_core/lm" in path.include and path.holds("engram_core/lm/components.py")


def test_a_change_declared_results_neutral_leaves_the_row_current_until_another_commit_touches_it(checkout):
    root, first = checkout
    row_json(root, first)
    write(root / "engram_core/registry.py", "# kernel, a fix on a path no row took\n")
    fix = commit_all(root, "fix")
    assert [r["row"] for r in stale_report(root)["rows"]] == ["r"]
    write(root / "docs/results-neutral.toml",
          f'[[commits]]\ncommit = "{fix[:10]}"\nfiles = ["engram_core/registry.py"]\nwhy = "runs only on a path no row took"\n')
    commit_all(root, "declare")
    report = stale_report(root)
    assert report["rows"] == [] and report["neutral_rows"] == 1
    assert "declared results-neutral" in stale.format_report(report)[-1]
    write(root / "engram_core/registry.py", "# kernel, changed again\n")
    commit_all(root, "another change")
    (row,) = stale_report(root)["rows"]
    assert row["changed"] == ["engram_core/registry.py"] and row["neutral"] == []


def test_a_neutral_declaration_must_name_a_file_its_commit_changed(checkout):
    root, first = checkout
    row_json(root, first)
    write(root / "docs/results-neutral.toml",
          f'[[commits]]\ncommit = "{first}"\nfiles = ["engram_core/nothing.py"]\nwhy = "x"\n')
    with pytest.raises(R.RecipeError, match="does not change engram_core/nothing.py"):
        stale_report(root)
    write(root / "docs/results-neutral.toml", '[[commits]]\ncommit = "0123456789abcdef"\nfiles = ["a"]\nwhy = "x"\n')
    with pytest.raises(R.RecipeError, match="is not a commit of this repository"):
        stale_report(root)
