"""`python -m engram_core.run RECIPE.toml [key=value ...]`: the same as `engram-run`, as a module
(for launchers that take a module, and for the results pipeline's subprocesses)."""

import sys

from .cli import run_main

if __name__ == "__main__":
    sys.exit(run_main())
