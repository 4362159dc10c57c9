"""A small synthetic dynamics data set, an MLP Gaussian head, its NLL, and a `loss` metric."""

from __future__ import annotations

import math

import attrs
import torch
from torch import nn

from ..components import BuildContext, Dataset, DataSpec, EvalContext, Head, Metric, Objective
from ..config import existing_file, field, in_range, positive
from ..errors import ConfigError
from ..nn import gaussian_nll


@attrs.frozen
class SyntheticDynamicsConfig:
    """Noisy damped rotations with a cubic pull, embedded in `dim` dimensions."""

    dim: int = field(8, help="dimension of z", validator=positive)
    n_sequences: int = field(64, help="sequences in all (1/4 go to the eval split)", validator=in_range(4, None))
    length: int = field(64, help="frames per sequence", validator=in_range(2, None))
    noise: float = field(0.02, help="std of the per-step process noise", validator=in_range(0.0, None))
    seed: int = field(0, help="seed of the generator (independent of run.seed)")
    path: str = field("", help="an .npy file of trajectories (N, T, D) to use instead of generating", validator=existing_file)


class SyntheticDynamics(Dataset):
    """One-step pairs (z_t, Δz_t) from a deterministic, seeded synthetic process."""

    def __init__(self, cfg: SyntheticDynamicsConfig, build: BuildContext | None = None):
        self.cfg = cfg
        traj = _load_trajectories(cfg.path) if cfg.path else _generate(cfg)  # (N, T, D)
        d = traj.shape[-1]
        n_eval = max(1, traj.shape[0] // 4)
        self._split = {"train": traj[n_eval:], "eval": traj[:n_eval]}
        self.spec = DataSpec("synthetic_dynamics", dim=d)

    @staticmethod
    def dry_spec(cfg: SyntheticDynamicsConfig, build: BuildContext | None = None) -> DataSpec:
        """The spec without generating: `dim`, or the .npy file's header (its data is not read)."""
        if cfg.path:
            import numpy as np

            try:
                arr = np.load(cfg.path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise ConfigError("path", f"cannot read {cfg.path} as an .npy array ({type(exc).__name__}: {exc}); "
                                          "save one with numpy.save(path, array)") from None
            _check_array(cfg.path, arr)  # validate reads the values too (memory-mapped): NaN is found now, not at step 900
            return DataSpec("synthetic_dynamics", dim=int(arr.shape[-1]))
        return DataSpec("synthetic_dynamics", dim=cfg.dim)

    def _pairs(self, split: str):
        t = self._split[split]
        return t[:, :-1].reshape(-1, t.shape[-1]), (t[:, 1:] - t[:, :-1]).reshape(-1, t.shape[-1])

    def sample(self, split, batch_size, generator):
        z, dz = self._pairs(split)
        idx = torch.randint(0, z.shape[0], (batch_size,), generator=generator)
        return {"z": z[idx], "dz": dz[idx]}

    def utterances(self, split: str) -> list[torch.Tensor]:
        """The whole sequences of a split, (T, D) each (what the `generate` metric rolls out)."""
        return list(self._split[split])

    def eval_batches(self, split, batch_size):
        z, dz = self._pairs(split)
        for i in range(0, z.shape[0], batch_size):
            yield {"z": z[i : i + batch_size], "dz": dz[i : i + batch_size]}


def _generate(cfg: SyntheticDynamicsConfig) -> torch.Tensor:
    """Rotations in 2-D planes at random frequencies, a cubic pull to the origin, noise."""
    g = torch.Generator().manual_seed(cfg.seed)
    d = cfg.dim
    omega = 0.1 + 0.3 * torch.rand(max(d // 2, 1), generator=g)
    seq = [torch.randn(cfg.n_sequences, d, generator=g)]
    for _ in range(cfg.length - 1):
        z = seq[-1]
        nxt = z.clone()
        for i in range(d // 2):
            a, b = z[:, 2 * i], z[:, 2 * i + 1]
            c, s = math.cos(omega[i]), math.sin(omega[i])
            nxt[:, 2 * i], nxt[:, 2 * i + 1] = c * a - s * b, s * a + c * b
        seq.append(nxt - 0.05 * nxt.pow(3) + cfg.noise * torch.randn(z.shape, generator=g))
    return torch.stack(seq, 1)


def _check_shape(path: str, shape: tuple) -> None:
    if len(shape) != 3 or shape[0] < 2 or shape[1] < 2 or shape[2] < 1:
        raise ConfigError("path", f"{path}: expected an array of shape (sequences >= 2, frames >= 2, dim >= 1), got {shape}")


def _check_array(path: str, arr) -> None:
    """Shape, a real number type, and every value finite (else the file and the first bad index)."""
    import numpy as np

    _check_shape(path, arr.shape)
    if arr.dtype.kind not in "fiu":
        raise ConfigError("path", f"{path}: expected real numbers, got dtype {arr.dtype}; save a float array")
    if arr.dtype.kind != "f":
        return
    rows = max(1, (1 << 22) // max(1, arr.shape[1] * arr.shape[2]))  # ~4M values a chunk: memory stays flat
    for start in range(0, arr.shape[0], rows):
        chunk = np.asarray(arr[start : start + rows])
        with np.errstate(over="ignore"):  # what training sees: float64 past float32's range is inf too
            bad = ~np.isfinite(chunk.astype(np.float32))
        if bad.any():
            i, t, d = (int(x) for x in np.argwhere(bad)[0])
            raise ConfigError("path", f"{path}: non-finite value {chunk[i, t, d]} (as float32) at index [{start + i}, {t}, {d}] "
                                      f"(sequence, frame, dim), the first of {int(bad.sum())} in sequences {start}..{start + len(chunk) - 1}; "
                                      "clean the data (e.g. numpy.nan_to_num, or drop those sequences) and save it again")


def _load_trajectories(path: str) -> torch.Tensor:
    import numpy as np

    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError("path", f"cannot read {path} as an .npy array: {exc}") from None
    _check_array(path, arr)
    return torch.from_numpy(arr.astype("float32"))


@attrs.frozen
class MLPGaussianConfig:
    hidden: int = field(128, help="width of each hidden layer", validator=positive)
    layers: int = field(2, help="number of hidden layers", validator=positive)
    min_log_sigma: float = field(-7.0, help="floor on predicted log sigma (keeps the NLL finite)")


class MLPGaussianHead(Head):
    """Predicts μ(z) and a diagonal log σ(z) for Δz. A `residual` memory adds to μ."""

    def __init__(self, cfg: MLPGaussianConfig, build: BuildContext):
        super().__init__()
        d = build.spec.dim
        layers: list[nn.Module] = []
        width = d
        for _ in range(cfg.layers):
            layers += [nn.Linear(width, cfg.hidden), nn.GELU()]
            width = cfg.hidden
        self.trunk = nn.Sequential(*layers)
        self.mu = nn.Linear(width, d)
        self.log_sigma = nn.Linear(width, d)
        self.min_log_sigma = cfg.min_log_sigma

    def predict(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(z)
        mu, log_sigma = self.mu(h), self.log_sigma(h).clamp_min(self.min_log_sigma)
        if self.memory_active:  # the `residual` point (engram_core.points.ResidualPoint)
            mu, log_sigma = self.memory.apply_residual(z, mu, log_sigma)
        return mu, log_sigma

    def forward(self, z):
        return self.predict(z)


@attrs.frozen
class GaussianNLLConfig:
    pass


class GaussianNLLObjective(Objective):
    """Mean diagonal Gaussian NLL (nats per item) of Δz under the head's prediction."""

    def __init__(self, cfg: GaussianNLLConfig, build: BuildContext):
        super().__init__()

    def forward(self, model, batch):
        mu, log_sigma = model.head(batch["z"])  # through __call__, so run.compile compiles it
        nll = gaussian_nll(mu, log_sigma, batch["dz"])
        return nll, {"nll": nll.detach()}


@attrs.frozen
class LossMetricConfig:
    num_examples: int = field(1024, help="size of the fixed eval set drawn once from the eval split (fixed seed)", validator=positive)
    seed: int = field(1234, help="seed of the eval draw, so every evaluation sees the same examples")


class LossMetric(Metric):
    """The current training objective on a fixed eval set (`eval/loss`), weighted per example.

    The eval set is `num_examples` items drawn once with `seed` (through the objective's own
    sampler, so rollout objectives get segments), then cut into the stage's batches: the value
    does not depend on the evaluating stage's batch size, only on the weights.
    """

    directions = {"loss": "lower"}

    def __init__(self, cfg: LossMetricConfig, build: BuildContext):
        self.cfg = cfg
        self.add_state("total", 0.0, dist_reduce_fx="sum")  # the loss weighted by items
        self.add_state("count", 0, dist_reduce_fx="sum")

    def batches(self, dataset, split, batch_size):
        g = torch.Generator().manual_seed(self.cfg.seed)
        objective = self.ctx.objective if self.ctx is not None else None
        if objective is not None:
            fixed = objective.sample(dataset, split, self.cfg.num_examples, g)
        else:
            fixed = dataset.sample(split, self.cfg.num_examples, g)
        n = _batch_len(fixed)
        for i in range(0, n, batch_size):
            yield _slice(fixed, i, i + batch_size)

    def update(self, model, batch):
        if self.ctx is None or self.ctx.objective is None:
            raise RuntimeError("the loss metric needs a train stage's objective to evaluate")
        loss, _ = self.ctx.objective(model, batch)
        n = _batch_len(batch)
        self.total += float(loss) * n  # objectives are means over items: weight by items
        self.count += n

    def compute(self):
        return {"loss": self.total / max(self.count, 1)}


def _leading_sizes(batch) -> set[int]:
    """Leading sizes of every tensor in a batch, through nested dicts and lists (a composite
    objective's batch is {"terms": [batch, ...]})."""
    if isinstance(batch, torch.Tensor):
        return {int(batch.shape[0])} if batch.dim() > 0 else set()
    if isinstance(batch, dict):
        return set().union(*(_leading_sizes(v) for v in batch.values())) if batch else set()
    if isinstance(batch, (list, tuple)):
        return set().union(*(_leading_sizes(v) for v in batch)) if batch else set()
    return set()


def _batch_len(batch) -> int:
    lens = _leading_sizes(batch)
    if len(lens) != 1:
        raise ConfigError("metrics.loss", f"the loss metric slices batches along dim 0; got leading sizes {sorted(lens)}")
    return lens.pop()


def _slice(batch, i: int, j: int):
    if isinstance(batch, torch.Tensor):
        return batch[i:j] if batch.dim() > 0 else batch
    if isinstance(batch, dict):
        return {k: _slice(v, i, j) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice(v, i, j) for v in batch)
    return batch


_ = EvalContext  # documented in components
