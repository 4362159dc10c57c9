"""The fla references on a CUDA GPU, where fla's Triton kernels run: the adapter's causality and
reach past the attention window, the state-size formula against the state fla's own cache keeps,
a training step free of host reads, a short zoo run (eager and compiled) that reports its state
size, and, where fla refuses Gated DeltaNet's backward (Hopper, triton < 3.7.1, no tilelang:
fla issue #640), the one-line error that run gets instead. Skipped, with the reason, without a
CUDA device or without fla (the extra engram-fla[fla])."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("fla's layers run Triton kernels on a CUDA GPU; this machine has none", allow_module_level=True)
pytest.importorskip("fla.layers", reason="flash-linear-attention is not installed (pip install 'engram-fla[fla]')")

from engram_fla import (  # noqa: E402
    DeltaNetConfig,
    DeltaNetMemory,
    GatedDeltaNetConfig,
    GatedDeltaNetMemory,
    GatedLinearAttentionConfig,
    GatedLinearAttentionMemory,
    gated_backward_refusal,
)
from engram_fla.memories import kernel_environment  # noqa: E402

from engram_core.testing.host_reads import host_reads_with_memory  # noqa: E402
from engram_core.testing.points import backbone_build  # noqa: E402

ZOO = Path(__file__).resolve().parents[3] / "recipes" / "memory_zoo.toml"
# the memory zoo's Zoology rows (docs/results/memory-zoo.toml)
ROWS = {
    "gated_deltanet": '{ type = "fla:gated_deltanet", layers = [0, 1], num_heads = 2, head_dim = 32, expand_v = 1.0 }',
    "deltanet": '{ type = "fla:deltanet", layers = [0, 1], num_heads = 2, expand_k = 1.0, expand_v = 1.0 }',
    "gla": '{ type = "fla:gla", layers = [0, 1], num_heads = 2, expand_k = 1.0, expand_v = 1.0 }',
}
MEMORIES = {
    "gated_deltanet": lambda build: GatedDeltaNetMemory(GatedDeltaNetConfig(num_heads=2, head_dim=32), build),
    "deltanet": lambda build: DeltaNetMemory(DeltaNetConfig(num_heads=2), build),
    "gla": lambda build: GatedLinearAttentionMemory(GatedLinearAttentionConfig(num_heads=2), build),
}
# why fla would stop Gated DeltaNet at its first backward on this machine (None: it will not)
REFUSAL = gated_backward_refusal(*kernel_environment(torch.device("cuda")))


def skip_if_refused(name: str) -> None:
    if name == "gated_deltanet" and REFUSAL:
        pytest.skip(f"this machine: {REFUSAL}")


def cuda_build():
    build = backbone_build(width=64)
    build.device = torch.device("cuda")
    return build


def built(name: str):
    skip_if_refused(name)
    torch.manual_seed(0)
    return MEMORIES[name](cuda_build()).cuda()


@pytest.mark.parametrize("length", [64, 160])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(MEMORIES))
def test_causal_and_reaching_past_the_window(name, training, length):
    """Position t's output depends on positions <= t only, and on positions far before it (what
    the window-2 attention cannot see); in training (with gradients) and in evaluation, at 64
    positions (where fla's DeltaNet and GLA pick their fused recurrent kernels) and at 160 (their
    chunk kernels, the last chunk partial)."""
    memory = built(name).train(training)
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2, length, 64, device="cuda", generator=g)
    ids = torch.randint(0, 64, (2, length), device="cuda", generator=g)
    later = hidden.clone()
    later[:, 40:] = torch.randn(2, length - 40, 64, device="cuda", generator=g)
    earlier = hidden.clone()
    earlier[:, 0] = torch.randn(2, 64, device="cuda", generator=g)
    with torch.set_grad_enabled(training):
        out, out_later, out_earlier = (memory.apply_layer(0, h, ids).detach() for h in (hidden, later, earlier))
    assert out.shape == hidden.shape
    torch.testing.assert_close(out_later[:, :40], out[:, :40], atol=1e-4, rtol=1e-4)
    assert (out_later[:, 40:] - out[:, 40:]).abs().amax() > 1e-3
    assert (out_earlier[:, 50:] - out[:, 50:]).abs().amax() > 0, "position 0 should reach position 50 through the state"


def test_deltanet_chunk_mode_is_for_bf16_runs_and_computes_the_same_layer():
    """fla 0.6's chunk delta rule asserts on float32 inputs, so DeltaNet's default is the fused
    recurrent mode (a float32 run of more than 64 positions, as the zoo's (128, 8) rows, would
    stop there). Under bf16 autocast (run.precision = "bf16") mode = "chunk" runs, and it is
    the same layer: the outputs agree to bf16's precision."""
    torch.manual_seed(0)
    recurrent = DeltaNetMemory(DeltaNetConfig(num_heads=2), cuda_build()).cuda()
    chunk = DeltaNetMemory(DeltaNetConfig(num_heads=2, mode="chunk"), cuda_build()).cuda()
    chunk.load_state_dict(recurrent.state_dict())
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(2, 160, 64, device="cuda", generator=g)
    ids = torch.randint(0, 64, (2, 160), device="cuda", generator=g)
    with torch.no_grad():
        want = recurrent.apply_layer(0, hidden, ids)
        with pytest.raises(AssertionError, match="does not support float32"):
            chunk.apply_layer(0, hidden, ids)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = chunk.apply_layer(0, hidden, ids)
    torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)


def _numbers(value) -> int:
    if value is None:
        return 0
    if isinstance(value, torch.Tensor):
        return value.numel()
    return sum(_numbers(v) for v in value)


@pytest.mark.parametrize("name", sorted(MEMORIES))
def test_the_formula_is_what_fla_cache_keeps(name):
    """Measured: the recurrent and convolution states fla's own cache holds after a sequence,
    per sequence, equal the formula `state_numbers` sums per layer."""
    from fla.models.cache_utils import Cache

    memory = built(name).eval()
    mixer = memory.mixers["0"]
    batch = 3
    cache = Cache()
    with torch.no_grad():
        mixer(torch.randn(batch, 40, 64, device="cuda"), past_key_values=cache, use_cache=True)
    state = cache[0]
    kept = _numbers(state["recurrent_state"]) + _numbers(state["conv_state"])
    per_layer = type(memory).state_per_layer(memory.cfg, 64)
    assert kept == batch * per_layer
    assert memory.state_numbers(40) == len(memory.layer_indices()) * per_layer


@pytest.mark.parametrize("name", sorted(ROWS))
def test_the_training_step_reads_nothing_on_the_host(name):
    skip_if_refused(name)
    assert host_reads_with_memory(ROWS[name], device="cuda") == []


def zoo_run(tmp_path, memory: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", "from engram_core.cli import run_main; raise SystemExit(run_main())", str(ZOO),
           f"memory={memory}", "sweep={}", "stages.0.steps=60", "data.n_train=2048", "data.n_eval=128", *overrides,
           "--device", "cuda", "--out", str(tmp_path), "--quiet"]
    return subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("name", sorted(ROWS))
def test_a_short_zoo_run_trains_and_reports_its_state_size(tmp_path, name, compiled):
    """Compiled, the step graph-breaks around the fla layer (fla 0.6's GLA kernels fail inside
    inductor) and trains as the eager step does."""
    skip_if_refused(name)
    out = zoo_run(tmp_path, ROWS[name], *(["run.compile=true"] if compiled else []))
    assert out.returncode == 0, out.stderr
    (run_dir,) = (tmp_path / "memory_zoo").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    memory = MEMORIES[name](cuda_build())
    assert summary["final"]["eval/state_size"] == 2 * 64 * 2 * 2 + memory.state_numbers(64)  # window-2 keys/values + two fla layers
    assert 0.0 <= summary["final"]["eval/acc"] <= 1.0


@pytest.mark.skipif(REFUSAL is None, reason="fla runs Gated DeltaNet's backward on this machine (not Hopper, triton >= 3.7.1 or tilelang)")
def test_where_fla_refuses_gated_deltanet_the_run_is_one_line_and_exit_2(tmp_path):
    out = zoo_run(tmp_path, ROWS["gated_deltanet"])
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr
    assert "memory.type: fla:gated_deltanet: fla 0.6 refuses Gated DeltaNet's backward on Hopper GPUs" in errors[0]
    assert REFUSAL in errors[0]
    assert not any((tmp_path / "memory_zoo").glob("*/checkpoints")), "nothing should have trained"


@pytest.mark.skipif(REFUSAL is not None, reason=f"this machine: {REFUSAL}")
@pytest.mark.parametrize("tf32", [False, True], ids=["fp32", "tf32"])
def test_gated_deltanet_gradients_follow_fla_s_own_naive_recurrence(tf32):
    """Where fla runs Gated DeltaNet's backward (with tilelang on Hopper), its chunked kernels'
    output and gradients follow fla's plain-torch recurrence (`naive.py`): the check that the
    backend which took over from the refused Triton kernel (fla issue #640) computes the same
    gradients. The error is fla's own test measure, the RMS of the difference over the RMS of
    the reference."""
    import torch.nn.functional as F
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    from fla.ops.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    saved, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, tf32
    try:
        gen = torch.Generator(device="cuda").manual_seed(0)
        B, T, H, K = 2, 192, 2, 32  # three chunks of 64, the zoo rows' heads
        q = torch.randn(B, T, H, K, device="cuda", generator=gen)
        k = F.normalize(torch.randn(B, T, H, K, device="cuda", generator=gen), dim=-1)
        v = torch.randn(B, T, H, K, device="cuda", generator=gen)
        beta = torch.rand(B, T, H, device="cuda", generator=gen)
        g = F.logsigmoid(torch.randn(B, T, H, device="cuda", generator=gen))
        do = torch.randn(B, T, H, K, device="cuda", generator=gen)
        inputs = [t.requires_grad_() for t in (q, k, v, beta, g)]

        def output_and_grads(fn):
            o = fn()
            return [o.detach(), *torch.autograd.grad((o * do).sum(), inputs)]

        fast = output_and_grads(lambda: chunk_gated_delta_rule(q, k, v, g, beta)[0])
        ref = output_and_grads(lambda: naive_recurrent_gated_delta_rule(q, k, v, beta, g)[0])
        for name, a, b in zip(("o", "dq", "dk", "dv", "dbeta", "dg"), fast, ref):
            ratio = ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()
            assert ratio < 0.02, (name, ratio)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
