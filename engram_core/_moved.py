"""The modules the round-3 layout moved, importable under their earlier paths for one release.

`import engram_core.engine` still works and is `engram_core.train.engine` itself (one module
object, so patching either name patches both), with a DeprecationWarning naming the new path.
Remove after the next release (docs/architecture.md, "Moved modules").
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "engram_core.engine": "engram_core.train.engine",
    "engram_core.meter": "engram_core.train.meter",
    "engram_core.graphs": "engram_core.train.graphs",
    "engram_core.resume": "engram_core.train.checkpoint",
    "engram_core.validate": "engram_core.train.validate",
    "engram_core.dry_forward": "engram_core.train.dry_forward",
    "engram_core.inherit": "engram_core.recipe.extends",
    "engram_core.explain": "engram_core.recipe.explain",
    "engram_core.rundir": "engram_core.run.rundir",
    "engram_core.tb": "engram_core.run.tb",
    "engram_core.loggers": "engram_core.run.loggers",
    "engram_core.loggers.wandb_logger": "engram_core.run.loggers.wandb_logger",
    "engram_core.loggers.mlflow_logger": "engram_core.run.loggers.mlflow_logger",
    "engram_core.distributed": "engram_core.run.distributed",
    "engram_core.accel": "engram_core.run.accel",
    "engram_core.progress": "engram_core.run.progress",
    "engram_core.threads": "engram_core.run.threads",
    "engram_core.commands": "engram_core.run.commands",
    "engram_core.metric_info": "engram_core.run.metric_info",
    "engram_core.nn.row_tables": "engram_core.tables.row_tables",
    "engram_core.nn.host_rows": "engram_core.tables.host_rows",
    "engram_core.nn.sharded_rows": "engram_core.tables.sharded_rows",
    "engram_core.optim.rowwise": "engram_core.tables.rowwise",
    "engram_core.sharded_state": "engram_core.tables.state",
    "engram_core.report": "engram_core.tools.report",
    "engram_core.results": "engram_core.tools.results",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, self, is_package=name == "engram_core.loggers")

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {new}; import it from there (the old path goes after the next release)",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        """Nothing to run: the module is the new one, already executed."""


def install() -> None:
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())  # before the path finder: a moved package's old submodule names are ours
