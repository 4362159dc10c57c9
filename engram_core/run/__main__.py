"""`python -m engram_core.run RECIPE.toml [key=value ...]`: the same as `engram-run`, as a module
(for launchers that take a module, and for the results pipeline's subprocesses).

`python -m engram_core.run --sweep-point SWEEP_DIR INDEX [--device DEV]` is internal: one point
of a sweep directory, as `engram-run --jobs N` starts it (engram_core.sweep.point_main)."""

import sys

from ..cli import run_main
from ..sweep import POINT_FLAG, point_main

if __name__ == "__main__":
    if sys.argv[1:2] == [POINT_FLAG]:
        sys.exit(point_main(sys.argv[2:]))
    sys.exit(run_main())
