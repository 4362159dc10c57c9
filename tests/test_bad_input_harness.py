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


# ---- faults of run directories, data, the disk and trackers (issue 33) -----------------------
#
# Each case: the exit status, exactly one line, and the user's files (or the run) unchanged.

import errno  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402

from engram_core.builtin.dynamics import SyntheticDynamics  # noqa: E402
from engram_core.run import rundir  # noqa: E402


def _small(tmp_path: Path, name: str = "small.toml", steps: int = 30) -> Path:
    text = MINIMAL.read_text().replace("steps = 600", f"steps = {steps}").replace("eval_every = 200", "eval_every = 10")
    text = text.replace("checkpoint_every = 200", "checkpoint_every = 10").replace("warmup_steps = 50", "warmup_steps = 5")
    path = tmp_path / name
    path.write_text(text)
    return path


def _one_error(result, code: int, *needles: str) -> str:
    assert result.returncode == code, (result.returncode, result.stdout[-500:], result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _fingerprint(folder: Path) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) with its content hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def unfinished_run(tmp_path, monkeypatch):
    """A run stopped by Ctrl-C at step 15 (checkpoint at step 10): what --resume is for."""
    calls = {"n": 0}
    sample = SyntheticDynamics.sample

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 15:
            raise KeyboardInterrupt
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(SyntheticDynamics, "sample", interrupted)
    out = tmp_path / "runs"
    assert run_cli(_small(tmp_path), "--out", out, "--quiet").returncode == 130
    monkeypatch.setattr(SyntheticDynamics, "sample", sample)
    (run,) = (out / "minimal").iterdir()
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert (run / rundir.RUN_MARKER).is_file()
    return run


def test_resume_refuses_a_folder_the_engine_did_not_make(tmp_path):
    folder = tmp_path / "my_experiment"
    folder.mkdir()
    (folder / "recipe.toml").write_text("# my own notes on the recipe\n" + MINIMAL.read_text())
    (folder / "metrics.jsonl").write_text('{"mine": 1}\n')
    (folder / "env.json").write_text('{"mine": true}\n')
    (folder / "notes.md").write_text("do not lose me\n")
    before = _fingerprint(folder)
    for extra in ([], ["stages.0.lr=1e-4"], ["--nproc", "2"]):  # --nproc: refused before any rank starts
        _one_error(run_cli("--resume", folder, *extra, "--quiet"), 2, str(folder), "not a run directory", rundir.RUN_MARKER)
    assert _fingerprint(folder) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_error(run_cli("--resume", empty), 2, "not a run directory")
    assert list(empty.iterdir()) == []


def test_every_run_and_sweep_directory_is_marked(tmp_path):
    out = tmp_path / "runs"
    r = run_cli(_small(tmp_path, steps=5), "--out", out, "--quiet", 'sweep."head.hidden"=[8, 16]')
    assert r.returncode == 0, r.stderr
    (sweep,) = (out / "minimal").iterdir()
    assert (sweep / rundir.RUN_MARKER).is_file()
    assert all((sweep / d / rundir.RUN_MARKER).is_file() for d in ("000", "001"))


@pytest.mark.parametrize("override", ['run.device="mps"', 'run.device="cuda:7"'])
def test_a_failed_resume_leaves_the_run_as_it_was(unfinished_run, override):
    if override.endswith('mps"') and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    if "cuda" in override and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 CUDA devices")
    before = _fingerprint(unfinished_run)
    _one_error(run_cli("--resume", unfinished_run, override, "--quiet"), 2, "recipe.toml", "run.device")
    assert _fingerprint(unfinished_run) == before  # recipe.toml was not rewritten with the override
    r = run_cli("--resume", unfinished_run, "--quiet")  # the plain resume still works
    assert r.returncode == 0, r.stderr
    assert json.loads((unfinished_run / "summary.json").read_text())["status"] == "completed"


def test_resume_with_overrides_writes_recipe_only_when_it_runs(unfinished_run):
    r = run_cli("--resume", unfinished_run, "stages.0.lr=1e-4", "--quiet")
    assert r.returncode == 0, r.stderr
    text = (unfinished_run / "recipe.toml").read_text()
    assert "# resumed" in text and "lr = 0.0001" in text


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not-a-checkpoint"])
def test_a_damaged_checkpoint_is_one_line_and_nothing_changes(unfinished_run, damage):
    ckpt = unfinished_run / "checkpoints" / "last.pt"
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:1000])
    elif damage == "garbage":
        ckpt.write_bytes(b"this is not a checkpoint\n" * 10)
    else:
        torch.save({"weights": torch.zeros(3)}, ckpt)
    before = _fingerprint(unfinished_run)
    for extra in ([], ["stages.0.lr=1e-4"]):
        _one_error(run_cli("--resume", unfinished_run, *extra, "--quiet"), 2, "last.pt", "nothing was changed")
    assert _fingerprint(unfinished_run) == before


def test_an_edited_recipe_that_no_longer_fits_the_checkpoint(unfinished_run):
    recipe_file = unfinished_run / "recipe.toml"
    recipe_file.write_text(recipe_file.read_text().replace("hidden = 64", "hidden = 32"))
    before = _fingerprint(unfinished_run)
    _one_error(run_cli("--resume", unfinished_run, "--quiet"), 2, "recipe.toml", "no longer matches the checkpoint", "head.trunk.0.weight")
    assert _fingerprint(unfinished_run) == before


def test_an_edited_recipe_with_fewer_stages_than_the_checkpoint(tmp_path):
    out = tmp_path / "runs"
    assert run_cli(_small(tmp_path, steps=5), "--out", out, "--quiet").returncode == 0
    (run,) = (out / "minimal").iterdir()  # its checkpoint: stage 1 (the eval stage) done
    summary = run / "summary.json"
    summary.write_text(summary.read_text().replace('"completed"', '"interrupted"'))
    recipe_file = run / "recipe.toml"
    text = recipe_file.read_text()
    recipe_file.write_text(text[: text.rindex("[[stages]]")] + text[text.index("[[metrics]]"):])  # the eval stage removed
    before = _fingerprint(run)
    _one_error(run_cli("--resume", run, "--quiet"), 2, "recipe.toml", "stages", "checkpoint is in stage 1, but the recipe has 1 stages")
    assert _fingerprint(run) == before


def test_a_truncated_summary_is_rewritten_by_the_resume(unfinished_run):
    summary = unfinished_run / "summary.json"
    summary.write_text(summary.read_text()[:40])
    r = run_cli("--resume", unfinished_run, "--quiet")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert json.loads(summary.read_text())["status"] == "completed"


def test_a_damaged_summary_of_a_sweep_point_is_a_status_not_a_traceback(tmp_path):
    from engram_core.sweep import sweep_tables

    (tmp_path / "000").mkdir()
    (tmp_path / "000" / "summary.json").write_text('{"status": "compl')
    csv_text, _ = sweep_tables(tmp_path, [{"index": 0, "label": "x", "point": {"head.hidden": 8}, "dir": "000"}])
    assert "damaged summary.json" in csv_text


def test_stale_temporary_files_of_a_sweep_are_removed_on_resume(tmp_path):
    out = tmp_path / "runs"
    r = run_cli(_small(tmp_path, steps=5), "--out", out, "--quiet", 'sweep."head.hidden"=[8, 16]')
    assert r.returncode == 0, r.stderr
    (sweep,) = (out / "minimal").iterdir()
    leftovers = [sweep / ".sweep.csv.0a1b2c3d4e5f.tmp", sweep / "001" / "checkpoints" / ".last.0a1b2c3d4e5f.tmp"]
    (sweep / "001" / "summary.json").unlink()  # point 001 runs again on resume
    for f in leftovers:
        f.write_bytes(b"x" * 100)
    assert run_cli("--resume", sweep, "--quiet").returncode == 0
    assert not list(sweep.rglob(".*.tmp"))


def test_stale_temporary_files_are_removed_on_resume(unfinished_run):
    leftovers = [unfinished_run / ".summary.json.0a1b2c3d4e5f.tmp", unfinished_run / "checkpoints" / ".last.0a1b2c3d4e5f.tmp"]
    for f in leftovers:
        f.write_bytes(b"x" * 1000)
    keep = unfinished_run / "notes.tmp"  # not one of ours: kept
    keep.write_text("mine")
    assert run_cli("--resume", unfinished_run, "--quiet").returncode == 0
    assert not any(f.exists() for f in leftovers) and keep.exists()
    assert not list(unfinished_run.rglob(".*.tmp"))


# -- data sets check their data


def _trajectories(tmp_path: Path, name: str, shape=(8, 10, 3), bad=None, dtype="float32") -> Path:
    arr = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    if bad is not None:
        index, value = bad
        arr[index] = value
    path = tmp_path / name
    np.save(path, arr)
    return path


@pytest.mark.parametrize("name, shape, bad, needles", [
    ("nan_in_eval.npy", (8, 10, 3), ((1, 4, 2), np.nan), ("non-finite value nan", "[1, 4, 2]")),  # sequences 0..1 are the eval split
    ("inf_in_train.npy", (8, 10, 3), ((6, 0, 1), np.inf), ("non-finite value inf", "[6, 0, 1]")),
    ("zero_dim.npy", (8, 10, 0), None, ("dim >= 1", "(8, 10, 0)")),
    ("one_frame.npy", (8, 1, 3), None, ("frames >= 2", "(8, 1, 3)")),
])
def test_bad_values_in_a_data_file_are_named_at_validate(tmp_path, name, shape, bad, needles):
    path = _trajectories(tmp_path, name, shape, bad)
    recipe = _small(tmp_path)
    before = path.read_bytes()
    for result in (run_cli("validate", recipe, f'data.path="{path}"', tool="engram"),
                   run_cli(recipe, f'data.path="{path}"', "--out", tmp_path / "runs", "--quiet")):
        assert_one_line(result, "small.toml", "data.path", name, *needles)
    assert not (tmp_path / "runs").exists() and path.read_bytes() == before


def test_data_that_is_not_real_numbers_is_named(tmp_path):
    path = tmp_path / "complex.npy"
    np.save(path, np.zeros((8, 10, 3), dtype=np.complex64))
    assert_one_line(run_cli("validate", _small(tmp_path), f'data.path="{path}"', tool="engram"), "small.toml", "data.path", "real numbers", "complex64")


def test_a_damaged_sweep_json_is_one_line(tmp_path):
    out = tmp_path / "runs"
    assert run_cli(_small(tmp_path, steps=5), "--out", out, "--quiet", 'sweep."head.hidden"=[8]').returncode == 0
    (sweep,) = (out / "minimal").iterdir()
    (sweep / "sweep.json").write_text('{"name": "minimal", "points": [{"ind')
    before = _fingerprint(sweep)
    _one_error(run_cli("--resume", sweep, "--quiet"), 2, "sweep.json", "damaged")
    assert _fingerprint(sweep) == before


def test_float64_data_past_float32_range_is_named(tmp_path):
    path = _trajectories(tmp_path, "huge.npy", dtype="float64", bad=((3, 2, 1), 1e300))
    assert_one_line(run_cli("validate", _small(tmp_path), f'data.path="{path}"', tool="engram"), "small.toml", "[3, 2, 1]", "as float32")


def test_summary_json_is_valid_json_with_non_finite_values(tmp_path):
    rundir.atomic_write_json(tmp_path / "summary.json", {"final": {"eval/loss": float("nan"), "eval/x": float("inf"), "ok": 1.5},
                                                         "t": torch.tensor([1.0, float("-inf")])})

    def strict(name):
        raise AssertionError(f"bare {name} in JSON")

    data = json.loads((tmp_path / "summary.json").read_text(), parse_constant=strict)
    assert data == {"final": {"eval/loss": None, "eval/x": None, "ok": 1.5}, "t": [1.0, None]}


def test_a_run_whose_final_metric_is_not_finite_says_so(tmp_path, monkeypatch):
    from engram_core.builtin.dynamics import LossMetric

    compute = LossMetric.compute
    monkeypatch.setattr(LossMetric, "compute", lambda self: {k: float("nan") for k in compute(self)})
    out = tmp_path / "runs"
    r = run_cli(_small(tmp_path, steps=5), "--out", out, "--quiet")
    assert r.returncode == 0 and "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "eval/loss" in lines[0] and "not finite" in lines[0]
    (run,) = (out / "minimal").iterdir()
    assert json.loads((run / "summary.json").read_text())["final"]["eval/loss"] is None


# -- where run directories go


def test_a_recipe_file_named_dot_dot_toml_cannot_leave_out_dir(tmp_path):
    text = MINIMAL.read_text().replace('name = "minimal"\n', "")
    (tmp_path / "work").mkdir()
    path = tmp_path / "work" / "...toml"
    path.write_text(text)
    out = tmp_path / "work" / "runs"
    before = sorted(p.name for p in tmp_path.iterdir())
    for result in (run_cli(path, "--out", out, "--quiet"), run_cli("validate", path, tool="engram")):
        assert_one_line(result, "...toml", "run.name", "'..'")
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not out.exists()


def test_out_that_is_a_file(tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("mine\n")
    for out in (target, target / "runs"):
        assert_one_line(run_cli(_small(tmp_path), "--out", out, "--quiet"), "small.toml", "run.out_dir", "is a file")
        assert_one_line(run_cli(_small(tmp_path), "--out", out, "--quiet", 'sweep."head.hidden"=[8, 16]'), "small.toml", "run.out_dir", "is a file")
    assert target.read_text() == "mine\n"


def test_out_that_cannot_be_written(tmp_path, monkeypatch):
    out = tmp_path / "readonly"
    out.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == out else real_access(p, mode, *a, **k))
    assert_one_line(run_cli(_small(tmp_path), "--out", out, "--quiet"), "small.toml", "run.out_dir", "not writable")
    assert list(out.iterdir()) == []


def test_out_where_mkdir_is_refused(tmp_path, monkeypatch):
    """A folder the permission bits allow but the file system refuses (root on a read-only mount)."""
    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if "runs" in self.parts:
            raise PermissionError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert_one_line(run_cli(_small(tmp_path), "--out", tmp_path / "runs", "--quiet"), "small.toml", "run.out_dir", "Read-only file system")


def test_full_disk_while_checkpointing(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "runs"
    line = _one_error(run_cli(_small(tmp_path), "--out", out, "--quiet"), 1, "No space left on device", "last.pt", "--resume")
    (run,) = (out / "minimal").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "No space left" in summary["error"]
    assert not list(run.rglob("*.tmp")), "a failed checkpoint write leaves no temporary file"
    assert line.startswith("error: ")


def test_full_disk_while_appending_metrics(tmp_path, monkeypatch):
    real_open = open

    def full(path, mode="r", *args, **kwargs):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full)
    _one_error(run_cli(_small(tmp_path), "--out", tmp_path / "runs", "--quiet"), 1, "metrics.jsonl", "No space left")


def test_full_disk_under_another_writer_is_one_line(tmp_path, monkeypatch):
    from engram_core.run import tb

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "events.out.tfevents")

    monkeypatch.setattr(tb.RunLogger, "flush", full)
    _one_error(run_cli(_small(tmp_path), "--out", tmp_path / "runs", "--quiet"), 1, "No space left on device", "--resume")


# -- values that used to pass validation and crash later


def test_a_recipe_deleting_a_key_no_base_has(tmp_path):
    base = tmp_path / "base.toml"
    base.write_text(MINIMAL.read_text())
    child = tmp_path / "child.toml"
    child.write_text('extends = ["base.toml"]\n\n[head]\nhiden = "__delete__"\n')
    for result in (run_cli("validate", child, tool="engram"), run_cli(child, "--dry-run")):
        assert_one_line(result, "child.toml", "head.hiden", "no base recipe has", "did you mean 'hidden'")


LATE_CRASHES = [
    ("name-300-chars", [f'run.name="{"a" * 300}"'], "run.name", "200 bytes"),
    ("lr-1e308", ["stages.0.lr=1e308"], "stages.0.lr", "<= 1e+30"),
    ("param-group-lr-1e308", ['stages.0.param_groups=[{ params = ["head.*"], lr = 1e308 }]'], "stages.0.param_groups.0.lr", "<= 1e+30"),
    ("weight-decay-1e308", ["stages.0.weight_decay=1e308"], "stages.0.weight_decay", "<= 1e+06"),
    ("seed-1e20", ["run.seed=100000000000000000000"], "run.seed", "[0, 4294967295]"),
    ("seed-negative", ["run.seed=-1"], "run.seed", "[0, 4294967295]"),
    ("override-thousands-of-digits", ["head.hidden=" + "9" * 5000], "head.hidden", "too long to read"),
    ("unicode-index", ["stages.³.lr=0.1"], "stages.³", "not a list index"),
    ("unicode-cuda-index", ['run.device="cuda:³"'], "run.device", "cuda:N"),
    ("huge-sweep-grid", ['sweep."head.hidden"=[' + ", ".join(str(i) for i in range(1, 201)) + "]",
                         'sweep."run.seed"=[' + ", ".join(str(i) for i in range(101)) + "]"], "sweep", "20,200 points"),
]


@pytest.mark.parametrize("case", LATE_CRASHES, ids=[c[0] for c in LATE_CRASHES])
def test_values_that_used_to_crash_later(case, tmp_path):
    _, overrides, key, needle = case
    path = _recipe(tmp_path, None)
    for result in (run_cli("validate", path, *overrides, tool="engram"),
                   run_cli(path, *overrides, "--out", tmp_path / "runs", "--quiet")):
        assert_one_line(result, "user_recipe.toml", key, needle)
    assert not (tmp_path / "runs").exists()


def test_a_recipe_file_with_a_number_of_thousands_of_digits(tmp_path):
    path = tmp_path / "user_recipe.toml"
    path.write_text(MINIMAL.read_text().replace("hidden = 64", "hidden = " + "9" * 5000))
    assert_one_line(run_cli("validate", path, tool="engram"), "user_recipe.toml", "give numbers of ordinary size")
    path.write_bytes(MINIMAL.read_bytes().replace(b"minimal", b"minimal\xff"))
    assert_one_line(run_cli("validate", path, tool="engram"), "user_recipe.toml", "not UTF-8")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the message on a machine without MPS")
def test_a_real_run_on_mps_without_mps(tmp_path):
    assert_one_line(run_cli(_recipe(tmp_path, None), 'run.device="mps"', "--out", tmp_path / "runs", "--quiet"), "user_recipe.toml", "run.device", "MPS")
    assert not (tmp_path / "runs").exists()


# -- trackers


def test_wandb_without_a_key_says_so_before_the_run(tmp_path):
    pytest.importorskip("wandb")
    env = {"WANDB_API_KEY": "", "WANDB_MODE": "", "NETRC": str(tmp_path / "no-netrc")}
    result = run_cli(_small(tmp_path), 'run.loggers=["wandb"]', "--out", tmp_path / "runs", "--quiet", env=env)
    assert_one_line(result, "small.toml", "run.loggers.0", "no API key", "WANDB_MODE=offline")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("key", ["abc123", "'" + "a" * 40 + "'", "a" * 39])
def test_wandb_with_a_malformed_key_says_so_before_the_run(tmp_path, key):
    pytest.importorskip("wandb")
    result = run_cli(_small(tmp_path), 'run.loggers=["wandb"]', "--out", tmp_path / "runs", "--quiet",
                     env={"WANDB_API_KEY": key, "WANDB_MODE": ""})
    assert_one_line(result, "small.toml", "run.loggers.0", "not a W&B API key")
    assert key not in result.stderr  # a secret is never printed
    assert not (tmp_path / "runs").exists()


def test_wandb_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")

    def refused(**kwargs):
        raise wandb.errors.CommError("invalid API key")

    monkeypatch.setattr(wandb, "init", refused)
    env = {"WANDB_API_KEY": "x" * 40, "WANDB_MODE": "online"}
    _one_error(run_cli(_small(tmp_path, steps=5), 'run.loggers=["wandb"]', "--out", tmp_path / "runs", "--quiet", env=env),
               1, "W&B could not start", "invalid API key", "WANDB_MODE=offline")
    (run,) = (tmp_path / "runs" / "minimal").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "W&B could not start" in summary["error"]
