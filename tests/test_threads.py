"""The CPU thread policy (engram_core.run.threads): the registry of live engram processes, the
automatic share, what wins over it, and a folder that cannot be written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engram_core.run import threads

REGISTERING_CHILD = "from engram_core.run import threads; threads.register(); print('registered', flush=True); import sys; sys.stdin.read()"


@pytest.fixture(autouse=True)
def private_registry(tmp_path, monkeypatch):
    """A registry of this test's own, no thread setting from outside, torch's count restored."""
    monkeypatch.setenv(threads.RUNTIME_DIR_ENV, str(tmp_path / "rt"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads.AUTO_ENV, raising=False)
    before = torch.get_num_threads()
    yield tmp_path / "rt" / "procs"
    threads.release()
    torch.set_num_threads(before)


def fake_live_process(folder: Path) -> int:
    """Register this test's parent process (alive for the whole test) as an engram run."""
    folder.mkdir(parents=True, exist_ok=True)
    pid = os.getppid()
    (folder / str(pid)).write_text(threads._start_time(pid))
    return pid


def start_registering_child() -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", REGISTERING_CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "registered"
    return child


def test_the_registry_counts_live_processes_and_forgets_those_that_ended(private_registry):
    assert threads.register() == private_registry / str(os.getpid())
    assert threads.live_processes() == 1
    polite, killed = start_registering_child(), start_registering_child()
    assert threads.live_processes() == 3
    polite.stdin.close()  # it exits normally: atexit removes its file
    polite.wait()
    assert not (private_registry / str(polite.pid)).exists()
    killed.kill()  # kill -9 leaves its file behind: counting prunes it
    killed.wait()
    assert (private_registry / str(killed.pid)).exists()
    assert threads.live_processes() == 1
    assert not (private_registry / str(killed.pid)).exists()
    threads.unregister()
    assert not any(private_registry.iterdir())


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process start times come from /proc")
def test_a_recycled_process_id_is_not_a_live_run(private_registry):
    pid = fake_live_process(private_registry)
    (private_registry / str(pid)).write_text("1")  # the id now belongs to a process started at another time
    assert threads.live_processes() == 1
    assert not (private_registry / str(pid)).exists()


def test_the_automatic_share_is_cores_over_live_runs_capped_by_torchs_own_count(private_registry, monkeypatch):
    monkeypatch.setattr(threads, "cpu_count", lambda: 16)
    torch.set_num_threads(16)
    assert threads.configure() == 16 and torch.get_num_threads() == 16  # alone: what torch chose
    assert threads.share(live=4) == 4 and threads.share(live=3) == 5 and threads.share(live=40) == 1
    threads.release()
    torch.set_num_threads(6)  # torch's own count (physical cores, or a launcher's share) is the cap
    assert threads.configure() == 6 and threads.share(live=2) == 6


def test_later_runs_shrink_earlier_ones_at_rebalance_and_release_restores(private_registry, monkeypatch):
    monkeypatch.setattr(threads, "cpu_count", lambda: 8)
    monkeypatch.setattr(threads, "REBALANCE_INTERVAL_S", 0.0)
    torch.set_num_threads(8)
    assert threads.configure() == 8
    assert threads.rebalance() is None  # nothing changed
    pid = fake_live_process(private_registry)
    assert threads.rebalance() == 4 and torch.get_num_threads() == 4
    (private_registry / str(pid)).unlink()  # it ended: the cores come back
    assert threads.rebalance() == 8
    threads.release()
    assert torch.get_num_threads() == 8 and not any(private_registry.iterdir())
    assert threads.rebalance() is None  # no run: nothing to balance


def test_omp_num_threads_and_run_threads_win(private_registry, monkeypatch):
    monkeypatch.setattr(threads, "cpu_count", lambda: 8)
    monkeypatch.setattr(threads, "REBALANCE_INTERVAL_S", 0.0)
    torch.set_num_threads(8)
    fake_live_process(private_registry)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.configure() == 3 and torch.get_num_threads() == 3
    assert threads.rebalance() is None  # a fixed count stays
    assert (private_registry / str(os.getpid())).exists()  # and still counts for the automatic runs
    threads.release()
    assert threads.configure(run_threads=5) == 5  # the recipe's run.threads wins over OMP_NUM_THREADS
    threads.release()
    monkeypatch.setenv(threads.AUTO_ENV, "1")  # the OMP_NUM_THREADS of a launcher's share is not the user's
    torch.set_num_threads(3)
    assert threads.configure() == 3 and threads.share(live=2) == 3
    monkeypatch.setattr(threads, "cpu_count", lambda: 4)
    assert threads.rebalance() == 2


def test_an_unwritable_folder_falls_back_to_a_run_alone(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(threads.RUNTIME_DIR_ENV, str(blocker / "below"))  # a folder under a file: never creatable
    monkeypatch.setattr(threads, "cpu_count", lambda: 4)
    torch.set_num_threads(4)
    assert threads.register() is None
    assert threads.configure() == 4
    assert threads.live_processes() == 1
    threads.release()


def test_launchers_give_each_of_n_runs_its_share_unless_the_user_chose(monkeypatch):
    monkeypatch.setattr(threads, "cpu_count", lambda: 16)
    env = threads.child_env(4, {"PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == "4" and env[threads.AUTO_ENV] == "1" and env["PATH"] == "/bin"
    assert threads.child_env(32, {})["OMP_NUM_THREADS"] == "1"
    assert threads.child_env(4, {"OMP_NUM_THREADS": "2"}) == {"OMP_NUM_THREADS": "2"}
    assert threads.child_env(2, env)["OMP_NUM_THREADS"] == "8"  # a share handed down is shared again


def test_a_run_registers_while_it_runs_and_takes_its_recipe_threads(tmp_path, private_registry, small_recipe, monkeypatch):
    """`engram-run` in this process: registered during the run, run.threads applied, all undone after."""
    from engram_core.testing.cli import run_cli

    seen = []
    real_configure = threads.configure

    def spy(run_threads=0):
        n = real_configure(run_threads)
        seen.append((n, torch.get_num_threads(), (private_registry / str(os.getpid())).exists()))
        return n

    monkeypatch.setattr(threads, "configure", spy)
    before = torch.get_num_threads()
    r = run_cli(small_recipe, "run.threads=2", "stages.0.steps=5", "--out", tmp_path / "runs", "--quiet")
    assert r.returncode == 0, r.stderr
    assert seen == [(2, 2, True)]
    assert torch.get_num_threads() == before and not any(private_registry.iterdir())
    env = next((tmp_path / "runs").rglob("env.json")).read_text()
    assert '"torch_threads": 2' in env



def test_the_results_pipeline_shares_threads_between_gpu_runs_and_keeps_cpu_runs_at_one(tmp_path, monkeypatch):
    from engram_core.tools import results

    monkeypatch.setattr(threads, "cpu_count", lambda: 16)
    monkeypatch.setenv("OMP_NUM_THREADS", "8")  # the caller's own setting
    gpu = results._job_env(tmp_path, on_cuda=True, jobs=4)
    cpu = results._job_env(tmp_path, on_cuda=False, jobs=4)
    assert gpu["OMP_NUM_THREADS"] == "8" and threads.AUTO_ENV not in gpu  # the user's count is kept for GPU runs
    assert cpu["OMP_NUM_THREADS"] == cpu["MKL_NUM_THREADS"] == "1"  # as the published CPU rows were made
    monkeypatch.delenv("OMP_NUM_THREADS")
    gpu = results._job_env(tmp_path, on_cuda=True, jobs=4)
    assert gpu["OMP_NUM_THREADS"] == "4" and gpu[threads.AUTO_ENV] == "1" and gpu["ENGRAM_CACHE"] == str(tmp_path)
    alone = results._job_env(tmp_path, on_cuda=False, jobs=1)
    assert "OMP_NUM_THREADS" not in alone  # one run at a time: the run shares the cores itself
    assert results._on_cuda("cuda:1") and not results._on_cuda("cpu")
    assert results._on_cuda("auto") == torch.cuda.is_available()
