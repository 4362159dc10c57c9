"""Registration of the audio-mimi components (entry point `audio-mimi` in group `engram`)."""

from engram_core.hookspecs import hookimpl

from .data import ZdynConfig, ZdynDataset
from .generation import GenerationConfig, GenerationMetric
from .heads import GaussianMLPConfig, GaussianMLPHead, VMFMagnitudeConfig, VMFMagnitudeHead
from .linear import LinearConfig, LinearHead
from .linear_mlp import LinearMLPConfig, LinearMLPHead
from .memories import (
    BasisMemory,
    BasisMemoryConfig,
    GatedResidualConfig,
    GatedResidualMemory,
    HybridMemory,
    KMeansMemory,
    KMeansMemoryConfig,
    ResidualTopKConfig,
    ResidualTopKMemory,
)
from .metrics import (
    ArchetypesConfig,
    ArchetypesMetric,
    DirectionCosConfig,
    DirectionCosMetric,
    DnllConfig,
    DnllMetric,
    GateMeanConfig,
    GateMeanMetric,
    KappaStatsConfig,
    KappaStatsMetric,
    RolloutMetric,
    RolloutMetricConfig,
)
from .objectives import MixedConfig, MixedObjective, OneStepNLL, OneStepNLLConfig, RolloutNLL, RolloutNLLConfig


@hookimpl
def engram_datasets(register):
    register("zdyn", ZdynDataset, ZdynConfig, provides=("segments",))


@hookimpl
def engram_heads(register):
    register("gaussian_mlp", GaussianMLPHead, GaussianMLPConfig, provides=("dynamics",), points=("residual",))
    register("vmf_magnitude", VMFMagnitudeHead, VMFMagnitudeConfig, provides=("dynamics", "vmf"), points=("direction",))
    # the least-squares baseline (fit it with a `fit` stage: target = "head", action = "fit");
    # output = "gaussian" takes a memory at `residual`, output = "vmf" at `direction`
    register("linear", LinearHead, LinearConfig, provides=("dynamics",), points=("residual", "direction"))
    # the linear head plus an MLP correction starting at zero: fit, then train the correction
    register("linear_mlp", LinearMLPHead, LinearMLPConfig, provides=("dynamics",), points=("residual", "direction"))


@hookimpl
def engram_memories(register):
    register("kmeans", KMeansMemory, KMeansMemoryConfig, points=("residual",))
    register("residual_topk", ResidualTopKMemory, ResidualTopKConfig, points=("residual",))
    register("gated_residual", GatedResidualMemory, GatedResidualConfig, points=("residual",))
    register("hybrid", HybridMemory, GatedResidualConfig, points=("residual",))
    register("basis", BasisMemory, BasisMemoryConfig, points=("residual", "direction"))


@hookimpl
def engram_objectives(register):
    register("one_step_nll", OneStepNLL, OneStepNLLConfig, requires=("dynamics",))
    register("rollout_nll", RolloutNLL, RolloutNLLConfig, requires=("dynamics", "segments"))
    register("mixed", MixedObjective, MixedConfig, requires=("dynamics", "segments"))


@hookimpl
def engram_metrics(register):
    register("dnll", DnllMetric, DnllConfig, requires=("dynamics",))
    register("direction_cos", DirectionCosMetric, DirectionCosConfig, requires=("dynamics",))
    register("rollout", RolloutMetric, RolloutMetricConfig, requires=("dynamics", "segments"))
    register("gate_mean", GateMeanMetric, GateMeanConfig)
    register("kappa_stats", KappaStatsMetric, KappaStatsConfig)  # checks for a vMF head itself
    register("archetypes", ArchetypesMetric, ArchetypesConfig, requires=("dynamics",))
    # whole-sequence generation of any dynamics head (sequences from the data set's `utterances`)
    register("generate", GenerationMetric, GenerationConfig, requires=("dynamics",))
