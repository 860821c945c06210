"""Make ``wan_trt.export/calibration/runtime`` importable from a plain checkout (no pip install).

pyproject maps those packages onto the top-level folders ``export/``, ``calibration/`` and
``runtime/``; on a machine where the project is not installed (the lent GPU) this does the same
mapping at import time.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_SUBPACKAGES = ("export", "calibration", "runtime")


def ensure_wan_trt() -> None:
    try:
        importlib.import_module("wan_trt.runtime")
        return
    except ImportError:
        pass
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import wan_trt

    for name in _SUBPACKAGES:
        full = f"wan_trt.{name}"
        if full in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(full, ROOT / name / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / name)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        setattr(wan_trt, name, module)
