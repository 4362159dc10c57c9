"""`engram validate` builds what a run would build: composite objectives' terms, fit actions,
plugins that are not loaded or not installed. (Harness of malformed input:
test_bad_input_harness.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from engram_core.testing.cli import run_cli

MINIMAL = Path(__file__).resolve().parents[1] / "recipes" / "minimal.toml"


def one_line(r, *needles):
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, lines
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_minimal_validates_with_every_plugin_loaded():
    r = run_cli("validate", MINIMAL, tool="engram", plugins=None)
    assert r.returncode == 0 and "ok" in r.stdout


def test_weighted_sum_term_capabilities_are_checked():
    pytest.importorskip("engram_audio_mimi")
    ws = 'stages.0.objective={ type = "weighted_sum", terms = [{ type = "gaussian_nll" }, { type = "rollout_nll", weight = 0.5 }] }'
    one_line(run_cli("validate", MINIMAL, ws, tool="engram", plugins="audio-mimi"),
             "minimal.toml", "stages.0.objective.terms.1.type", "objective 'rollout_nll' requires 'segments'")


def test_fit_action_typo_names_file_key_and_suggests():
    pytest.importorskip("engram_audio_mimi")
    args = ['memory={ type = "kmeans", k = 8 }', 'stages.1={ kind = "fit", action = "fitt" }']
    one_line(run_cli("validate", MINIMAL, *args, tool="engram", plugins="audio-mimi"),
             "minimal.toml", "stages.1.action", "no action 'fitt'", "did you mean 'fit'")
    args[1] = 'stages.1={ kind = "fit", options = { iter = 3 } }'
    one_line(run_cli("validate", MINIMAL, *args, tool="engram", plugins="audio-mimi"),
             "minimal.toml", "stages.1.options.iter", "did you mean 'iters'")


def test_component_of_a_filtered_or_missing_plugin_names_it():
    pytest.importorskip("engram_llm_hash")
    one_line(run_cli("validate", MINIMAL, 'memory={ type = "engram_hash" }', tool="engram", plugins=""),
             "memory.type", "plugin 'llm-hash'", "ENGRAM_PLUGINS")
    from engram_core import registry

    reg = registry.Registry()  # as if nothing but the core were installed: a qualified name says which plugin
    assert "not installed" in reg.provider_hint("memories", "llm-hash:engram_hash")
    assert "pip install -e plugins/llm-hash" in reg.provider_hint("memories", "llm-hash:engram_hash")
    # the folder is the one whose pyproject declares the entry point, not the plugin's name
    assert reg.provider_hint("memories", "fla:gla").endswith("pip install -e plugins/fla-ref")
    assert reg.provider_hint("memories", "example-slots:outer_product_trace").endswith("pip install -e examples/engram-example-slots")
    assert "install the package that declares the entry point 'nowhere'" in reg.provider_hint("memories", "nowhere:x")
    assert reg.provider_hint("memories", "engram_hash") == ""  # no list of plugins' contents in the core to ask


def test_dry_run_params_lists_names_without_building_weights():
    r = run_cli(MINIMAL, "--dry-run", "--params")
    assert r.returncode == 0 and "head.trunk.0.weight" in r.stdout


def test_a_validation_split_that_the_settings_give_is_accepted(tmp_path):
    """mqar's `val` exists only with n_val > 0: the check reads the splits from the spec its
    settings give, without generating the data."""
    recipe = tmp_path / "r.toml"
    recipe.write_text('[data]\ntype = "mqar"\nvocab_size = 64\nseq_len = 32\nn_pairs = 4\nn_train = 8\nn_eval = 8\n'
                      '[head]\ntype = "causal_backbone"\n[[stages]]\nkind = "eval"\nsplit = "val"\n')
    one_line(run_cli("validate", recipe, tool="engram", plugins=""), "stages.0.split", "no split 'val'")
    r = run_cli("validate", recipe, "data.n_val=8", tool="engram", plugins="")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
