"""Importing a script of ``benchmarks/`` in a test (the folder is not a package)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def import_bench(name: str) -> ModuleType:
    """The module ``benchmarks/<name>.py`` (its own imports, such as ``_common``, resolved there)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))
