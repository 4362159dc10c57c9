"""Make `qwen_compressor_helpers` importable under --import-mode=importlib; keep torch on one thread."""

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
_here = str(Path(__file__).parent)
if _here not in sys.path:
    sys.path.insert(0, _here)
