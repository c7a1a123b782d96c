"""The benchmarks package lives beside src/ at the repository root, not in the installed
distribution: make it importable whatever directory pytest was started from."""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
