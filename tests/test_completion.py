"""Shell completion in a real bash: recipe paths, override keys, component names."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

SCRIPT = r"""
eval "$(register-python-argcomplete engram-run)"
eval "$(register-python-argcomplete engram)"
complete_line() {  # what bash's TAB offers for the last word of "$@"
    COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); COMP_LINE="${COMP_WORDS[*]}"; COMP_POINT=${#COMP_LINE}; COMP_TYPE=9
    COMPREPLY=(); _python_argcomplete "$1"; printf '%s\n' "${COMPREPLY[@]}"; echo ---
}
complete_line engram-run recipes/mini
complete_line engram-run recipes/minimal.toml stages.0.mom
complete_line engram-run recipes/minimal.toml head.type=mlp
complete_line engram describe head mlp_
"""


@pytest.mark.skipif(shutil.which("bash") is None or not (BIN / "register-python-argcomplete").exists(), reason="needs bash and argcomplete")
def test_bash_completes_recipes_override_keys_and_component_names():
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    env["ENGRAM_PLUGINS"] = ""  # the core's components only: hermetic, and quicker
    out = subprocess.run(["bash", "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    answers = [block.split() for block in out.stdout.split("---")[:-1]]
    assert answers[0] == ["recipes/minimal.toml"]  # a recipe path
    assert answers[1] == ["stages.0.momentum="]  # a key of the resolved recipe (a default: not in the file)
    assert answers[2] == ["mlp_gaussian"]  # the heads (bash completes the word after '=')
    assert answers[3] == ["mlp_gaussian"]  # engram describe KIND NAME


def test_component_names_come_from_the_cache_without_importing_torch(tmp_path):
    code = """
import json, sys
from engram_core.completion import complete_component_name
class Args: kind = "head"
print(json.dumps([complete_component_name("mlp_", Args()), "torch" in sys.modules]))
"""
    env = {**os.environ, "ENGRAM_CACHE": str(tmp_path), "ENGRAM_PLUGINS": "", "OMP_NUM_THREADS": "1"}
    runs = [subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300) for _ in range(2)]
    first, second = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert first == [["mlp_gaussian"], True]  # a miss: the registry was loaded
    assert second == [["mlp_gaussian"], False]  # a hit: no plugin (and no torch) imported
    assert json.loads((tmp_path / "completion.json").read_text())["names"]["heads"]


def test_recipe_keys_are_remembered_until_a_file_of_the_recipe_changes(tmp_path, monkeypatch):
    from engram_core import completion

    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ENGRAM_PLUGINS", "")
    base = tmp_path / "base.toml"
    base.write_text((ROOT / "recipes" / "minimal.toml").read_text())
    child = tmp_path / "child.toml"
    child.write_text('extends = "base.toml"\n')
    keys = completion.recipe_keys(str(child))
    assert "stages.0.momentum" in keys
    calls = []
    monkeypatch.setattr(completion, "_load_recipe_keys", lambda path: calls.append(path) or (["changed"], []))
    assert completion.recipe_keys(str(child)) == keys and not calls  # a hit
    os.utime(base, ns=(base.stat().st_atime_ns, base.stat().st_mtime_ns + 10**9))  # the base was edited
    assert completion.recipe_keys(str(child)) == ["changed"] and calls  # a miss


def test_completion_cache_folder_follows_the_components_rule(monkeypatch, tmp_path):
    from engram_core.completion import cache_dir
    from engram_core.components import default_cache_dir

    for env in ({"ENGRAM_CACHE": str(tmp_path)}, {"XDG_CACHE_HOME": str(tmp_path)}, {}):
        monkeypatch.delenv("ENGRAM_CACHE", raising=False)
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        assert cache_dir() == default_cache_dir()
