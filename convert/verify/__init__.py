"""Verification: check that a converted checkpoint (or ONNX file) computes what its source does.

`pairing` pairs SRC and DST keys, `layers` checks them layer by layer, `models` compares two
whole models, `onnx` checks ONNX files, `report` holds the results. Importing this package does
not import torch, numpy or onnx; the checks import them when they run.
"""

from __future__ import annotations

from .layers import compare_outputs, resolve_device, tolerance_for, verify_checkpoints
from .models import load_state_strictly, make_inputs, verify_models
from .onnx import verify_onnx_layers, verify_onnx_model
from .pairing import Pair, pair_keys, pairs_from_plan
from .report import CheckResult, VerifyReport

__all__ = [
    "CheckResult", "Pair", "VerifyReport", "compare_outputs", "load_state_strictly",
    "make_inputs", "pair_keys", "pairs_from_plan", "resolve_device", "tolerance_for",
    "verify_checkpoints", "verify_models", "verify_onnx_layers", "verify_onnx_model",
]
