"""The core is its own first plugin: generic components enough for recipes/minimal.toml,
and the shared sequence backbone and task on which every plugin's memories meet."""

from ..hookspecs import hookimpl
from .backbone import CausalBackbone, CausalBackboneConfig
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
from .lm import CompletionAccuracy, CompletionAccuracyConfig, TokenLMConfig, TokenLMObjective
from .mqar import MQARConfig, MQARDataset


@hookimpl
def engram_datasets(register):
    register("synthetic_dynamics", SyntheticDynamics, SyntheticDynamicsConfig)
    register("mqar", MQARDataset, MQARConfig, provides=("text_completion",))


@hookimpl
def engram_heads(register):
    register("mlp_gaussian", MLPGaussianHead, MLPGaussianConfig, provides=("dynamics",), points=("residual",))
    register("causal_backbone", CausalBackbone, CausalBackboneConfig, provides=("causal_lm",), points=("layer", "context", "trace"))


@hookimpl
def engram_objectives(register):
    register("gaussian_nll", GaussianNLLObjective, GaussianNLLConfig, requires=("dynamics",))
    register("weighted_sum", WeightedSumObjective, WeightedSumConfig)
    register("token_lm", TokenLMObjective, TokenLMConfig, requires=("causal_lm",))


@hookimpl
def engram_metrics(register):
    register("loss", LossMetric, LossMetricConfig)
    register("completion_accuracy", CompletionAccuracy, CompletionAccuracyConfig, requires=("causal_lm",))


@hookimpl
def engram_loggers(register):
    # imported only when a run asks for them: neither package is a dependency of the core
    def wandb(ctx):
        from ..run.loggers.wandb_logger import make

        return make(ctx)

    def wandb_precheck():  # no API key: one line before the run, not a traceback after it
        from ..run.loggers.wandb_logger import WandbLogger

        return WandbLogger.precheck()

    wandb.precheck = wandb_precheck

    def mlflow(ctx):
        from ..run.loggers.mlflow_logger import make

        return make(ctx)

    register("wandb", wandb, modules=("wandb",), install="engram-core[wandb]")
    register("mlflow", mlflow, modules=("mlflow",), install="engram-core[mlflow]")


@hookimpl
def engram_optimizers(register):
    import torch

    def sparse_adam(groups, st):
        for g in groups:  # SparseAdam has no weight decay
            g.pop("weight_decay", None)
        return torch.optim.SparseAdam(groups, lr=st.lr, betas=st.betas)

    def impl(st) -> dict:  # stages.N.optimizer_impl as torch's keywords; 'auto' leaves torch's own choice
        return {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}.get(st.optimizer_impl, {})

    impls = ("fused", "foreach", "for-loop")
    register("adamw", lambda groups, st: torch.optim.AdamW(groups, lr=st.lr, betas=st.betas, **impl(st)), help="torch.optim.AdamW",
             implementations=impls)
    register("adam", lambda groups, st: torch.optim.Adam(groups, lr=st.lr, betas=st.betas, **impl(st)), help="torch.optim.Adam",
             implementations=impls)
    register("sgd", lambda groups, st: torch.optim.SGD(groups, lr=st.lr, momentum=st.momentum, **impl(st)),
             help="torch.optim.SGD (stage momentum)", implementations=impls)
    register("sparse_adam", sparse_adam, help="torch.optim.SparseAdam, for sparse table gradients (no weight decay)")
