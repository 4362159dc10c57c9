"""The headline rollout fine-tune on an accelerator never reads the host in a training step
(Wood's vMF sampler draws a fixed number of rounds there instead of asking whether every draw
was accepted): found on the CPU under the accelerator policy (engram_core.testing.host_reads)."""

from collections import Counter
from pathlib import Path

from engram_core.testing.host_reads import host_reads_in_training

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "rollout_vmf.toml"
TINY = ["data.synthetic={ dim = 12, speakers = 5, utterances = 2, frames = 70 }", "metrics=[]"]


def test_the_rollout_step_reads_nothing_on_the_host(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE", str(tmp_path / "cache"))
    horizon, steps, steady_after = 4, 3, 2
    found = host_reads_in_training(RECIPE, [*TINY, "stages.0.steps=2", f"stages.2.steps={steps}", "stages.2.batch_size=4",
                                            f"stages.2.objective.horizon={horizon}"], steady_after=steady_after)
    # stage 0's two steps are the unrecorded warm-up; the rollout stage's three are recorded
    assert found == [], Counter(found)
