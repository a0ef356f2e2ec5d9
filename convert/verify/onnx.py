"""ONNX verification: a layer graph against its source, a whole-model export against torch."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import UsageError
from ..layout import Layout
from .layers import _bits, compare_outputs, ieee_float32, tolerance_for
from .models import compare_output_lists, flatten_outputs
from .pairing import pairs_from_provenance
from .report import CheckResult, VerifyReport

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint


_ORT_RUNS = {"F32", "F16", "F64"}  # onnxruntime's CPU Gemm/MatMul kernels


def _ort_session(path: Any) -> tuple[Any, str]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    what = path if isinstance(path, bytes) else str(path)
    try:
        return ort.InferenceSession(what, opts, providers=["CPUExecutionProvider"]), ""
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        return None, str(e).strip().splitlines()[0][:200]


def verify_onnx_layers(src: Checkpoint, model_path: Any, *, seed: int = 0, batch_size: int = 8,
                       atol: float | None = None, rtol: float | None = None,
                       display: str = "") -> VerifyReport:
    """A linconvert layer graph against SRC: initializer bytes, and onnxruntime's outputs
    against torch's ParamLinear / nn.Linear on the source weights, layer by layer."""
    import numpy as np
    import onnx
    import torch
    from torch import nn

    from ..formats.onnx import initializer_bytes, read_layers
    from ..modules import ParamLinear
    from ..provenance import METADATA_KEY, parse_provenance

    model = onnx.load(str(model_path))
    props = {p.key: p.value for p in model.metadata_props}
    if METADATA_KEY not in props:
        raise UsageError(f"'{display or model_path}' carries no linconvert provenance; only "
                         "layer graphs written by linconvert can be verified against a source.")
    prov = parse_provenance(props[METADATA_KEY], model_path)
    layers = read_layers(model)
    if not layers:
        raise UsageError(f"'{display or model_path}' is a whole-model export; it was verified "
                         "against the torch model when it was written.")
    inits = {t.name: t for t in model.graph.initializer}
    report = VerifyReport(str(src.path), display or str(model_path), "cpu (onnxruntime)",
                          "plan", "the ONNX file's provenance", seed=seed,
                          batch_size=batch_size, atol=atol, rtol=rtol)
    dropped = set(prov.dropped)
    # where each initializer comes from: a source tensor, or one member of a source stack
    where = {p.target: p for p in pairs_from_provenance(prov)}
    sources = {p.source for p in where.values()}
    for k in src.specs:
        if k not in sources and k not in dropped:
            report.warnings.append(f"'{k}' is not in the layer graph (not a converted linear "
                                   "layer's weight or bias).")

    def source_tensor(dst_key: str) -> Any:
        pair = where[dst_key]
        t = src.tensor(pair.source)
        return t if pair.source_index is None else t[pair.source_index]

    def expected_bits(dst_key: str) -> Any:
        pair = where[dst_key]
        t = source_tensor(dst_key)
        transposed = pair.transposed
        return _bits(t.transpose(-2, -1) if transposed else t)

    session, why_not = _ort_session(model_path)
    feeds, refs = {}, {}
    for layer in layers:
        res = CheckResult(layer.weight, prov.keys.get(layer.weight, ("", False))[0],
                          "onnx-layer", True, layer.dtype,
                          tuple(inits[layer.weight].dims) if layer.weight in inits else ())
        ok = True
        for key in filter(None, (layer.weight, layer.bias)):
            if key not in inits or key not in where:
                ok, res.message = False, f"initializer '{key}' is missing"
                break
            data = initializer_bytes(inits[key])
            got = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
                torch.empty(0, dtype=torch.uint8)
            if not got.equal(expected_bits(key)):
                ok, res.message = False, f"initializer '{key}' differs from its source"
                break
        res.bit_exact = ok
        report.results.append(res)
        gen = torch.Generator().manual_seed(seed + zlib.crc32(layer.weight.encode()))
        x = torch.randn(batch_size, layer.in_features, generator=gen, dtype=torch.float64)
        x = x.to(getattr(torch, {"F32": "float32", "F16": "float16", "F64": "float64",
                                 "BF16": "bfloat16"}[layer.dtype]))
        if layer.dtype in _ORT_RUNS:  # every input is fed, even a failed layer's
            feeds[layer.input] = x.numpy()
        if not ok:
            res.passed = False
            continue
        w = source_tensor(layer.weight)
        b = source_tensor(layer.bias) if layer.bias else None
        held = prov.layout if prov.operation == "export" else prov.layout.other
        src_param = held is Layout.PARAM  # the source side's layer
        compute = torch.float64 if layer.dtype == "F64" else torch.float32
        module = (ParamLinear(layer.in_features, layer.out_features, bias=b is not None,
                              device="meta") if src_param else
                  nn.Linear(layer.in_features, layer.out_features, bias=b is not None,
                            device="meta"))
        sd = {"weight": w.to(compute)} | ({"bias": b.to(compute)} if b is not None else {})
        module.load_state_dict(sd, assign=True)
        with torch.no_grad():
            refs[layer.output] = (module(x.to(compute)), layer, res)
    runnable = [x for x in layers if x.dtype in _ORT_RUNS]
    if session is None and runnable and len(runnable) < len(layers):
        # A layer of a dtype onnxruntime has no CPU kernel for (bfloat16) stops the whole
        # model loading: run the other layers in a graph of their own.
        from ..formats.onnx import layer_graph

        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
        keys = {k for x in runnable for k in (x.weight, x.bias) if k}
        sub = layer_graph(runnable, [inits[k] for k in inits if k in keys], opset, {})
        session, why_not = _ort_session(sub.SerializeToString())
    if session is not None and feeds:
        outputs = dict(zip([o.name for o in session.get_outputs()],
                           session.run(None, {k: v for k, v in feeds.items()
                                              if k in {i.name for i in session.get_inputs()}})))
    else:
        outputs = {}
    for name, (expected, layer, res) in refs.items():
        if not res.passed:
            continue
        if name not in outputs and layer.dtype in _ORT_RUNS:
            # Only a dtype without a CPU kernel may fall back to the bytes: a model that does
            # not load or run is a failure, never "verified".
            res.passed = False
            res.message = f"onnxruntime could not run this layer ({why_not or 'no output'})"
            continue
        if name not in outputs:
            res.message = (f"onnxruntime cannot run {layer.dtype} on CPU "
                           f"({why_not or 'no kernel'}); initializer bytes checked instead")
            continue
        actual = torch.from_numpy(np.asarray(outputs[name]).astype(np.float64))
        r_tol, a_tol = tolerance_for(layer.dtype, atol, rtol)
        res.tolerance = (r_tol, a_tol, layer.in_features)
        res.passed, res.max_abs_err, res.rel_err, res.atol_needed, res.message = \
            compare_outputs(actual, expected, layer.in_features, r_tol, a_tol)
    return report


def verify_onnx_model(model_path: Any, torch_model: Any, inputs: Sequence[Any], *,
                      atol: float | None = None, rtol: float | None = None,
                      display: str = "") -> VerifyReport:
    """A whole-model export: onnxruntime's outputs against the torch model's, tensor by tensor."""
    import numpy as np
    import torch

    report = VerifyReport("torch model", display or str(model_path), "cpu (onnxruntime)",
                          "equivalence", "whole model")
    session, why_not = _ort_session(model_path)
    if session is None:
        report.results.append(CheckResult("session", "", "onnx-output", False,
                                          message=f"onnxruntime cannot load it: {why_not}"))
        return report
    with torch.no_grad(), ieee_float32():
        expected = flatten_outputs(torch_model(*inputs))
    feeds = {i.name: t.cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    actual = session.run(None, feeds)
    report.results += compare_output_lists([torch.from_numpy(np.asarray(a)) for a in actual],
                                           expected, "onnx-output", "onnxruntime", "torch",
                                           atol, rtol)
    return report
