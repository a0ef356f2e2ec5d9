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
from .errors import UsageError
from .execute import ExecutionResult, Output, converted_state_dict, hash_sources, written_bytes
from .execute import provenance_for as _provenance_for
from .formats import onnx as onnx_format
from .layout import Layout
from .plan import Plan
from .provenance import METADATA_KEY


def onnx_layers(plan: Plan, specs: dict[str, Any]) -> list[onnx_format.OnnxLayer]:
    """One layer per converted weight, with its bias where the source has one."""
    target_of = {a.source: a.target for a in plan.written}
    layers = []
    for a in plan.transposed:
        if a.dropped:
            continue
        prefix, _, leaf = a.target.rpartition(".")
        src_prefix, dot, src_leaf = a.source.rpartition(".")
        out_f, in_f = a.target_shape if plan.layout is Layout.LINEAR else a.target_shape[::-1]
        bias = None
        for b in {"weight": ("bias",), "W": ("b",), "kernel": ("bias",)}.get(src_leaf, ()):
            key = f"{src_prefix}{dot}{b}"
            spec = specs.get(key)
            if spec is not None and spec.shape == (out_f,) and key in target_of:
                bias = target_of[key]
        layers.append(onnx_format.OnnxLayer(prefix or a.target, a.target, bias,
                                            plan.layout.value, in_f, out_f, a.dtype))
    return layers


def write_onnx(plan: Plan, ckpt: Checkpoint, output: Output, report: Any, *, model: str | None,
               input_shape: Sequence[Sequence[int]], input_dtype: str, opset: int | None,
               external_data: bool, verify: bool) -> ExecutionResult:
    """Write the layer graph (or, with --model and --input-shape, the whole model)."""
    start = time.perf_counter()
    opset = opset or onnx_format.DEFAULT_OPSET
    hasher = hash_sources(ckpt)
    if model and input_shape:
        result = _whole_model(plan, ckpt, output, report, model, input_shape, input_dtype,
                              opset, external_data, verify, hasher)
    else:
        result = _layer_graph(plan, ckpt, output, report, opset, external_data, verify, hasher)
    result.seconds = time.perf_counter() - start
    return result


def _layer_graph(plan: Plan, ckpt: Checkpoint, output: Output, report: Any, opset: int,
                 external_data: bool, verify: bool, hasher: Any) -> ExecutionResult:
    layers = onnx_layers(plan, ckpt.specs)
    if not layers:
        raise UsageError(f"no converted linear layer in '{ckpt.path}' to put in an ONNX graph.")
    names = [x.name for x in layers]
    if len(set(names)) != len(names):
        raise UsageError("two converted weights share a layer name in the ONNX graph; rename "
                         "them apart with --rename.")
    keys = {k for x in layers for k in (x.weight, x.bias) if k}
    initializers = [onnx_format.tensor_proto(a.target, a.dtype, a.target_shape, data)
                    for a, data in written_bytes(plan, ckpt, keys)]
    left_out = [a.target for a in plan.written if a.target not in keys]
    if left_out:
        shown = ", ".join(f"'{k}'" for k in left_out[:6])
        more = f" and {len(left_out) - 6} more" if len(left_out) > 6 else ""
        report.warnings.append(
            f"the ONNX layer graph holds the converted linear layers only; {shown}{more} have "
            "no node to run and are not in it (write safetensors for the checkpoint, or pass "
            "--model and --input-shape to export the whole model).")
    written = [a for a in plan.written if a.target in keys]
    total = sum(nbytes_of(a.dtype, a.shape) for a in written)
    sha = hasher.result()
    prov = _provenance_for(plan, ckpt, sha)
    metadata = {METADATA_KEY: prov.to_json([a.target for a in written])}
    proto = onnx_format.layer_graph(layers, initializers, opset, metadata)
    external = external_data or total > onnx_format.EXTERNAL_THRESHOLD

    def check(staged: Path) -> None:
        from .equivalence import verify_onnx_layers

        report.verification = verify_onnx_layers(ckpt, staged, display=str(output.path))
        report.verification.raise_if_different()

    files = onnx_format.write_model(proto, output.path, external=external,
                                    overwrite=output.overwrite,
                                    before_commit=check if verify else None)
    return ExecutionResult(files, len(written), total, sha, 0.0, [])


def _whole_model(plan: Plan, ckpt: Checkpoint, output: Output, report: Any, spec: str,
                 input_shape: Sequence[Sequence[int]], input_dtype: str, opset: int,
                 external_data: bool, verify: bool, hasher: Any) -> ExecutionResult:
    import torch

    from .equivalence import load_state_strictly, make_inputs, verify_onnx_model
    from .factory import build_model

    torch_model = build_model(spec, "--model")
    state = converted_state_dict(plan, ckpt)
    load_state_strictly(torch_model, state, "the converted checkpoint", spec, str(ckpt.path))
    torch_model.eval()
    inputs = make_inputs(torch_model, [tuple(s) for s in input_shape], input_dtype, None, 0,
                         torch.device("cpu"))
    sha = hasher.result()
    prov = _provenance_for(plan, ckpt, sha)
    metadata = {METADATA_KEY: prov.to_json()}

    def check(staged: Path) -> None:
        report.verification = verify_onnx_model(staged, torch_model, inputs,
                                                display=str(output.path))
        report.verification.raise_if_different()

    files, dynamic = onnx_format.export_model(torch_model, inputs, output.path, opset=opset,
                                              external=external_data, metadata=metadata,
                                              overwrite=output.overwrite,
                                              before_commit=check if verify else None)
    if not dynamic:
        report.warnings.append(f"'{spec}' would not export with a dynamic batch axis; "
                               f"'{output.path}' takes exactly the --input-shape batch.")
    total = sum(nbytes_of(a.dtype, a.shape) for a in plan.written)
    return ExecutionResult(files, len(plan.written), total, sha, 0.0, [])
