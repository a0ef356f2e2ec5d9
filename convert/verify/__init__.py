"""Verification: check that a converted checkpoint (or ONNX file) computes what its source does.

`pairing` pairs SRC and DST keys, `layers` checks them layer by layer, `models` compares two
whole models, `onnx` checks ONNX files, `report` holds the results. Importing this package
imports none of them (`import convert` imports it, see `convert/__init__.py`); each name below
loads its module on first use, and the checks import torch, numpy or onnx only when they run.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_HOME = {
    "compare_outputs": "layers", "resolve_device": "layers", "tolerance_for": "layers",
    "verify_checkpoints": "layers", "load_state_strictly": "models", "make_inputs": "models",
    "verify_models": "models", "verify_onnx_layers": "onnx", "verify_onnx_model": "onnx",
    "Pair": "pairing", "pair_keys": "pairing", "pairs_from_plan": "pairing",
    "CheckResult": "report", "VerifyReport": "report",
}

__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module 'convert.verify' has no attribute '{name}'")
    return getattr(import_module(f"{__name__}.{home}"), name)
