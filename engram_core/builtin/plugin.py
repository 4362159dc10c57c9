"""The core is its own first plugin: generic components enough for recipes/minimal.toml,
and the shared sequence backbone and task on which every plugin's memories meet."""

from ..hookspecs import hookimpl
from .backbone import CausalBackbone, CausalBackboneConfig
from .lm import CompletionAccuracy, CompletionAccuracyConfig, TokenLMConfig, TokenLMObjective
from .mqar import MQARConfig, MQARDataset
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
    register("mqar", MQARDataset, MQARConfig, provides=("text_completion",))


@hookimpl
def engram_heads(register):
    register("mlp_gaussian", MLPGaussianHead, MLPGaussianConfig, provides=("dynamics",), offers=("residual",))
    register("causal_backbone", CausalBackbone, CausalBackboneConfig, provides=("causal_lm",), offers=("layer", "context", "trace"))


@hookimpl
def engram_objectives(register):
    register("gaussian_nll", GaussianNLLObjective, GaussianNLLConfig, requires=("dynamics",))
    register("weighted_sum", WeightedSumObjective, WeightedSumConfig)
    register("token_lm", TokenLMObjective, TokenLMConfig, requires=("causal_lm",))


@hookimpl
def engram_metrics(register):
    register("loss", LossMetric, LossMetricConfig)
    register("completion_accuracy", CompletionAccuracy, CompletionAccuracyConfig, requires=("causal_lm",))
