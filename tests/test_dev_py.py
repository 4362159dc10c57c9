"""dev.py, run as a user runs it, against a venv whose set-up is stamped as done already.

The venv here is a folder of small scripts standing in for the installed commands (they
print what they were given), so nothing is installed and each test takes a moment.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEV = ROOT / "dev.py"

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX scripts stand in for the venv's commands")


def _dev_module():
    spec = importlib.util.spec_from_file_location("dev_under_test", DEV)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def fake_venv(tmp_path: Path) -> Path:
    """A venv dev.py believes is set up: the stamp it writes after installing, and scripts for the commands."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    dev = _dev_module()
    (venv / ".engram-installed").write_text(" ".join(dev.packages()) + " " + dev._pyprojects_digest())
    for name in ("python", "engram", "engram-run", "tensorboard"):
        script = venv / "bin" / name
        script.write_text(f'#!/bin/sh\necho "{name} called with: $*"\nexit 0\n')
        script.chmod(0o755)
    return venv


def _dev(venv: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "ENGRAM_VENV": str(venv)}
    return subprocess.run([sys.executable, str(DEV), *args], env=env, capture_output=True, text=True, timeout=60, **kw)


def test_tensorboard_runs_the_venvs_tensorboard_on_the_run(fake_venv):
    out = _dev(fake_venv, "tensorboard", "runs/minimal/x", "--port", "6007")
    assert out.returncode == 0, out.stderr
    assert "tensorboard called with: --logdir runs/minimal/x --port 6007" in out.stdout


def test_tensorboard_without_a_directory_is_one_line_and_status_2(fake_venv):
    out = _dev(fake_venv, "tensorboard")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "give a run or sweep directory" in out.stderr


@pytest.mark.parametrize("cmd", ["engram", "engram-run"])
def test_engram_commands_pass_arguments_and_print_only_their_output(fake_venv, cmd):
    out = _dev(fake_venv, cmd, "validate", "recipes/minimal.toml")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{cmd} called with: validate recipes/minimal.toml\n"  # no "+ ..." echo: pipes stay clean


def test_exit_status_of_the_command_is_dev_pys(fake_venv):
    (fake_venv / "bin" / "engram").write_text("#!/bin/sh\nexit 3\n")
    assert _dev(fake_venv, "engram", "plugins").returncode == 3


def test_unknown_command_prints_the_usage(fake_venv):
    out = _dev(fake_venv, "nonsense")
    assert out.returncode == 2
    assert "dev.py tensorboard RUN_DIR" in out.stdout and "source .venv/bin/activate" in out.stdout


@pytest.mark.parametrize("cmd", ["test", "run"])
def test_ctrl_c_exits_130_with_one_line(fake_venv, cmd):
    # the child sleeps as a test session or a run would; Ctrl-C reaches the whole process group.
    # `exec`: the sleep is the child itself, so a signal that lands between the echo and the
    # sleep cannot leave an orphaned sleep holding the pipe open (a flake under load)
    for name in ("python", "engram-run"):
        (fake_venv / "bin" / name).write_text("#!/bin/sh\necho started\nexec sleep 30\n")
    env = {**os.environ, "ENGRAM_VENV": str(fake_venv)}
    # SIGINT back to its default in the child: a test session started in the background by a
    # non-interactive shell (nohup, `cmd &`) ignores it, and children inherit an ignored signal
    proc = subprocess.Popen([sys.executable, str(DEV), cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline().startswith("+ ")  # the echoed command: the child is starting
    assert proc.stdout.readline() == "started\n"
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - t0 < 20
    assert proc.returncode == 130
    assert err.strip() == "dev.py: interrupted"
    assert "Traceback" not in out + err


def test_every_pyproject_names_its_license_as_an_spdx_string():
    # a `{ text = ... }` table makes setuptools warn on every install (deprecated since setuptools 77)
    import tomllib

    for path in [ROOT / "pyproject.toml", *ROOT.glob("plugins/*/pyproject.toml"), *ROOT.glob("examples/*/pyproject.toml")]:
        license = tomllib.loads(path.read_text())["project"].get("license")
        assert license is None or isinstance(license, str), f"{path.relative_to(ROOT)}: license = {license!r}"
