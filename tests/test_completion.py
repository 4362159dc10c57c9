"""Shell completion in a real bash: recipe paths, override keys, component names."""

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
