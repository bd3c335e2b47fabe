"""nq-snn-harness: NQ / QCFS training, ANN->SNN conversion, sweeps and reports.

The top-level names are imported lazily, so `import harness.report` (which only reads
MLflow) never imports torch, timm or the training code.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {"NQ": "neurons", "QCFS": "neurons", "IFNeuron": "neurons", "create_model": "models",
         "list_models": "models", "to_snn": "convert", "SpikingNet": "convert", "ConversionError": "convert",
         "HarnessError": "errors"}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'harness' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
