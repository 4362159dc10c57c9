"""`weighted_sum`: an objective made of other registered objectives, L = Σ w_i L_i.

Each term draws its own batch through its own `sample` (a one-step term and a rollout
term want different views), and its terms are logged as ``train/<term>.<name>``.
"""

from __future__ import annotations

import math

import attrs
import torch

from ..components import BuildContext, Objective
from ..config import ConfigProblems, field, structure
from ..errors import ConfigError, RecipeError


@attrs.frozen
class WeightedSumConfig:
    terms: tuple[dict, ...] = field(help="objective tables, each with an optional `weight` (default 1.0) and `name`")

    def __attrs_post_init__(self):
        if not self.terms:
            raise ConfigError("terms", "needs at least one objective table")
        for i, table in enumerate(self.terms):
            if "type" not in table:
                raise ConfigError(f"terms.{i}.type", "missing required key (which objective, e.g. { type = \"gaussian_nll\" })")
            weight = table.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ConfigError(f"terms.{i}.weight", f"expected a finite number, got {weight!r}")
            if "name" in table and not isinstance(table["name"], str):
                raise ConfigError(f"terms.{i}.name", f"expected a string, got {table['name']!r}")



class WeightedSumObjective(Objective):
    """L = Σ_i weight_i · L_i over registered objectives (e.g. one-step NLL + λ · rollout NLL)."""

    def __init__(self, cfg: WeightedSumConfig, build: BuildContext):
        super().__init__()
        reg = build.registry
        if reg is None:
            raise ConfigError("type", "weighted_sum is built from a recipe's registry (BuildContext.registry); none was given")
        self.terms = torch.nn.ModuleList()
        self.weights: list[float] = []
        self.names: list[str] = []
        for i, table in enumerate(cfg.terms):
            path = f"terms.{i}"
            if not isinstance(table, dict) or "type" not in table:
                raise ConfigError(f"{path}.type", "missing required key (an objective name)")
            body = {k: v for k, v in table.items() if k not in ("type", "weight", "name")}
            weight = table.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ConfigError(f"{path}.weight", f"expected a number, got {weight!r}")
            try:
                comp = reg.resolve("objectives", table["type"], f"{path}.type")
            except RecipeError as exc:
                raise ConfigError(exc.problems[0][0], exc.problems[0][1]) from None
            try:
                cfg_i = structure(body, comp.config_cls, path)
            except ConfigProblems as exc:
                raise ConfigError(exc.problems[0][0], exc.problems[0][1]) from None
            self.terms.append(comp.factory(cfg_i, build))
            self.weights.append(float(weight))
            name = str(table.get("name", comp.name))
            self.names.append(name if name not in self.names else f"{name}{i}")

    @staticmethod
    def sub_components(cfg: WeightedSumConfig) -> list[tuple[str, str, dict]]:
        """Each term as its own objective table, so recipes resolve, validate and check its capabilities."""
        return [(f"terms.{i}", "objectives", {k: v for k, v in t.items() if k not in ("weight", "name")}) for i, t in enumerate(cfg.terms)]

    def sample(self, dataset, split, batch_size, generator):
        return {"terms": [t.sample(dataset, split, batch_size, generator) for t in self.terms]}

    def forward(self, model, batch):
        total = 0.0
        logged = {}
        for name, w, term, b in zip(self.names, self.weights, self.terms, batch["terms"]):
            loss, terms = term(model, b)
            total = total + w * loss
            logged[f"{name}.loss"] = loss.detach()
            for k, v in terms.items():
                if k != "loss":
                    logged[f"{name}.{k}"] = v
        return total, logged
