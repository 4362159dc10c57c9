"""Every recipe error: one line per problem naming file and key path, exit 2, no traceback."""

from pathlib import Path

import pytest

from engram_core.testing.cli import run_cli

MINIMAL = Path(__file__).resolve().parents[1] / "recipes" / "minimal.toml"


def write(tmp_path, text, name="r.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def edited(tmp_path, old, new):
    text = MINIMAL.read_text()
    assert old in text
    return write(tmp_path, text.replace(old, new))


def one_line_error(result, *needles):
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, lines
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_toml_syntax_error_names_the_line(tmp_path):
    p = write(tmp_path, '[run]\nname = "x"\n[data\n')
    one_line_error(run_cli(p, "--dry-run"), "r.toml", "TOML syntax error", "line 3")


def test_unknown_key_suggests_the_closest(tmp_path):
    p = edited(tmp_path, "hidden = 64", "hiden = 64")
    one_line_error(run_cli(p, "--dry-run"), "r.toml: head.hiden: unknown key", "did you mean 'hidden'")


def test_unknown_key_in_nested_stage_table(tmp_path):
    p = edited(tmp_path, "grad_clip = 1.0", "grad_clipp = 1.0")
    one_line_error(run_cli(p, "--dry-run"), "stages.0.grad_clipp", "grad_clip")


def test_wrong_type(tmp_path):
    p = edited(tmp_path, "lr = 3e-3", 'lr = "fast"')
    one_line_error(run_cli(p, "--dry-run"), "stages.0.lr", "expected a number")


def test_float_is_not_an_int(tmp_path):
    p = edited(tmp_path, "steps = 600", "steps = 60.5")
    one_line_error(run_cli(p, "--dry-run"), "stages.0.steps", "expected an integer")


def test_value_out_of_range(tmp_path):
    p = edited(tmp_path, "steps = 600", "steps = -5")
    one_line_error(run_cli(p, "--dry-run"), "stages.0.steps", "must be > 0")


def test_unknown_component_with_suggestion(tmp_path):
    p = edited(tmp_path, 'type = "mlp_gaussian"', 'type = "mlp_gausian"')
    one_line_error(run_cli(p, "--dry-run"), "head.type", "unknown head 'mlp_gausian'", "did you mean 'mlp_gaussian'")


def test_missing_required_key(tmp_path):
    p = edited(tmp_path, "steps = 600\n", "")
    one_line_error(run_cli(p, "--dry-run"), "stages.0.steps", "missing required key")


def test_missing_required_table(tmp_path):
    text = MINIMAL.read_text().replace('[head]\ntype = "mlp_gaussian"\nhidden = 64\nlayers = 2\n', "")
    one_line_error(run_cli(write(tmp_path, text), "--dry-run"), "head", "missing required table")


def test_override_of_a_path_that_does_not_exist():
    one_line_error(run_cli(MINIMAL, "stages.5.steps=3", "--dry-run"), "stages.5", "out of range")
    one_line_error(run_cli(MINIMAL, "memory.k=3", "--dry-run"), "memory", "no 'memory'")
    one_line_error(run_cli(MINIMAL, "head.hidn=3", "--dry-run"), "head.hidn: unknown key", "hidden")
    one_line_error(run_cli(MINIMAL, "nosuch.x=3", "--dry-run"), "no such section")


def test_missing_data_path():
    one_line_error(run_cli(MINIMAL, "data.path=/nonexistent/z.npy", "--dry-run"), "data.path", "does not exist")


def test_recipe_file_not_found(tmp_path):
    one_line_error(run_cli(tmp_path / "nope.toml"), "nope.toml", "not found")


def test_a_recipe_cannot_name_an_import_path(tmp_path):
    p = edited(tmp_path, 'type = "mlp_gaussian"', 'type = "os.system"')
    one_line_error(run_cli(p, "--dry-run"), "head.type", "unknown head")


def test_several_problems_are_all_reported(tmp_path):
    text = MINIMAL.read_text().replace("hidden = 64", "hiden = 64").replace("lr = 3e-3", 'lr = "x"')
    r = run_cli(write(tmp_path, text), "--dry-run")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2 and any("head.hiden" in l for l in lines) and any("stages.0.lr" in l for l in lines)


def test_unmatched_parameter_glob_fails_before_training(tmp_path):
    r = run_cli(MINIMAL, 'stages.0.train=["nothing*"]', "--out", tmp_path)
    one_line_error(r, "stages.0.train.0", "matches no parameter")
    assert not (tmp_path / "minimal").exists() or not any((tmp_path / "minimal").iterdir())


@pytest.mark.parametrize("override,needle", [
    ("run.device=gpu", "run.device"),
    ('stages.1.kind="evl"', "did you mean 'eval'"),
    ('metrics.0.type="los"', "did you mean 'loss'"),
    ('stages.0.schedule="cosin"', "did you mean 'cosine'"),
])
def test_more_bad_values(override, needle):
    one_line_error(run_cli(MINIMAL, override, "--dry-run"), needle)


def test_override_keys_follow_toml_dotted_key_rules():
    from engram_core.recipe import apply_override, split_key

    assert split_key('sweep."stages.2.steps"') == ["sweep", "stages.2.steps"]
    raw = {"data": {"type": "x"}, "stages": [{"steps": 1}]}
    apply_override(raw, "data.synthetic.dim", 512)  # nested table left to its defaults
    apply_override(raw, 'sweep."stages.0.steps"', [1, 2])
    assert raw["data"]["synthetic"] == {"dim": 512} and raw["sweep"] == {"stages.0.steps": [1, 2]}


def test_options_may_come_between_overrides(tmp_path):
    r = run_cli(MINIMAL, "--dry-run", "head.hidden=32")
    assert r.returncode == 0 and "hidden = 32" in r.stdout
