"""flash-linear-attention's recurrent layers as `layer` memories (engram_core.points.LayerPoint):
Gated DeltaNet, DeltaNet (the ungated delta rule) and GLA.

After each chosen decoder block of the head, one fla layer reads the block's output through an
RMSNorm and adds what it returns (a pre-norm residual branch, as in fla's own blocks):

    hidden <- hidden + fla_layer(rms_norm(hidden))

On the memory zoo's backbone (sliding-window attention of 2 positions) the attention sees only
the last two positions; everything older reaches a position through the fla layer's recurrent
state. These are the zoo's references from the field's library, not memories of ours.

fla runs Triton kernels on a CUDA GPU and has no CPU path (fla 0.6: even the short convolution
and the gated norm are Triton), so building one of these memories for a run on another device,
or without fla installed, is a one-line error naming what is missing (`require_fla_on_cuda`).

State size (Zoology's "state size": numbers one sequence carries from position to position at
inference) is the recurrent state, num_heads x head_k_dim x head_v_dim per layer, plus the short
convolutions' window, conv_size x channels (what fla's cache keeps: the current input and the
conv_size - 1 before it, as the backbone counts a window of `window` positions), summed over
the layers the memory acts after (`gated_deltanet_state`, `deltanet_state`, `gla_state`).

Under `run.compile` the fla layer's call is left out of the compiled graph
(`torch.compiler.disable`): fla launches its own Triton kernels, with their own autograd
functions and autotuning, and inductor tracing into them fails (fla 0.6's fused recurrent GLA:
"Loop-carried variable b_dh has initial type fp32 but is re-assigned to fp64"). The step then
compiles around the layer, which runs fla's kernels as they are.

fla 0.6 refuses Gated DeltaNet's chunk backward on Hopper GPUs with Triton >= 3.4.0 and
< 3.7.1 unless tilelang is installed (its issue #640: wrong gradients); a run there is told so
at build, not at its first backward (`gated_backward_refusal`).

Cached generation (one new token a call, the backbone's KV cache) is refused with a clear error:
the recurrent state lives in the layer, and the layer point hands a memory ids, not earlier
hidden states. Teacher-forced evaluation (the zoo's `completion_accuracy`) and generation
without the KV cache (`use_cache=False`) run the whole sequence and are exact.
"""

from __future__ import annotations

import abc
import importlib
import importlib.metadata
import importlib.util
import math
import re
from types import ModuleType

import attrs
import torch
from torch import nn

from engram_core import BuildContext, Memory, field
from engram_core.config import ConfigError, one_of, positive
from engram_core.points import LayerPoint

INSTALL = "pip install 'engram-fla[fla]' (flash-linear-attention 0.6 with Triton; transformers >= 5.6.2)"


def _layer_list(inst, attribute, value):
    bad = [i for i in value if not isinstance(i, int) or i < 0]
    if bad:
        raise ConfigError(attribute.name, f"must be 0-based block indices, got {bad[0]!r}")
    if len(set(value)) != len(value):
        raise ConfigError(attribute.name, f"names a block twice: {sorted(value)}")


def _layers_field():
    return field(factory=list, help="decoder blocks (0-based) after which an fla layer acts; [] = every block", validator=_layer_list)


@attrs.frozen
class GatedDeltaNetConfig:
    """fla.layers.GatedDeltaNet (Yang, Kautz, Hatamizadeh 2024) after chosen blocks."""

    layers: list[int] = _layers_field()
    num_heads: int = field(2, help="heads (each keeps a head_dim x head_dim * expand_v state)", validator=positive)
    head_dim: int = field(32, help="key (and query) width per head", validator=positive)
    expand_v: float = field(1.0, help="value width per head = head_dim * expand_v (fla's default is 2)", validator=positive)
    use_short_conv: bool = field(True, help="causal depthwise convolutions on q, k, v (fla: 'crucial to the performance')")
    conv_size: int = field(4, help="kernel of the short convolutions", validator=positive)
    use_gate: bool = field(True, help="output gate (fla's default)")
    allow_neg_eigval: bool = field(False, help="beta in (0, 2): negative eigenvalues of the transition")

    def __attrs_post_init__(self):
        head_v = self.head_dim * self.expand_v
        if not math.isclose(head_v, round(head_v)):
            raise ConfigError("expand_v", f"head_dim * expand_v must be a whole number, got {self.head_dim} * {self.expand_v} = {head_v}")


@attrs.frozen
class DeltaNetConfig:
    """fla.layers.DeltaNet (Schlag et al. 2021; Yang et al. 2024's chunked training): the delta
    rule without Gated DeltaNet's decay, after chosen blocks."""

    layers: list[int] = _layers_field()
    num_heads: int = field(2, help="heads (must divide width * expand_k and width * expand_v)", validator=positive)
    expand_k: float = field(1.0, help="key width = head width * expand_k (fla's default)", validator=positive)
    expand_v: float = field(1.0, help="value width = head width * expand_v (fla's default)", validator=positive)
    use_short_conv: bool = field(True, help="causal depthwise convolutions on q, k, v (fla's default)")
    conv_size: int = field(4, help="kernel of the short convolutions", validator=positive)
    use_gate: bool = field(False, help="output gate (off in fla's default)")
    allow_neg_eigval: bool = field(False, help="beta in (0, 2): negative eigenvalues of the transition")
    mode: str = field(
        "fused_recurrent",
        help="fla's kernels: 'fused_recurrent' (exact in float32 at every length) or 'chunk' (bfloat16 or float16 "
             "inputs only: run.precision = 'bf16'; fla 0.6's chunk delta rule refuses float32)",
        validator=one_of("fused_recurrent", "chunk"),
    )


@attrs.frozen
class GatedLinearAttentionConfig:
    """fla.layers.GatedLinearAttention (Yang, Wang, Shen, Panda, Kim 2023) after chosen blocks."""

    layers: list[int] = _layers_field()
    num_heads: int = field(2, help="heads (must divide width * expand_k and width * expand_v)", validator=positive)
    expand_k: float = field(1.0, help="key width = head width * expand_k (fla's default is 0.5)", validator=positive)
    expand_v: float = field(1.0, help="value width = head width * expand_v", validator=positive)
    use_short_conv: bool = field(False, help="causal depthwise convolutions on q, k, v (off in fla's default)")
    conv_size: int = field(4, help="kernel of the short convolutions", validator=positive)
    gate_low_rank_dim: int = field(16, help="rank of the forget-gate projection", validator=positive)
    gate_logit_normalizer: int = field(16, help="the forget gate's log-sigmoid is divided by this", validator=positive)


def gated_deltanet_state(cfg: GatedDeltaNetConfig) -> int:
    """Numbers one Gated DeltaNet layer carries per sequence: the state S (num_heads x head_k x
    head_v) and, with short convolutions, their windows over q, k (key width each) and v."""
    head_v = round(cfg.head_dim * cfg.expand_v)
    key_width, value_width = cfg.num_heads * cfg.head_dim, cfg.num_heads * head_v
    conv = cfg.conv_size * (2 * key_width + value_width) if cfg.use_short_conv else 0
    return cfg.num_heads * cfg.head_dim * head_v + conv


def expanded_widths(cfg: GatedLinearAttentionConfig | DeltaNetConfig, width: int) -> tuple[int, int]:
    """(key width, value width) of a GLA or DeltaNet layer on a head of `width`; ConfigError
    where fla's layer would refuse them (it asserts, which would be a traceback)."""
    out = []
    for key, expand in (("expand_k", cfg.expand_k), ("expand_v", cfg.expand_v)):
        size = width * expand
        if not math.isclose(size, round(size)) or round(size) == 0:
            raise ConfigError(key, f"head width {width} * {key} must be a positive whole number, got {size}")
        if round(size) % cfg.num_heads:
            raise ConfigError("num_heads", f"must divide width * {key} = {round(size)}, got {cfg.num_heads}")
        out.append(round(size))
    return out[0], out[1]


def gla_state(cfg: GatedLinearAttentionConfig, width: int) -> int:
    """Numbers one GLA layer carries per sequence: the state (num_heads x head_k x head_v) and,
    with short convolutions, their windows over q, k and v."""
    return _expanded_layer_state(cfg, width)


def deltanet_state(cfg: DeltaNetConfig, width: int) -> int:
    """Numbers one DeltaNet layer carries per sequence: the state S (num_heads x head_k x head_v)
    and, with short convolutions, their windows over q, k and v."""
    return _expanded_layer_state(cfg, width)


def _expanded_layer_state(cfg: GatedLinearAttentionConfig | DeltaNetConfig, width: int) -> int:
    key_width, value_width = expanded_widths(cfg, width)
    conv = cfg.conv_size * (2 * key_width + value_width) if cfg.use_short_conv else 0
    return key_width * value_width // cfg.num_heads + conv


def require_fla_on_cuda(build: BuildContext, type_name: str) -> ModuleType:
    """`fla.layers`, where the run can use it; otherwise one ConfigError naming everything missing
    (the device, the package). A dry build (`engram validate`, device meta) checks only the
    package: a recipe may be validated on a machine without the GPU it will run on."""
    problems = []
    device = torch.device(build.device)
    if not build.dry_run and device.type != "cuda":
        problems.append(f"this run's device is '{device}' and fla has no CPU path (run with --device cuda on a GPU)")
    layers = None
    try:
        layers = importlib.import_module("fla.layers")
    except ImportError as exc:
        missing = f" (missing module '{exc.name}')" if exc.name else f" ({exc})"
        problems.append(f"flash-linear-attention is not installed{missing}: {INSTALL}")
    if problems:
        raise ConfigError("type", f"{type_name} runs flash-linear-attention's Triton kernels on a CUDA GPU, but " + "; and ".join(problems))
    return layers


# fla 0.6 (fla/ops/common/chunk_o.py, chunk_bwd_dqkwg): the gated chunk backward is refused on
# Hopper for Triton >= 3.4.0 and < 3.7.1 unless its tilelang backend takes the call (issue #640)
REFUSED_TRITON = ((3, 4, 0), (3, 7, 1))


def triton_release(version: str) -> tuple[int, int, int, bool] | None:
    """(major, minor, micro, final) of a Triton version such as '3.6.0', '3.7.1+git5a1b' or
    '3.7.1rc1' (final False: a pre-release, which sorts before its release); None where the
    string does not start with a version number."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?(.*)", version.strip())
    if match is None:
        return None
    major, minor, micro, rest = match.groups()
    pre_release = re.match(r"[.-]?(a|b|c|rc|alpha|beta|pre|preview|dev)\d*", rest or "") is not None
    return int(major), int(minor), int(micro or 0), not pre_release


def gated_backward_refusal(capability: tuple[int, int] | None, triton_version: str | None, has_tilelang: bool) -> str | None:
    """Why fla 0.6 would stop Gated DeltaNet at its first backward on this machine, or None where
    it would not: a Hopper GPU (compute capability 9.x, fla's own test), Triton >= 3.4.0 and
    < 3.7.1, and no tilelang (fla's backend for that kernel there)."""
    if capability is None or capability[0] != 9 or has_tilelang or triton_version is None:
        return None
    found = triton_release(triton_version)
    if found is None:
        return None  # not a version we can compare: fla's own check decides at the backward
    low, high = REFUSED_TRITON
    below_high = found[:3] < high or (found[:3] == high and not found[3])
    if not (found[:3] >= low and below_high):
        return None
    return (f"fla 0.6 refuses Gated DeltaNet's backward on Hopper GPUs (this device: compute capability "
            f"{capability[0]}.{capability[1]}) with triton {triton_version}, which computes its gated chunk gradients "
            "wrongly there (fla issue #640): install triton >= 3.7.1 or tilelang (pip install tilelang), "
            "or use fla:deltanet or fla:gla")


def kernel_environment(device: torch.device) -> tuple[tuple[int, int] | None, str | None, bool]:
    """(compute capability of `device`, the installed Triton's version, whether tilelang is
    installed): what `gated_backward_refusal` decides on, read through public APIs only."""
    capability = None
    if device.type == "cuda" and torch.cuda.is_available():
        capability = tuple(torch.cuda.get_device_capability(device))
    triton_version = None
    for distribution in ("triton", "pytorch-triton"):  # the release and the nightly wheels
        try:
            triton_version = importlib.metadata.version(distribution)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    return capability, triton_version, importlib.util.find_spec("tilelang") is not None


class FlaLayerMemory(Memory, LayerPoint):
    """One fla layer after each chosen decoder block, as a pre-norm residual branch. Subclasses
    say which layer (`make_layer`), how much state it keeps (`state_per_layer`) and, where fla
    is known to refuse its kernels, that it does (`check_kernels`)."""

    independent_batch_items = True
    type_name = "fla"
    fla_layer_class: str  # the layer class in fla.layers (a subclass says which)
    kernel_device = "cuda"  # where fla's Triton kernels run (a test's stand-in layer may say "cpu")
    cpu_forward = False  # engram validate's dry forward (on the CPU) skips these memories, saying why

    def __init__(self, cfg, build: BuildContext):
        super().__init__()
        head = build.head
        dims = getattr(head, "memory_dims", None)
        if dims is None:
            raise ConfigError(None, f"{self.type_name} needs a head with memory_dims() (width, vocabulary, blocks), such as causal_backbone")
        width, _, n_blocks = dims()
        blocks = list(cfg.layers) or list(range(n_blocks))
        outside = [i for i in blocks if i >= n_blocks]
        if outside:
            raise ConfigError("layers", f"block {outside[0]} does not exist: the head has {n_blocks} blocks (0..{n_blocks - 1})")
        self.cfg = cfg
        _fla_layer_runs_eagerly()
        self._state_per_layer = self.state_per_layer(cfg, width)  # every size checked before fla is asked for
        fla_layers = require_fla_on_cuda(build, self.type_name)
        if not build.dry_run:
            self.check_kernels(torch.device(build.device))
        self.norms = nn.ModuleDict({str(i): nn.RMSNorm(width, eps=1e-5) for i in sorted(blocks)})
        self.mixers = nn.ModuleDict({str(i): self.make_layer(fla_layers, width, i) for i in sorted(blocks)})

    # what a subclass says
    @staticmethod
    @abc.abstractmethod
    def state_per_layer(cfg, width: int) -> int:
        """Numbers one layer of this kind carries per sequence (checks the sizes: ConfigError)."""

    def make_layer(self, fla_layers: ModuleType, width: int, index: int) -> nn.Module:
        """The fla layer after block `index`: the class `fla_layer_class` of the module
        `fla.layers`, given the config's fields (each named as fla's argument), in chunk mode
        unless the config names its `mode`."""
        options = {"mode": "chunk", **{k: v for k, v in attrs.asdict(self.cfg).items() if k != "layers"}}
        return getattr(fla_layers, self.fla_layer_class)(hidden_size=width, layer_idx=index, **options)

    def check_kernels(self, device: torch.device) -> None:
        """ConfigError where fla is known to refuse this layer's kernels on `device` (said at
        build, not at the first step); by default nothing is."""

    # Zoology's state size (the head adds its own attention cache: causal_backbone.state_size)
    def state_numbers(self, seq_len: int) -> int:
        """Per sequence, whatever its length: each fla layer's recurrent state and conv window."""
        return len(self.mixers) * self._state_per_layer

    # -- the layer point -------------------------------------------------------------------
    def layer_indices(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.mixers)

    def apply_layer(self, index: int, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # compared as ints, not looked up by str(index): torch.compile may trace `index` as a
        # symbolic int, which str() cannot take without a graph break
        key = next((k for k in self.mixers if int(k) == index), None)
        if not self.enabled or key is None:
            return hidden
        if hidden.shape[1] != ids.shape[1]:
            raise RuntimeError(f"{self.type_name} keeps a recurrent state that the backbone's KV cache does not carry: "
                               f"a cached generation step ({hidden.shape[1]} new of {ids.shape[1]} positions) cannot be "
                               "answered; generate with use_cache=False (exact: the whole sequence is run again)")
        if hidden.device.type != self.kernel_device:
            raise RuntimeError(f"{self.type_name} runs fla's Triton kernels, which need a CUDA tensor, got one on '{hidden.device}' "
                               "(fla has no CPU path)")
        return hidden + self.run_fla_layer(key, self.norms[key](hidden))

    def run_fla_layer(self, key: str, normed: torch.Tensor) -> torch.Tensor:
        """The fla layer after block `key`, outside any compiled graph: under `run.compile`
        the step graph-breaks here and fla's kernels run as fla launches them (inductor fails
        to compile them). `torch.compiler.disable` is applied when the first fla memory is
        built (`_fla_layer_runs_eagerly`), not as a decorator: the decorator imports
        torch._dynamo, which `engram plugins` and `engram validate` should not pay."""
        out, _, _ = self.mixers[key](normed)
        return out


def _fla_layer_runs_eagerly() -> None:
    """`torch.compiler.disable` on `FlaLayerMemory.run_fla_layer`, once."""
    if not getattr(FlaLayerMemory.run_fla_layer, "_engram_eager", False):
        eager = torch.compiler.disable(FlaLayerMemory.run_fla_layer)
        eager._engram_eager = True
        FlaLayerMemory.run_fla_layer = eager


class GatedDeltaNetMemory(FlaLayerMemory):
    """Gated DeltaNet (fla.layers.GatedDeltaNet, chunk mode): a delta-rule state S (per head
    head_k x head_v) with a data-dependent decay, written at every position."""

    type_name = "fla:gated_deltanet"
    fla_layer_class = "GatedDeltaNet"

    @staticmethod
    def state_per_layer(cfg: GatedDeltaNetConfig, width: int) -> int:
        return gated_deltanet_state(cfg)

    def check_kernels(self, device: torch.device) -> None:
        refusal = gated_backward_refusal(*kernel_environment(device))
        if refusal:
            raise ConfigError("type", f"{self.type_name}: {refusal}")



class DeltaNetMemory(FlaLayerMemory):
    """DeltaNet (fla.layers.DeltaNet): a delta-rule state S (per head head_k x head_v) without a
    decay. fla's fused recurrent kernels by default (`mode`): fla 0.6's layer picks them for
    sequences of 64 or fewer whatever its mode, and its chunk kernels, which it picks beyond 64
    in chunk mode, assert on float32 inputs ("ChunkDeltaRuleFunction does not support float32"),
    so a float32 run (the engine's default precision) of 65 positions or more needs the fused
    recurrent ones; `mode = "chunk"` is for bf16 runs. The chunk backward has no gate, so fla's
    Hopper refusal of Gated DeltaNet does not concern it."""

    type_name = "fla:deltanet"
    fla_layer_class = "DeltaNet"

    @staticmethod
    def state_per_layer(cfg: DeltaNetConfig, width: int) -> int:
        return deltanet_state(cfg, width)



class GatedLinearAttentionMemory(FlaLayerMemory):
    """Gated linear attention (fla.layers.GatedLinearAttention, chunk mode): an outer-product
    state (per head head_k x head_v) with a data-dependent, per-key-channel forget gate."""

    type_name = "fla:gla"
    fla_layer_class = "GatedLinearAttention"

    @staticmethod
    def state_per_layer(cfg: GatedLinearAttentionConfig, width: int) -> int:
        return gla_state(cfg, width)

