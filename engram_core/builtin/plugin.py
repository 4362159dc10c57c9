"""The core is its own first plugin: generic components enough for recipes/minimal.toml."""

from ..generation import GenerationConfig, GenerationMetric
from ..hookspecs import hookimpl
from .composite import WeightedSumConfig, WeightedSumObjective
from .dynamics import (
    GaussianNLLConfig,
    GaussianNLLObjective,
    LossMetric,
    LossMetricConfig,
    MLPGaussianConfig,
    MLPGaussianHead,
    SyntheticDynamics,
    SyntheticDynamicsConfig,
)


@hookimpl
def engram_datasets(register):
    register("synthetic_dynamics", SyntheticDynamics, SyntheticDynamicsConfig)


@hookimpl
def engram_heads(register):
    register("mlp_gaussian", MLPGaussianHead, MLPGaussianConfig, provides=("dynamics",), offers=("residual",))


@hookimpl
def engram_objectives(register):
    register("gaussian_nll", GaussianNLLObjective, GaussianNLLConfig, requires=("dynamics",))
    register("weighted_sum", WeightedSumObjective, WeightedSumConfig)


@hookimpl
def engram_metrics(register):
    register("loss", LossMetric, LossMetricConfig)
    register("generate", GenerationMetric, GenerationConfig, requires=("dynamics",))
