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


def test_a_rollout_batch_is_tensors_only_and_its_noise_seeds_the_cpu_draws_alone(tmp_path):
    """What a CUDA-graphed step needs from the objective: a batch of tensors (the noise seed a
    0-d tensor, kept whole when a batch is cut into micro-batches) and, on an accelerator, no
    generator seeded from the batch (the device's default generator, which a graph advances);
    on the CPU the seed still decides the draws."""
    import torch
    from audio_mimi_testutil import tiny_dataset
    from engram_audio_mimi.objectives import RolloutNLL, RolloutNLLConfig

    from engram_core.components import BuildContext
    from engram_core.run.distributed import micro_batches
    from engram_core.testing.host_reads import as_on_an_accelerator

    data = tiny_dataset(tmp_path)
    obj = RolloutNLL(RolloutNLLConfig(horizon=8, rollout="sample"), BuildContext(spec=data.spec, dataset=data))
    batch = obj.sample(data, "train", 4, torch.Generator().manual_seed(0))
    assert all(isinstance(v, torch.Tensor) for v in batch.values()), {k: type(v) for k, v in batch.items()}
    assert batch["noise_seed"].dim() == 0
    halves = micro_batches(batch, 4, 2)
    assert all(torch.equal(h["noise_seed"], batch["noise_seed"]) and h["z0"].shape[0] == 2 for h in halves)
    first, again = obj._generator(batch, "cpu"), obj._generator(batch, "cpu")
    assert torch.equal(torch.rand(3, generator=first), torch.rand(3, generator=again))
    with as_on_an_accelerator():
        assert obj._generator(batch, "cpu") is None
