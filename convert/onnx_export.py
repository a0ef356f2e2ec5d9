"""A conversion whose DST is `.onnx`: the layer graph, or the whole target model.

Plans are the same as for any output; the bytes come from the executor; the files are written
by `formats.onnx`; verification (on by default) runs the staged file in onnxruntime against
torch before it is published.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint
from .dtypes import nbytes_of
from .execute import ExecutionResult, converted_state_dict, hash_sources, written_bytes
from .execute import provenance_for as _provenance_for
from .formats import onnx as onnx_format
from .plan import Plan, onnx_layers
from .provenance import METADATA_KEY


def write_onnx(plan: Plan, ckpt: Checkpoint, *, model: str | None,
               input_shape: Sequence[Sequence[int]], input_dtype: str, opset: int | None,
               verify: bool) -> ExecutionResult:
    """Write the layer graph (or, with --model and --input-shape, the whole model) into the
    files PLAN's output plan names; the verification, if run, comes back in the result."""
    start = time.perf_counter()
    opset = opset or onnx_format.DEFAULT_OPSET
    hasher = hash_sources(ckpt)
    if plan.output is not None and plan.output.graph == "model" and model:
        result = _whole_model(plan, ckpt, model, input_shape, input_dtype, opset, verify,
                              hasher)
    else:
        result = _layer_graph(plan, ckpt, opset, verify, hasher)
    result.seconds = time.perf_counter() - start
    return result


def _layer_graph(plan: Plan, ckpt: Checkpoint, opset: int, verify: bool,
                 hasher: Any) -> ExecutionResult:
    output = plan.output
    assert output is not None
    layers = onnx_layers(plan)
    keys = {k for x in layers for k in (x.weight, x.bias) if k}
    initializers = [onnx_format.tensor_proto(e.key, e.dtype, e.shape, data)
                    for e, data in written_bytes(plan, ckpt, keys)]
    written = [e for e in plan.entries if e.key in keys]
    total = sum(nbytes_of(e.dtype, e.shape) for e in written)
    sha = hasher.result()
    prov = _provenance_for(plan, ckpt, sha)
    metadata = {METADATA_KEY: prov.to_json([e.key for e in written])}
    proto = onnx_format.layer_graph(layers, initializers, opset, metadata)
    result = ExecutionResult([], len(written), total, sha, 0.0, [])

    def check(staged: Path) -> None:
        from .verify import verify_onnx_layers

        result.verification = verify_onnx_layers(ckpt, staged, display=str(output.path))
        result.verification.raise_if_different()

    result.files = onnx_format.write_model(proto, output.path, external=output.external_data,
                                           overwrite=output.overwrite,
                                           before_commit=check if verify else None)
    return result


def _whole_model(plan: Plan, ckpt: Checkpoint, spec: str, input_shape: Sequence[Sequence[int]],
                 input_dtype: str, opset: int, verify: bool, hasher: Any) -> ExecutionResult:
    import torch

    from .factory import build_model
    from .verify import load_state_strictly, make_inputs, verify_onnx_model
    from .verify.models import run_model

    output = plan.output
    assert output is not None
    torch_model = build_model(spec, "--model")
    state = converted_state_dict(plan, ckpt)
    load_state_strictly(torch_model, state, "the converted checkpoint", spec, str(ckpt.path))
    torch_model.eval()
    inputs = make_inputs(torch_model, [tuple(s) for s in input_shape], input_dtype, None, 0,
                         torch.device("cpu"))
    with torch.no_grad():  # inputs the model cannot take: exit 2 here, not inside the exporter
        run_model(torch_model, inputs, spec)
    sha = hasher.result()
    prov = _provenance_for(plan, ckpt, sha)
    metadata = {METADATA_KEY: prov.to_json()}
    total = sum(nbytes_of(e.dtype, e.shape) for e in plan.entries)
    result = ExecutionResult([], len(plan.entries), total, sha, 0.0, [])

    def check(staged: Path) -> None:
        result.verification = verify_onnx_model(staged, torch_model, inputs,
                                                display=str(output.path))
        result.verification.raise_if_different()

    files, dynamic = onnx_format.export_model(torch_model, inputs, output.path, opset=opset,
                                              external=output.external_data, metadata=metadata,
                                              overwrite=output.overwrite,
                                              before_commit=check if verify else None)
    result.files = files
    if not dynamic:
        result.warnings.append(f"'{spec}' would not export with a dynamic batch axis; "
                               f"'{output.path}' takes exactly the --input-shape batch.")
    return result
