"""ONNX output: a graph of the converted linear layers, or the whole target model.

Layer graph: one node per linear layer, showing the layout it holds (`Gemm(transB=1)` for
`linear`, `MatMul` + `Add` for `param`), the weights as initializers named after their keys, one
input and one output per layer with a dynamic batch axis, built with `onnx.helper`. Provenance
and the layer table go in `metadata_props`.

Files are written in a temporary folder beside DST, fsynced, checked by path with
`onnx.checker` (so models past protobuf's 2 GB work) and verified there; then the external data
file (one file, `DST.data`, a relative name, always written fresh, never appended to) and the
model are renamed into place, data first.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import OutputError, UsageError
from ..layout import Layout
from .atomic import fsync_dir, new_file_mode, output_error

DEFAULT_OPSET = 18  # runs on onnxruntime >= 1.14; Gemm/MatMul are unchanged since 13
EXTERNAL_THRESHOLD = 1_800_000_000  # below protobuf's 2 GB, with room for the graph
LAYERS_KEY = "linconvert.layers"

_ELEM = {"F32": "FLOAT", "F16": "FLOAT16", "BF16": "BFLOAT16", "F64": "DOUBLE"}


@dataclass(frozen=True)
class OnnxLayer:
    """One linear layer of a layer graph."""

    name: str  # the key prefix, e.g. "h.0.mlp.c_fc"
    weight: str  # the weight's key (its initializer)
    bias: str | None
    layout: str  # "linear" (Gemm transB=1) or "param" (MatMul + Add)
    in_features: int
    out_features: int
    dtype: str  # safetensors dtype name

    @property
    def input(self) -> str:
        return f"{self.name}.input"

    @property
    def output(self) -> str:
        return f"{self.name}.output"


def elem_type(dtype: str, key: str) -> int:
    """ONNX's element type for a dtype, or a usage error for one ONNX Gemm/MatMul cannot take."""
    from onnx import TensorProto

    if dtype not in _ELEM:
        raise UsageError(f"'{key}' is {dtype}, which ONNX's Gemm and MatMul do not take; write "
                         "safetensors or .pt instead.")
    return getattr(TensorProto, _ELEM[dtype])


def _runs_opset(opset: int) -> bool:
    """Whether the installed onnxruntime loads a one-node model of OPSET."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    try:
        ort.InferenceSession(model.SerializeToString(), opts,
                             providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        return False
    return True


def check_opset(opset: int) -> None:
    """Refuse an opset that the installed onnxruntime cannot run: the file could not be
    verified, and nobody here could run it."""
    if _runs_opset(opset):
        return
    import onnx
    import onnxruntime as ort

    top = next((v for v in range(min(opset, onnx.defs.onnx_opset_version()), 6, -1)
                if _runs_opset(v)), DEFAULT_OPSET)
    raise UsageError(f"--opset {opset} is past what the installed onnxruntime {ort.__version__} "
                     f"runs (up to {top}); pass --opset {top} or lower, or leave the default "
                     f"{DEFAULT_OPSET}.")


def tensor_proto(name: str, dtype: str, shape: Sequence[int], raw: bytes) -> Any:
    """An initializer from raw little-endian bytes (no numpy round trip, so bfloat16 works)."""
    from onnx import helper

    return helper.make_tensor(name, elem_type(dtype, name), list(shape), vals=raw, raw=True)


def layer_graph(layers: Sequence[OnnxLayer], initializers: Sequence[Any], opset: int,
                metadata: dict[str, str]) -> Any:
    """The ModelProto of a layer graph."""
    import onnx
    from onnx import helper

    nodes, inputs, outputs = [], [], []
    for layer in layers:
        t = elem_type(layer.dtype, layer.weight)
        inputs.append(helper.make_tensor_value_info(layer.input, t, ["batch", layer.in_features]))
        outputs.append(helper.make_tensor_value_info(layer.output, t,
                                                     ["batch", layer.out_features]))
        if layer.layout == Layout.LINEAR.value:
            args = [layer.input, layer.weight] + ([layer.bias] if layer.bias else [])
            nodes.append(helper.make_node("Gemm", args, [layer.output], name=layer.name,
                                          transB=1))
        elif layer.bias:
            mid = f"{layer.name}.matmul"
            nodes.append(helper.make_node("MatMul", [layer.input, layer.weight], [mid],
                                          name=f"{layer.name}.MatMul"))
            nodes.append(helper.make_node("Add", [mid, layer.bias], [layer.output],
                                          name=f"{layer.name}.Add"))
        else:
            nodes.append(helper.make_node("MatMul", [layer.input, layer.weight], [layer.output],
                                          name=layer.name))
    graph = helper.make_graph(nodes, "linconvert_layers", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="linconvert")
    model.ir_version = min(model.ir_version, onnx.IR_VERSION)
    meta = {**metadata, LAYERS_KEY: json.dumps([asdict(layer) for layer in layers])}
    helper.set_model_props(model, meta)
    return model


def read_layers(model: Any) -> list[OnnxLayer]:
    """The layer table a linconvert layer graph carries."""
    props = {p.key: p.value for p in model.metadata_props}
    return [OnnxLayer(**d) for d in json.loads(props.get(LAYERS_KEY, "[]"))]


def staging_dir(dst: Path) -> Path:
    """The temporary folder beside DST (its name derived from DST, so a killed run's is found)."""
    return dst.parent / f".{dst.name}.partial.d"


def data_name(dst: Path) -> str:
    return f"{dst.name}.data"


def write_model(model: Any, dst: Path, *, external: bool, overwrite: bool,
                before_commit: Callable[[Path], None] | None = None) -> list[Path]:
    """Save MODEL as DST (and `DST.data` if external), checked, verified, then published."""
    stage = staging_dir(dst)
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir()
        staged = stage / dst.name
        import onnx

        try:
            onnx.save_model(model, staged, save_as_external_data=external,
                            all_tensors_to_one_file=True, location=data_name(dst),
                            size_threshold=0)
        except OSError as e:
            raise output_error(dst, e) from e
        return publish(stage, dst, overwrite=overwrite, before_commit=before_commit)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, dst: Path, *, overwrite: bool,
            before_commit: Callable[[Path], None] | None) -> list[Path]:
    """fsync, check by path, verify, then rename the data file and the model into place."""
    import onnx

    staged = stage / dst.name
    files = [p for p in (stage / data_name(dst), staged) if p.exists()]
    mode = new_file_mode()
    for p in files:
        os.chmod(p, mode)  # onnx writes its data file 0600: give it what the model file gets
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    onnx.checker.check_model(str(staged), full_check=True)
    if before_commit is not None:
        before_commit(staged)
    published = []
    for p in files:  # data first: the model never points at data that is not there
        final = dst.parent / p.name
        try:
            if overwrite:
                os.replace(p, final)
            else:
                os.link(p, final)
        except FileExistsError as e:
            raise OutputError(f"'{final}' exists; pass --overwrite to replace it.") from e
        except OSError as e:
            raise output_error(final, e) from e
        published.append(final)
    fsync_dir(dst.parent)
    return published[::-1]


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs and warns about things irrelevant here (torchvision ops, deprecations);
    keep stderr for linconvert's own diagnostics."""
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "torch.export",
                                                "torch._dynamo", "torch._subclasses", "torch.fx",
                                                "onnxscript")]
    levels = [lg.level for lg in loggers]
    # Their tracebacks of a failed export run to hundreds of lines; linconvert says what failed
    # in one sentence. `-v` (DEBUG on the "linconvert" logger) lets them through.
    quiet = (logging.ERROR if logging.getLogger("linconvert").isEnabledFor(logging.DEBUG)
             else logging.CRITICAL + 1)
    try:
        for lg in loggers:
            lg.setLevel(quiet)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_model(model: Any, inputs: Sequence[Any], dst: Path, *, opset: int, external: bool,
                 metadata: dict[str, str], overwrite: bool,
                 before_commit: Callable[[Path], None] | None = None) -> tuple[list[Path], bool]:
    """Export a whole model with `torch.onnx.export` (dynamo); dynamic batch where it allows.

    Returns the files written and whether the batch axis is dynamic.
    """
    import onnx
    import torch
    from onnx import helper

    stage = staging_dir(dst)
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir()
        staged = stage / dst.name
        dynamic = True
        with _quiet_exporter():
            try:
                batch = torch.export.Dim("batch", min=1)
                program = torch.onnx.export(model, tuple(inputs), dynamo=True,
                                            opset_version=opset, verbose=False,
                                            dynamic_shapes=tuple({0: batch} for _ in inputs))
            except Exception:  # noqa: BLE001 - a model that fixes its batch: export it static
                dynamic = False
                program = torch.onnx.export(model, tuple(inputs), dynamo=True,
                                            opset_version=opset, verbose=False)
        if program is None:
            raise RuntimeError("torch.onnx.export returned no program")
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        external = external or size > EXTERNAL_THRESHOLD
        program.save(staged, external_data=external)
        if external and not (stage / data_name(dst)).exists():
            for p in stage.iterdir():  # the exporter names the data file itself
                if p != staged:
                    proto = onnx.load(staged, load_external_data=False)
                    for init in proto.graph.initializer:
                        for entry in init.external_data:
                            if entry.key == "location":
                                entry.value = data_name(dst)
                    p.rename(stage / data_name(dst))
                    onnx.save_model(proto, staged)
                    break
        proto = onnx.load(staged, load_external_data=False)
        helper.set_model_props(proto, {**{p.key: p.value for p in proto.metadata_props},
                                       **metadata})
        onnx.save_model(proto, staged)
        return publish(stage, dst, overwrite=overwrite, before_commit=before_commit), dynamic
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def initializer_bytes(init: Any) -> bytes:
    """An initializer's tensor data as bytes: its `raw_data`, else its typed fields packed."""
    if init.raw_data:
        return init.raw_data
    from onnx import numpy_helper

    return numpy_helper.to_array(init).tobytes()
