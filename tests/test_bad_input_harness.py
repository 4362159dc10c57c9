"""A new user's mistakes, tried one by one against `engram validate` and `engram-run --dry-run`.

Each case is a malformed recipe or override of recipes/minimal.toml. Every one must give
exactly one line on stderr that names the recipe file and the dotted key (override syntax:
`stages.0.param_groups.0.lr`, never `[0]`), exit status 2, and no traceback — before any
training. The cases are the ones issue 11 lists plus the ordinary typos around them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engram_core.testing.cli import run_cli

MINIMAL = Path(__file__).resolve().parents[1] / "recipes" / "minimal.toml"

WS = 'stages.0.objective={ type = "weighted_sum", terms = %s }'

# (id, overrides, (old, new) text edit or None, key the line must name, more text the line must hold)
CASES: list[tuple[str, list[str], tuple[str, str] | None, str, str]] = [
    # tables, arrays and strings in the wrong place
    ("objective-list", [], ('objective = { type = "gaussian_nll" }', 'objective = ["gaussian_nll"]'), "stages.0.objective", "expected a table"),
    ("objective-override-broken", ["stages.0.objective={type="], None, "stages.0.objective", "expected a table"),
    ("objective-string", ['stages.0.objective="gaussian_nll"'], None, "stages.0.objective", "expected a table"),
    ("train-string", ['stages.0.train="head.*"'], None, "stages.0.train", "expected an array"),
    ("freeze-string", ['stages.0.freeze="head.mu.*"'], None, "stages.0.freeze", "expected an array"),
    ("metrics-filter-string", ['stages.0.metrics="loss"'], None, "stages.0.metrics", "expected an array"),
    ("param-groups-table", ['stages.0.param_groups={ params = ["head.*"], lr = 0.1 }'], None, "stages.0.param_groups", "expected an array"),
    ("param-group-params-string", ['stages.0.param_groups=[{ params = "head.*" }]'], None, "stages.0.param_groups.0.params", "expected an array"),
    ("param-group-missing-params", ["stages.0.param_groups=[{ lr = 0.1 }]"], None, "stages.0.param_groups.0.params", "missing required key"),
    ("param-group-unknown-key", ['stages.0.param_groups=[{ params = ["head.*"], optimiser = "sgd" }]'], None, "stages.0.param_groups.0.optimiser", "did you mean 'optimizer'"),
    ("param-group-lr-string", ['stages.0.param_groups=[{ params = ["head.*"], lr = "x" }]'], None, "stages.0.param_groups.0.lr", "expected a number"),
    ("param-group-not-table", ['stages.0.param_groups=["head.*"]'], None, "stages.0.param_groups.0", "expected a table"),
    ("head-string", ['head="mlp_gaussian"'], None, "head", "table"),
    ("run-string", ['run="fast"'], None, "run", "table"),
    ("stages-table", ["stages={ steps = 3 }"], None, "stages", "[[stages]]"),
    ("metrics-table", ['metrics={ type = "loss" }'], None, "metrics", "[[metrics]]"),
    ("hidden-array", ["head.hidden=[64]"], None, "head.hidden", "expected an integer"),
    ("hidden-bool", ["head.hidden=true"], None, "head.hidden", "expected an integer"),
    ("dim-string", ['data.dim="8"'], None, "data.dim", "expected an integer"),
    ("seed-float", ["run.seed=1.5"], None, "run.seed", "expected an integer"),
    ("memory-flag-string", ['stages.1.memory="yes"'], None, "stages.1.memory", "true or false"),
    ("batch-float", ["stages.0.batch_size=1.5"], None, "stages.0.batch_size", "expected an integer"),
    # optimiser settings
    ("betas-one", ["stages.0.betas=[0.9]"], None, "stages.0.betas", "2 values"),
    ("betas-three", ["stages.0.betas=[0.9, 0.99, 0.999]"], None, "stages.0.betas", "2 values"),
    ("betas-out-of-range", ["stages.0.betas=[1.5, 2.0]"], None, "stages.0.betas.0", "[0, 1)"),
    ("betas-strings", ['stages.0.betas=["a", 0.99]'], None, "stages.0.betas.0", "expected a number"),
    ("lr-inf", ["stages.0.lr=inf"], None, "stages.0.lr", "finite"),
    ("lr-nan", ["stages.0.lr=nan"], None, "stages.0.lr", "finite"),
    ("lr-negative", ["stages.0.lr=-1e-3"], None, "stages.0.lr", "> 0"),
    ("lr-zero", ["stages.0.lr=0"], None, "stages.0.lr", "> 0"),
    ("lr-word", ['stages.0.lr="fast"'], None, "stages.0.lr", "expected a number"),
    ("weight-decay-negative", ["stages.0.weight_decay=-0.1"], None, "stages.0.weight_decay", ">= 0"),
    ("weight-decay-inf", ["stages.0.weight_decay=inf"], None, "stages.0.weight_decay", "finite"),
    ("grad-clip-nan", ["stages.0.grad_clip=nan"], None, "stages.0.grad_clip", "finite"),
    ("momentum-too-big", ["stages.0.momentum=1.5"], None, "stages.0.momentum", "[0.0, 1.0]"),
    ("param-group-lr-inf", ['stages.0.param_groups=[{ params = ["head.*"], lr = inf }]'], None, "stages.0.param_groups.0.lr", "finite"),
    ("param-group-wd-negative", ['stages.0.param_groups=[{ params = ["head.*"], weight_decay = -1.0 }]'], None, "stages.0.param_groups.0.weight_decay", ">= 0"),
    ("min-lr-ratio", ["stages.0.min_lr_ratio=2.0"], None, "stages.0.min_lr_ratio", "[0.0, 1.0]"),
    ("warmup-negative", ["stages.0.warmup_steps=-1"], None, "stages.0.warmup_steps", ">= 0"),
    ("steps-zero", ["stages.0.steps=0"], None, "stages.0.steps", "> 0"),
    ("schedule-typo", ['stages.0.schedule="cosin"'], None, "stages.0.schedule", "did you mean 'cosine'"),
    ("optimizer-typo", ['stages.0.optimizer="adamm"'], None, "stages.0.optimizer", "did you mean"),
    # parameter patterns (checked against the built model)
    ("train-unmatched", ['stages.0.train=["nothing*"]'], None, "stages.0.train.0", "matches no parameter"),
    ("freeze-unmatched", ['stages.0.freeze=["nothing*"]'], None, "stages.0.freeze.0", "matches no parameter"),
    ("param-group-unmatched", ['stages.0.param_groups=[{ params = ["memory.*"], lr = 0.1 }]'], None, "stages.0.param_groups.0.params.0", "matches no parameter"),
    ("everything-frozen", ['stages.0.freeze=["*"]'], None, "stages.0.train", "no parameter trains"),
    # run settings
    ("name-parent", ['run.name="../x"'], None, "run.name", "plain folder name"),
    ("name-slash", ['run.name="a/b"'], None, "run.name", "plain folder name"),
    ("name-dotdot", ['run.name=".."'], None, "run.name", "plain folder name"),
    ("device-gpu", ['run.device="gpu"'], None, "run.device", "did you mean 'cuda'"),
    ("device-typo", ['run.device="cpuu"'], None, "run.device", "did you mean 'cpu'"),
    ("precision", ['run.precision="fp64"'], None, "run.precision", "'bf16'"),
    # components and their keys
    ("head-type-typo", ['head.type="mlp_gausian"'], None, "head.type", "did you mean 'mlp_gaussian'"),
    ("head-type-number", ["head.type=3"], None, "head.type", "expected a string"),
    ("head-key-typo", ["head.hiden=64"], None, "head.hiden", "did you mean 'hidden'"),
    ("head-layers-zero", ["head.layers=0"], None, "head.layers", "> 0"),
    ("data-dim-zero", ["data.dim=0"], None, "data.dim", "> 0"),
    ("data-too-few", ["data.n_sequences=2"], None, "data.n_sequences", "[4, inf]"),
    ("data-path-missing", ['data.path="/nonexistent/z.npy"'], None, "data.path", "does not exist"),
    ("plugin-not-enabled", ['data.type="exact_match"'], None, "data.type", "llm-hash"),
    ("metric-type-typo", ['metrics.0.type="los"'], None, "metrics.0.type", "did you mean 'loss'"),
    ("metric-key-zero", ["metrics.0.num_examples=0"], None, "metrics.0.num_examples", "> 0"),
    ("objective-type-typo", ['stages.0.objective={ type = "gausian_nll" }'], None, "stages.0.objective.type", "did you mean 'gaussian_nll'"),
    ("objective-unknown-key", ['stages.0.objective={ type = "gaussian_nll", scale = 2 }'], None, "stages.0.objective.scale", "unknown key"),
    # weighted_sum terms are recipe keys like any other
    ("ws-term-unknown-key", [WS % '[{ type = "gaussian_nll", sharpness = 1 }]'], None, "stages.0.objective.terms.0.sharpness", "unknown key"),
    ("ws-term-type-typo", [WS % '[{ type = "gaussian_nl" }]'], None, "stages.0.objective.terms.0.type", "did you mean 'gaussian_nll'"),
    ("ws-term-weight-word", [WS % '[{ type = "gaussian_nll", weight = "half" }]'], None, "stages.0.objective.terms.0.weight", "finite number"),
    ("ws-term-weight-inf", [WS % '[{ type = "gaussian_nll", weight = inf }]'], None, "stages.0.objective.terms.0.weight", "finite number"),
    ("ws-term-no-type", [WS % "[{ weight = 1.0 }]"], None, "stages.0.objective.terms.0.type", "missing required key"),
    ("ws-terms-string", [WS % '"gaussian_nll"'], None, "stages.0.objective.terms", "expected an array"),
    ("ws-terms-empty", [WS % "[]"], None, "stages.0.objective.terms", "at least one"),
    ("ws-term-not-table", [WS % '["gaussian_nll"]'], None, "stages.0.objective.terms.0", "expected a table"),
    # stages
    ("stage-kind-typo", ['stages.1.kind="evl"'], None, "stages.1.kind", "did you mean 'eval'"),
    ("stage-key-typo", ["stages.0.stpes=3"], None, "stages.0.stpes", "did you mean 'steps'"),
    ("stage-eval-split", ['stages.0.eval_split="test"'], None, "stages.0.eval_split", "no split 'test'"),
    ("stage-split", ['stages.0.split="valid"'], None, "stages.0.split", "no split 'valid'"),
    ("eval-stage-split", ['stages.1.split="test"'], None, "stages.1.split", "no split 'test'"),
    ("eval-batch-zero", ["stages.1.batch_size=0"], None, "stages.1.batch_size", "> 0"),
    ("stage-metric-filter", ['stages.0.metrics=["los"]'], None, "stages.0.metrics.0", "did you mean 'loss'"),
    ("duplicate-stage-name", ['stages.1.name="train"'], None, "stages.1.name", "duplicate"),
    ("fit-without-memory", ['stages.1={ kind = "fit", target = "memory" }'], None, "stages.1.target", "no [memory]"),
    ("fit-action-typo", ['stages.1={ kind = "fit", target = "head", action = "fitt" }'], None, "stages.1.action", "no action 'fitt'"),
    ("fit-target-typo", ['stages.1={ kind = "fit", target = "haed" }'], None, "stages.1.target", "did you mean 'head'"),
    # overrides themselves
    ("override-index-range", ["stages.5.steps=3"], None, "stages.5", "out of range"),
    ("override-not-index", ["stages.x.steps=3"], None, "stages.x", "not a list index"),
    ("override-section", ["stagess.0.steps=3"], None, "stagess.0.steps", "did you mean 'stages'"),
    ("override-no-memory", ["memory.k=3"], None, "memory", "no 'memory'"),
    ("override-no-equals", ["head.hidden"], None, "head.hidden", "key.path=value"),
    ("unknown-section", [], ("[run]", "[runn]"), "runn", "did you mean 'run'"),
    # sweeps
    ("sweep-not-list", ['sweep."head.hidden"=16'], None, "sweep.head.hidden", "non-empty list"),
    ("sweep-bad-point", ['sweep."head.hidden"=[16, -1]'], None, "head.hidden", "> 0"),
]


def _recipe(tmp_path: Path, edit: tuple[str, str] | None) -> Path:
    text = MINIMAL.read_text()
    if edit is not None:
        assert edit[0] in text, edit
        text = text.replace(edit[0], edit[1], 1)
    path = tmp_path / "user_recipe.toml"
    path.write_text(text)
    return path


def assert_one_line(result, file: str, *needles: str) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout[-500:], result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("error: ") and file in line, line
    for n in needles:
        assert n in line, (n, line)
    assert "[0]" not in line.split(": ", 2)[1], line  # keys use override syntax: stages.0, not [0]
    return line


def test_the_harness_tries_at_least_sixty_mistakes():
    assert len(CASES) >= 60
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("tool", ["validate", "dry-run"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_one_line_exit_2_file_and_key_named(case, tool, tmp_path):
    _, overrides, edit, key, needle = case
    path = _recipe(tmp_path, edit)
    if tool == "validate":
        result = run_cli("validate", path, *overrides, tool="engram")
    else:
        result = run_cli(path, *overrides, "--dry-run", "--out", tmp_path / "runs")
    assert_one_line(result, "user_recipe.toml", key, needle)
    assert not (tmp_path / "runs").exists()  # nothing was run or written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_names_file_and_key(tmp_path):
    path = _recipe(tmp_path, None)
    assert_one_line(run_cli("validate", path, 'run.device="cuda"', tool="engram"), "user_recipe.toml", "run.device", "CUDA is not available")
    assert_one_line(run_cli(path, "--device", "cuda:0", "--dry-run"), "user_recipe.toml", "run.device")


def test_data_path_that_is_a_folder_or_text(tmp_path):
    path = _recipe(tmp_path, None)
    folder = tmp_path / "trajectories"
    folder.mkdir()
    assert_one_line(run_cli("validate", path, f'data.path="{folder}"', tool="engram"), "user_recipe.toml", "data.path", "folder")
    text = tmp_path / "notes.txt"
    text.write_text("not an array\n")
    assert_one_line(run_cli("validate", path, f'data.path="{text}"', tool="engram"), "user_recipe.toml", "data.path", "cannot read")


def test_recipe_path_that_is_a_folder(tmp_path):
    assert_one_line(run_cli("validate", tmp_path, tool="engram"), str(tmp_path), "folder")
    assert_one_line(run_cli(tmp_path, "--dry-run"), str(tmp_path), "folder")


def test_utf8_bom_is_named(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.read_bytes())
    assert_one_line(run_cli("validate", path, tool="engram"), "bom.toml", "byte-order mark")


def test_every_problem_at_once(tmp_path):
    path = _recipe(tmp_path, None)
    r = run_cli("validate", path, "stages.0.lr=inf", 'stages.0.eval_split="test"', 'run.name="../x"', "head.hiden=3", tool="engram")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    # structural problems are reported together; built checks need a recipe that structures
    assert len(lines) == 3 and all("user_recipe.toml" in l for l in lines), lines


def test_built_checks_report_together(tmp_path):
    path = _recipe(tmp_path, None)
    r = run_cli("validate", path, 'stages.0.eval_split="test"', 'stages.0.freeze=["nothing*"]', 'stages.1.split="x"', tool="engram")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 3 and {"stages.0.eval_split", "stages.0.freeze.0", "stages.1.split"} == {l.split(": ")[2] for l in lines}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_a_real_run_on_cuda_without_cuda_names_the_file(tmp_path):
    path = _recipe(tmp_path, None)
    assert_one_line(run_cli(path, "--device", "cuda", "--out", tmp_path / "runs", "--quiet"), "user_recipe.toml", "run.device")
