import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402  (after OMP_NUM_THREADS)

if not torch.cuda.is_available():
    # Triton kernels (where triton is installed) can only run interpreted on a CPU; triton
    # reads this when a kernel is defined, so it must be set before any test imports them.
    # `memory.kernels = "auto"` never picks Triton on a CPU, so nothing else changes.
    os.environ.setdefault("TRITON_INTERPRET", "1")
# pytest runs with --import-mode=importlib: make the shared test helpers importable
sys.path.insert(0, str(Path(__file__).parent))
