"""Fixed-point solvers and a deep-equilibrium layer with implicit or phantom gradients.

Written here rather than taken from torchdeq: torchdeq 0.1.0 installs and runs on
torch 2.13 (checked), but the two solvers we need are ~80 lines, we want the per-call
statistics (iterations, relative residual, forward and backward) in a plain dataclass the
telemetry can read, and one dependency fewer keeps the plugin installable anywhere
engram-core is (docs/plugins/deq-hrr.md says more).

The solvers work on a state of any shape ``(B, ...)``; they flatten it to ``(B, N)``.
Residuals are relative: ||f(z) - z|| / (||f(z)|| + 1e-8), the maximum over the batch.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import torch


@attrs.define
class SolverStats:
    iterations: int = 0
    residual: float = 0.0
    converged: bool = False


def _rel_residual(fz: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-item relative residual of a (B, N) state."""
    return (fz - z).norm(dim=1) / (fz.norm(dim=1) + 1e-8)


def fixed_point_iteration(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, max_iter: int, tol: float,
                          damping: float = 1.0) -> tuple[torch.Tensor, SolverStats]:
    """z ← (1-damping)·z + damping·f(z) until the relative residual drops below `tol`."""
    z = z0
    stats = SolverStats()
    for it in range(1, max_iter + 1):
        fz = f(z)
        res = float(_rel_residual(fz.flatten(1), z.flatten(1)).max())
        z = fz if damping == 1.0 else (1 - damping) * z + damping * fz
        stats.iterations, stats.residual = it, res
        if res < tol:
            stats.converged = True
            break
    return z, stats


def anderson(f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, max_iter: int, tol: float,
             m: int = 5, beta: float = 1.0, lam: float = 1e-4) -> tuple[torch.Tensor, SolverStats]:
    """Anderson acceleration (type II) with memory `m`, mixing `beta`, ridge `lam`.

    Follows the formulation of the NeurIPS 2020 DEQ tutorial (Kolter, Duvenaud, Johnson):
    keep the last m iterates X and their images F, solve the small constrained least
    squares min ||Σ α_i (F_i - X_i)|| s.t. Σ α_i = 1, and step to β·Σα F + (1-β)·Σα X.
    """
    shape = z0.shape
    bsz = shape[0]
    x0 = z0.reshape(bsz, -1)
    n = x0.shape[1]
    m = max(1, min(m, max_iter))
    X = x0.new_zeros(bsz, m, n)
    F = x0.new_zeros(bsz, m, n)
    X[:, 0] = x0
    F[:, 0] = f(x0.view(shape)).reshape(bsz, -1)
    stats = SolverStats(iterations=1, residual=float(_rel_residual(F[:, 0], X[:, 0]).max()))
    if stats.residual < tol or max_iter <= 1:
        stats.converged = stats.residual < tol
        return F[:, 0].view(shape), stats
    X[:, 1] = F[:, 0]
    F[:, 1] = f(F[:, 0].view(shape)).reshape(bsz, -1)
    H = x0.new_zeros(bsz, m + 1, m + 1)
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    y = x0.new_zeros(bsz, m + 1, 1)
    y[:, 0] = 1
    best = F[:, 1]
    best_res = float("inf")
    k = 1
    for k in range(2, max_iter + 1):
        n_ = min(k, m)
        G = F[:, :n_] - X[:, :n_]
        GG = torch.bmm(G, G.transpose(1, 2))
        # ridge relative to the residuals' scale: a fixed lam swamps GGᵀ once residuals are
        # small, and the step degenerates into averaging the stored iterates
        ridge = lam * GG.diagonal(dim1=1, dim2=2).amax(-1).clamp_min(1e-30)
        H[:, 1 : n_ + 1, 1 : n_ + 1] = GG + ridge[:, None, None] * torch.eye(n_, dtype=x0.dtype, device=x0.device)[None]
        alpha = torch.linalg.solve(H[:, : n_ + 1, : n_ + 1], y[:, : n_ + 1])[:, 1 : n_ + 1, 0]
        new_x = beta * (alpha[:, None] @ F[:, :n_])[:, 0] + (1 - beta) * (alpha[:, None] @ X[:, :n_])[:, 0]
        X[:, k % m] = new_x
        F[:, k % m] = f(new_x.view(shape)).reshape(bsz, -1)
        res = float(_rel_residual(F[:, k % m], X[:, k % m]).max())
        if res < best_res:
            best_res, best = res, F[:, k % m].clone()
        if res < tol:
            break
    stats.iterations, stats.residual, stats.converged = k, best_res, best_res < tol
    return best.view(shape), stats


SOLVERS = ("anderson", "fixed_point")
GRADIENTS = ("implicit", "phantom")


def solve(f, z0, solver: str, max_iter: int, tol: float, anderson_m: int = 5, damping: float = 1.0):
    if solver == "anderson":
        return anderson(f, z0, max_iter, tol, m=anderson_m)
    if solver == "fixed_point":
        return fixed_point_iteration(f, z0, max_iter, tol, damping=damping)
    raise ValueError(f"unknown solver {solver!r} (choose from {SOLVERS})")


class DEQFixedPoint:
    """Finds z* = f(z*) and attaches gradients to it.

    ``implicit``: the forward solve runs without a graph; one differentiable call
    z = f(z*) is made and a backward hook solves g = Jᵀg + ∂L/∂z (the implicit function
    theorem) with the same solver, so memory does not grow with iterations.
    ``phantom``: `phantom_steps` damped differentiable steps from the detached z*
    (Geng et al. 2021; one step with damping 1 is the "one-step" / Jacobian-free gradient).
    """

    def __init__(self, solver: str = "anderson", max_iter: int = 30, tol: float = 1e-3, grad: str = "implicit",
                 backward_max_iter: int = 30, backward_tol: float = 1e-4, phantom_steps: int = 1,
                 phantom_damping: float = 1.0, anderson_m: int = 5, damping: float = 1.0):
        self.solver, self.max_iter, self.tol, self.grad = solver, max_iter, tol, grad
        self.backward_max_iter, self.backward_tol = backward_max_iter, backward_tol
        self.phantom_steps, self.phantom_damping = phantom_steps, phantom_damping
        self.anderson_m, self.damping = anderson_m, damping
        self.forward_stats = SolverStats()
        self.backward_stats = SolverStats()

    def __call__(self, f: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            z_star, self.forward_stats = solve(f, z0, self.solver, self.max_iter, self.tol, self.anderson_m, self.damping)
        if not torch.is_grad_enabled():
            return z_star
        if self.grad == "phantom":
            z = z_star.detach()
            for _ in range(self.phantom_steps):
                z = (1 - self.phantom_damping) * z + self.phantom_damping * f(z)
            return z
        # implicit: z = f(z*) carries the parameter gradients; the hook corrects ∂L/∂z.
        z = f(z_star.detach())
        z0_ = z.detach().requires_grad_()
        with torch.enable_grad():
            f0 = f(z0_)
        if not z.requires_grad:
            return z
        holder: dict = {}

        def backward_hook(grad: torch.Tensor) -> torch.Tensor:
            if "handle" in holder:
                holder.pop("handle").remove()  # the hook must not fire for its own solve

            def g_map(y: torch.Tensor) -> torch.Tensor:
                return torch.autograd.grad(f0, z0_, y, retain_graph=True)[0] + grad

            g, self.backward_stats = fixed_point_iteration(g_map, grad, self.backward_max_iter, self.backward_tol)
            return g

        holder["handle"] = z.register_hook(backward_hook)
        return z
