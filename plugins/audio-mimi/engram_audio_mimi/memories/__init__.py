"""Memories attached at the dynamics head's `residual` point, one per module.

Each memory is called as ``memory(z, mu, log_sigma) -> (mu, log_sigma)``: it receives the
head's parametric prediction and returns the combined one. Fitting is a `fit` stage
action (``[[stages]] kind = "fit"``, ``action = "fit"``), on pairs of the train split;
residuals are computed with the memory switched off.

    kmeans          hard nearest centroid of z_t → (E[Δz|c], Var[Δz|c]); memory-only predictor
    residual_topk   μ = μ_param + Σ w_i r_i, w ∝ softmax(−‖z − c_i‖²/τ) over the k nearest keys,
                    r_i = mean residual Δz − μ_param(z) of cluster i
    gated_residual  μ = μ_param + g(z) Σ w_i r_i with a learned gate g ∈ (0, 1)
    hybrid          μ = (1 − g(z)) μ_param + g(z) Σ w_i E[Δz|c_i]
    basis           μ = μ_param + s(z) Σ_k a_k(z) p̂_k: K learned unit direction prototypes,
                    soft attention a(z), learned step size s(z) (zero at build: changes nothing)

One module per memory, named after its registered type: `residual_topk`, `gated_residual`,
`hybrid`, `basis`, and `kmeans_memory` (not `kmeans`: the package exports the k-means
function under that name, which a submodule `kmeans` would shadow). Shared parts: `base`
(DynamicsMemory: the head and the fit data), `retrieval` (the top-k key/value store and
the learned gate, as mixins), `clustering` (k-means). Every memory is Memory →
DynamicsMemory → itself.
"""

from .base import DynamicsMemory
from .basis import BasisMemory, BasisMemoryConfig
from .clustering import kmeans, nearest
from .gated_residual import GatedResidualConfig, GatedResidualMemory
from .hybrid import HybridMemory
from .kmeans_memory import KMeansMemory, KMeansMemoryConfig
from .residual_topk import ResidualTopKConfig, ResidualTopKMemory

__all__ = [
    "BasisMemory",
    "BasisMemoryConfig",
    "DynamicsMemory",
    "GatedResidualConfig",
    "GatedResidualMemory",
    "HybridMemory",
    "KMeansMemory",
    "KMeansMemoryConfig",
    "ResidualTopKConfig",
    "ResidualTopKMemory",
    "kmeans",
    "nearest",
]
