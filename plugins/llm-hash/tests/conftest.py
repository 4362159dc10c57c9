import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
# pytest runs with --import-mode=importlib: make the shared test helpers importable
sys.path.insert(0, str(Path(__file__).parent))
