"""The fla references on the CPU: their configuration checks, the state-size formulas, and the
one-line errors a run gets without fla or a CUDA device. Nothing here runs fla's kernels
(Triton, CUDA only: tests/test_fla_gpu.py); the checks against fla's own layer shapes run where
fla imports (it does on a CPU with Triton installed) and are skipped elsewhere, with the reason."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from engram_fla import (
    DeltaNetConfig,
    DeltaNetMemory,
    GatedDeltaNetConfig,
    GatedDeltaNetMemory,
    GatedLinearAttentionConfig,
    GatedLinearAttentionMemory,
    deltanet_state,
    gated_backward_refusal,
    gated_deltanet_state,
    gla_state,
    require_fla_on_cuda,
)
from engram_fla import memories as fla_memories
from engram_fla.memories import INSTALL, FlaLayerMemory, kernel_environment, triton_release
from torch import nn

from engram_core import BuildContext
from engram_core.config import ConfigError, structure
from engram_core.testing.points import backbone_build

ZOO = Path(__file__).resolve().parents[3] / "recipes" / "memory_zoo.toml"


def fla_layers():
    """fla.layers, or a skip saying why it is not importable here."""
    try:
        return importlib.import_module("fla.layers")
    except ImportError as exc:
        pytest.skip(f"flash-linear-attention not importable here (missing module {exc.name!r}); the extra is engram-fla[fla]")


def on_cuda(build: BuildContext) -> BuildContext:
    """The same build, for a run on a CUDA device: the memory is built on the CPU and moved by
    the engine, so construction needs no GPU (only the kernels do)."""
    build.device = torch.device("cuda")
    return build


# ---- configuration -------------------------------------------------------------------------


def test_configs_come_from_recipe_tables_with_their_checks():
    cfg = structure({"num_heads": 4, "head_dim": 16, "expand_v": 2.0, "layers": [0]}, GatedDeltaNetConfig)
    assert (cfg.num_heads, cfg.head_dim, cfg.expand_v, cfg.layers) == (4, 16, 2.0, [0])
    with pytest.raises(ConfigError, match="head_dim \\* expand_v must be a whole number"):
        GatedDeltaNetConfig(head_dim=3, expand_v=0.5)
    with pytest.raises(ConfigError, match="num_heads"):
        structure({"num_heads": 0}, GatedDeltaNetConfig)
    with pytest.raises(ConfigError, match="names a block twice"):
        GatedLinearAttentionConfig(layers=[1, 1])
    with pytest.raises(ConfigError, match="0-based block indices"):
        GatedLinearAttentionConfig(layers=[-1])
    cfg = structure({"num_heads": 4, "expand_v": 2.0, "layers": [1]}, DeltaNetConfig)
    assert (cfg.num_heads, cfg.expand_k, cfg.expand_v, cfg.use_short_conv, cfg.use_gate) == (4, 1.0, 2.0, True, False)


@pytest.mark.parametrize("config, state", [(GatedLinearAttentionConfig, gla_state), (DeltaNetConfig, deltanet_state)])
def test_widths_that_fla_would_assert_on_are_config_errors(config, state):
    with pytest.raises(ConfigError, match="num_heads: must divide width \\* expand_k = 64, got 3") as err:
        state(config(num_heads=3), 64)
    assert err.value.key == "num_heads"
    with pytest.raises(ConfigError, match="expand_v"):
        state(config(expand_v=0.3), 64)


@pytest.mark.parametrize("memory_cls, cfg", [(GatedDeltaNetMemory, GatedDeltaNetConfig(layers=[2])),
                                             (DeltaNetMemory, DeltaNetConfig(layers=[3])),
                                             (GatedLinearAttentionMemory, GatedLinearAttentionConfig(layers=[0, 5]))])
def test_a_block_the_head_lacks_is_named_before_fla_is_asked_for(memory_cls, cfg):
    with pytest.raises(ConfigError, match="does not exist: the head has 2 blocks") as err:
        memory_cls(cfg, on_cuda(backbone_build(width=64, n_layers=2)))
    assert err.value.key == "layers"


# ---- state size (Zoology's: numbers carried per sequence at inference) ------------------------


def test_gated_deltanet_state_by_hand():
    # the zoo's rows: 2 heads of 32 x 32, short convolutions of 4 over q, k, v (64 channels each)
    assert gated_deltanet_state(GatedDeltaNetConfig(num_heads=2, head_dim=32, expand_v=1.0)) == 2 * 32 * 32 + 4 * (64 + 64 + 64)
    # fla's default value expansion doubles the state and the value convolution
    assert gated_deltanet_state(GatedDeltaNetConfig(num_heads=2, head_dim=32, expand_v=2.0)) == 2 * 32 * 64 + 4 * (64 + 64 + 128)
    assert gated_deltanet_state(GatedDeltaNetConfig(num_heads=4, head_dim=16, use_short_conv=False)) == 4 * 16 * 16


def test_gla_state_by_hand():
    # width 64, 2 heads: keys 64 (32 a head), values 64 (32 a head); no short convolution (fla's default)
    assert gla_state(GatedLinearAttentionConfig(num_heads=2), 64) == 2 * 32 * 32
    assert gla_state(GatedLinearAttentionConfig(num_heads=4, expand_k=0.5), 64) == 4 * 8 * 16
    assert gla_state(GatedLinearAttentionConfig(num_heads=2, use_short_conv=True, conv_size=3), 64) == 2 * 32 * 32 + 3 * (64 + 64 + 64)


def test_deltanet_state_by_hand():
    # the zoo's rows: as Gated DeltaNet's, 2 heads of 32 x 32 and short convolutions of 4 over q, k, v
    assert deltanet_state(DeltaNetConfig(num_heads=2), 64) == 2 * 32 * 32 + 4 * (64 + 64 + 64)
    assert deltanet_state(DeltaNetConfig(num_heads=2), 64) == gated_deltanet_state(GatedDeltaNetConfig(num_heads=2, head_dim=32))
    assert deltanet_state(DeltaNetConfig(num_heads=4, expand_v=2.0, conv_size=3), 64) == 4 * 16 * 32 + 3 * (64 + 64 + 128)
    assert deltanet_state(DeltaNetConfig(num_heads=2, use_short_conv=False), 128) == 2 * 64 * 64


def _fla_layer_state(layer) -> int:
    """What an fla layer keeps per sequence, read off its own attributes: the recurrent state of
    each value head and the window of each short convolution (kernel_size x channels)."""
    heads = getattr(layer, "num_v_heads", None) or layer.num_heads
    convs = [getattr(layer, n) for n in ("q_conv1d", "k_conv1d", "v_conv1d") if getattr(layer, n, None) is not None]
    return heads * layer.head_k_dim * layer.head_v_dim + sum(c.hidden_size * c.kernel_size[0] for c in convs)


@pytest.mark.parametrize("cfg", [GatedDeltaNetConfig(), GatedDeltaNetConfig(num_heads=4, head_dim=16, expand_v=2.0),
                                 GatedDeltaNetConfig(use_short_conv=False)])
def test_gated_deltanet_formula_matches_the_layer_fla_builds(cfg):
    layers = fla_layers()
    layer = layers.GatedDeltaNet(hidden_size=64, num_heads=cfg.num_heads, head_dim=cfg.head_dim, expand_v=cfg.expand_v,
                                 use_short_conv=cfg.use_short_conv, conv_size=cfg.conv_size)
    assert gated_deltanet_state(cfg) == _fla_layer_state(layer)


@pytest.mark.parametrize("cfg", [GatedLinearAttentionConfig(), GatedLinearAttentionConfig(num_heads=4, expand_k=0.5),
                                 GatedLinearAttentionConfig(use_short_conv=True)])
def test_gla_formula_matches_the_layer_fla_builds(cfg):
    layers = fla_layers()
    layer = layers.GatedLinearAttention(hidden_size=64, num_heads=cfg.num_heads, expand_k=cfg.expand_k, expand_v=cfg.expand_v,
                                        use_short_conv=cfg.use_short_conv, conv_size=cfg.conv_size)
    assert gla_state(cfg, 64) == _fla_layer_state(layer)


@pytest.mark.parametrize("cfg", [DeltaNetConfig(), DeltaNetConfig(num_heads=4, expand_v=2.0), DeltaNetConfig(use_short_conv=False)])
def test_deltanet_formula_matches_the_layer_fla_builds(cfg):
    layers = fla_layers()
    layer = layers.DeltaNet(hidden_size=64, num_heads=cfg.num_heads, expand_k=cfg.expand_k, expand_v=cfg.expand_v,
                            use_short_conv=cfg.use_short_conv, conv_size=cfg.conv_size)
    assert deltanet_state(cfg, 64) == _fla_layer_state(layer)


def test_the_backbone_reports_window_cache_plus_every_fla_layer():
    """`causal_backbone.state_size` (what `completion_accuracy` logs as eval/state_size): the
    window's keys and values in each block plus the memory's `state_numbers`, one fla layer
    per block it acts after."""
    fla_layers()
    from engram_core.builtin.backbone import CausalBackbone, CausalBackboneConfig
    from engram_core.components import DataSpec, Model

    spec = DataSpec("test", vocab_size=64, max_len=64)
    head = CausalBackbone(CausalBackboneConfig(dim=64, n_layers=2, n_heads=4, window=2), BuildContext(spec=spec))
    build = BuildContext(spec=spec, head=head, device=torch.device("cuda"))
    memory = GatedDeltaNetMemory(GatedDeltaNetConfig(num_heads=2, head_dim=32), build)
    Model(head, memory, "layer")
    assert memory.layer_indices() == (0, 1)
    assert memory.state_numbers(64) == memory.state_numbers(256) == 2 * gated_deltanet_state(memory.cfg)
    assert head.state_size(64) == 2 * 64 * 2 * 2 + 2 * (2 * 32 * 32 + 4 * 192)


# ---- what a run without fla or a GPU is told --------------------------------------------------


def test_without_fla_the_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "fla.layers", None)  # import fla.layers now raises ImportError
    with pytest.raises(ConfigError) as err:
        require_fla_on_cuda(BuildContext(device=torch.device("cuda")), "fla:gated_deltanet")
    assert err.value.key == "type"
    assert "flash-linear-attention is not installed" in err.value.message and INSTALL in err.value.message
    assert "device" not in err.value.message
    with pytest.raises(ConfigError) as both:
        require_fla_on_cuda(BuildContext(device=torch.device("cpu")), "fla:gla")
    assert "device is 'cpu'" in both.value.message and "not installed" in both.value.message


def test_a_dry_build_asks_for_the_package_not_the_device(monkeypatch):
    """`engram validate` builds on the meta device: a recipe for the GPU validates elsewhere."""
    monkeypatch.setitem(sys.modules, "fla.layers", None)
    with pytest.raises(ConfigError) as err:
        require_fla_on_cuda(BuildContext(device=torch.device("meta"), dry_run=True), "fla:gla")
    assert "not installed" in err.value.message and "device" not in err.value.message


def test_on_the_cpu_the_error_names_the_device():
    layers = fla_layers()
    assert require_fla_on_cuda(BuildContext(device=torch.device("cuda")), "fla:gla") is layers
    with pytest.raises(ConfigError, match="this run's device is 'cpu' and fla has no CPU path") as err:
        require_fla_on_cuda(BuildContext(device=torch.device("cpu")), "fla:gla")
    assert "not installed" not in err.value.message


def test_a_cpu_run_is_one_line_and_exit_2(tmp_path):
    """The user's view: `engram-run` of the zoo with an fla memory on a machine without a GPU."""
    cmd = [sys.executable, "-c", "from engram_core.cli import run_main; raise SystemExit(run_main())", str(ZOO),
           'memory={ type = "fla:gated_deltanet" }', "sweep={}", "data.n_train=64", "data.n_eval=32",
           "--device", "cpu", "--out", str(tmp_path), "--quiet"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr
    assert "memory.type: fla:gated_deltanet runs flash-linear-attention's Triton kernels on a CUDA GPU" in errors[0]
    assert "device is 'cpu'" in errors[0]
    assert not any((tmp_path / "memory_zoo").glob("*/checkpoints")), "nothing should have trained"


def test_the_layer_refuses_a_cached_step_and_a_cpu_tensor():
    """Built for a CUDA run (construction needs no GPU), the memory still says in words why it
    cannot answer a KV-cached generation step, or a CPU tensor; validate's dry forward skips it
    (`cpu_forward = False`)."""
    fla_layers()
    memory = GatedLinearAttentionMemory(GatedLinearAttentionConfig(layers=[1]), on_cuda(backbone_build(width=64)))
    hidden, ids = torch.randn(2, 1, 64), torch.randint(0, 64, (2, 9))
    with pytest.raises(RuntimeError, match="generate with use_cache=False"):
        memory.apply_layer(1, hidden, ids)
    with pytest.raises(RuntimeError, match="need a CUDA tensor.*no CPU path"):
        memory.apply_layer(1, torch.randn(2, 9, 64), ids)
    assert type(memory).cpu_forward is False
    assert memory.apply_layer(0, hidden, ids) is hidden  # a block it does not act after passes through


# ---- fla's refusal of Gated DeltaNet's backward on Hopper (fla issue #640) -------------------


def test_triton_versions_are_read_as_releases():
    assert triton_release("3.6.0") == (3, 6, 0, True)
    assert triton_release("3.7.1+git5a1b2c") == (3, 7, 1, True)
    assert triton_release("3.7.1rc1") == (3, 7, 1, False)
    assert triton_release("3.8") == (3, 8, 0, True)
    assert triton_release("nightly") is None


@pytest.mark.parametrize("capability, triton, tilelang, refused", [
    ((9, 0), "3.6.0", False, True),  # the project's H100/H200 machine: torch 2.11's bundled triton
    ((9, 0), "3.4.0", False, True),  # fla's lower bound is inclusive
    ((9, 0), "3.7.1rc1", False, True),  # a pre-release of 3.7.1 is below it
    ((9, 0), "3.7.1", False, False),  # fla's fix
    ((9, 0), "3.8.0", False, False),
    ((9, 0), "3.3.1", False, False),  # before the regression
    ((9, 0), "3.6.0", True, False),  # tilelang takes the kernel
    ((8, 0), "3.6.0", False, False),  # an A100 is not Hopper
    ((10, 0), "3.6.0", False, False),  # nor is a Blackwell
    (None, "3.6.0", False, False),  # no CUDA device
    ((9, 0), None, False, False),  # no triton: fla does not import, said elsewhere
    ((9, 0), "custom-build", False, False),  # not comparable: fla's own check decides
])
def test_the_refusal_follows_fla_conditions(capability, triton, tilelang, refused):
    reason = gated_backward_refusal(capability, triton, tilelang)
    assert (reason is not None) == refused
    if refused:
        assert f"with triton {triton}" in reason and "compute capability 9.0" in reason
        assert "fla issue #640" in reason and "triton >= 3.7.1 or tilelang" in reason
        assert "\n" not in reason


def test_the_environment_is_read_through_public_apis(monkeypatch):
    """The device's capability only for a CUDA device; Triton's version from its distribution
    (the nightly wheel is `pytorch-triton`); tilelang by whether it can be imported."""
    versions = {"pytorch-triton": "3.7.0+gitabc"}

    def version(name):
        if name not in versions:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(importlib.metadata, "version", version)
    assert kernel_environment(torch.device("cpu")) == (None, "3.7.0+gitabc", importlib.util.find_spec("tilelang") is not None)
    versions["triton"] = "3.6.0"
    assert kernel_environment(torch.device("cpu"))[1] == "3.6.0"
    versions.clear()
    assert kernel_environment(torch.device("cpu"))[1] is None


# ---- stand-in fla layers on the CPU: the build's checks and torch.compile ---------------------


class StandInLayer(nn.Module):
    """Takes an fla layer's place on the CPU: hidden -> (output, None, None), a causal running
    mean of a projection. At each call it records whether torch.compile was tracing it: fla's
    Triton kernels fail there, so the adapter must keep it out of the graph."""

    def __init__(self, hidden_size: int, calls: list):
        super().__init__()
        self.proj = nn.Linear(hidden_size, hidden_size)
        self.calls = calls

    def forward(self, hidden, **kwargs):
        self.calls.append(torch.compiler.is_compiling())
        steps = torch.arange(1, hidden.shape[1] + 1, dtype=hidden.dtype, device=hidden.device).view(1, -1, 1)
        return self.proj(hidden).cumsum(1) / steps, None, None


class StandInMemory(FlaLayerMemory):
    type_name = "fla:stand_in"
    kernel_device = "cpu"

    @staticmethod
    def state_per_layer(cfg, width):
        return width

    def make_layer(self, fla_layers, width, index):
        return fla_layers.StandIn(width)


@pytest.fixture
def stand_in_fla(monkeypatch):
    """`fla.layers` replaced by a module of stand-in layers (DeltaNet, GatedDeltaNet,
    GatedLinearAttention and StandIn take any arguments); its `calls` list what each call saw."""
    module = types.ModuleType("fla.layers")
    module.calls = []
    for name in ("StandIn", "DeltaNet", "GatedDeltaNet", "GatedLinearAttention"):
        setattr(module, name, lambda hidden_size, *args, **kwargs: StandInLayer(hidden_size, module.calls))
    monkeypatch.setitem(sys.modules, "fla.layers", module)
    return module


@pytest.mark.parametrize("memory_cls, cfg, refused", [
    (GatedDeltaNetMemory, GatedDeltaNetConfig(), True),
    (DeltaNetMemory, DeltaNetConfig(), False),  # its chunk backward has no gate (fla passes g=None)
    (GatedLinearAttentionMemory, GatedLinearAttentionConfig(), False),  # its own chunk kernels
])
def test_gated_deltanet_is_refused_at_build_where_fla_would_refuse_its_backward(monkeypatch, stand_in_fla, memory_cls, cfg, refused):
    seen = []

    def hopper_with_triton_3_6(device):
        seen.append(device)
        return (9, 0), "3.6.0", False

    monkeypatch.setattr(fla_memories, "kernel_environment", hopper_with_triton_3_6)
    if refused:
        with pytest.raises(ConfigError) as err:
            memory_cls(cfg, on_cuda(backbone_build(width=64)))
        assert err.value.key == "type"
        assert err.value.message.startswith("fla:gated_deltanet: fla 0.6 refuses Gated DeltaNet's backward on Hopper GPUs")
        assert "triton 3.6.0" in err.value.message
        assert seen == [torch.device("cuda")]
    else:
        assert len(memory_cls(cfg, on_cuda(backbone_build(width=64))).mixers) == 2
    seen.clear()
    dry = backbone_build(width=64)
    dry.device, dry.dry_run = torch.device("meta"), True  # `engram validate` may run on another machine
    memory_cls(cfg, dry)
    assert seen == []


@pytest.mark.parametrize("memory_cls, cfg, mode", [
    (DeltaNetMemory, DeltaNetConfig(), "fused_recurrent"),  # fla's chunk delta rule refuses float32
    (DeltaNetMemory, DeltaNetConfig(mode="chunk"), "chunk"),
    (GatedDeltaNetMemory, GatedDeltaNetConfig(), "chunk"),
    (GatedLinearAttentionMemory, GatedLinearAttentionConfig(), "chunk"),
])
def test_each_layer_is_built_in_the_mode_its_config_says(monkeypatch, stand_in_fla, memory_cls, cfg, mode):
    """fla 0.6's DeltaNet picks its fused recurrent kernels for 64 positions or fewer and its mode
    beyond; its chunk kernels assert on float32, so the default (a float32 run at any length) is
    the fused recurrent mode. Gated DeltaNet and GLA train in chunk mode (float32 included)."""
    asked = []
    for name in ("DeltaNet", "GatedDeltaNet", "GatedLinearAttention"):
        monkeypatch.setattr(stand_in_fla, name, lambda hidden_size, mode, layer_idx, **kw: asked.append((mode, layer_idx)) or nn.Identity())
    monkeypatch.setattr(fla_memories, "kernel_environment", lambda device: (None, None, True))
    memory_cls(cfg, on_cuda(backbone_build(width=64)))
    assert asked == [(mode, 0), (mode, 1)]


def test_deltanet_mode_is_one_of_fla_s_two():
    assert structure({"mode": "chunk"}, DeltaNetConfig).mode == "chunk"
    with pytest.raises(ConfigError, match="mode: must be one of 'fused_recurrent', 'chunk', got 'fused_chunk'"):
        structure({"mode": "fused_chunk"}, DeltaNetConfig)


def _stand_in_model(width: int = 32):
    from engram_core.components import Model

    build = on_cuda(backbone_build(width=width))
    torch.manual_seed(0)
    memory = StandInMemory(GatedDeltaNetConfig(), build)
    return Model(build.head, memory, "layer"), memory


def test_the_fla_layer_runs_outside_a_compiled_graph(stand_in_fla):
    torch.compiler.reset()
    _, memory = _stand_in_model()
    hidden, ids = torch.randn(2, 12, 32), torch.randint(0, 64, (2, 12))
    expected = memory.apply_layer(1, hidden, ids)
    stand_in_fla.calls.clear()
    got = torch.compile(lambda h: memory.apply_layer(1, h, ids) * 2, backend="eager")(hidden)
    assert stand_in_fla.calls == [False], "the fla layer was traced by torch.compile"
    torch.testing.assert_close(got, expected * 2)
    # the control: the same layer called without the adapter is traced (what failed on fla's kernels)
    stand_in_fla.calls.clear()
    torch.compile(lambda h: memory.mixers["1"](h)[0], backend="eager")(hidden)
    assert stand_in_fla.calls == [True]


def test_a_compiled_training_step_of_the_backbone_equals_the_eager_one(stand_in_fla):
    """The backbone with an fla-like layer after both blocks, forward and backward through
    AOTAutograd: the step compiles around the layer (never traced) and gives the eager step's
    loss and gradients."""
    torch.compiler.reset()
    model, memory = _stand_in_model()
    ids = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))

    def step(forward):
        model.zero_grad(set_to_none=True)
        logits = forward(ids)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = step(model)
    stand_in_fla.calls.clear()
    compiled_loss, compiled_grads = step(torch.compile(model, backend="aot_eager"))
    assert stand_in_fla.calls == [False, False], "both fla layers should run, untraced"
    torch.testing.assert_close(compiled_loss, eager_loss)
    assert compiled_grads.keys() == eager_grads.keys() and any(n.startswith("memory.mixers") for n in eager_grads)
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], msg=name)
