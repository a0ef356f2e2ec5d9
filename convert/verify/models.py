"""Whole-model checks: SRC and DST loaded into the user's two models, every output compared."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import NotEquivalentError, UsageError
from .layers import compare_outputs, ieee_float32, resolve_device, tolerance_for
from .report import CheckResult, VerifyReport

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint


def flatten_outputs(out: Any) -> list[Any]:
    """Tensors of a model's output in order: tensor, tuple/list, mapping, dataclass."""
    import dataclasses

    import torch

    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in flatten_outputs(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in flatten_outputs(v)]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [t for f in dataclasses.fields(out)
                for t in flatten_outputs(getattr(out, f.name))]
    return []


def _load_strictly(model: Any, ckpt: Checkpoint, role: str, spec: str) -> None:
    """Load CKPT into MODEL strictly, except keys the model ties to a loaded key."""
    load_state_strictly(model, {k: ckpt.tensor(k) for k in ckpt.specs}, role, spec,
                        str(ckpt.path))


def load_state_strictly(model: Any, state: Mapping[str, Any], role: str, spec: str,
                        where: str) -> None:
    """Load STATE into MODEL strictly, except keys the model ties to a loaded key; a misfit is
    exit 2 for SRC and exit 1 (not equivalent) for anything written."""
    tied: dict[str, set[str]] = {}
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    for names in by_id.values():
        for n in names:
            tied[n] = set(names) - {n}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (tied.get(k, set()) & set(state))]
        problem = ""
        if missing or unexpected:
            problem = "; ".join(filter(None, [
                f"missing {', '.join(repr(k) for k in sorted(missing)[:8])}" if missing else "",
                f"unexpected {', '.join(repr(k) for k in sorted(unexpected)[:8])}"
                if unexpected else ""]))
    except RuntimeError as e:
        problem = str(e).strip().splitlines()[-1].strip()
    if problem:
        msg = f"{role} '{where}' does not fit the model '{spec}': {problem}."
        if role == "SRC":
            raise UsageError(msg)
        raise NotEquivalentError(msg)


def make_inputs(model: Any, shapes: Sequence[tuple[int, ...]], dtype: str,
                 high: int | None, seed: int, device: Any) -> list[Any]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    if dtype in ("int64", "int32", "long", "int"):
        if high is None:
            sizes = [m.num_embeddings for m in model.modules()
                     if isinstance(m, torch.nn.Embedding)]
            if not sizes:
                raise UsageError("--input-dtype int64 needs --input-high N: the source model has "
                                 "no nn.Embedding to take the range from.")
            high = min(sizes)
        tdtype = torch.int64 if dtype in ("int64", "long") else torch.int32
        return [torch.randint(0, high, s, generator=gen).to(device, tdtype) for s in shapes]
    try:
        tdtype = getattr(torch, dtype)
        if not isinstance(tdtype, torch.dtype) or not tdtype.is_floating_point:
            raise AttributeError(dtype)
    except AttributeError as e:
        raise UsageError(f"--input-dtype '{dtype}' is not float32, float64, float16, bfloat16 "
                         "or int64.") from e
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device, tdtype)
            for s in shapes]


def run_model(model: Any, inputs: Sequence[Any], spec: str) -> Any:
    """MODEL's outputs on INPUTS; inputs it cannot take are the user's mistake (exit 2), said
    with what the model's first layer expects."""
    try:
        return model(*inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        shapes = ", ".join("x".join(map(str, t.shape)) for t in inputs)
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UsageError(f"the model '{spec}' cannot run on --input-shape {shapes} ({why})"
                         f"{_expects(model)}; give --input-shape the shape it takes.") from e


def _expects(model: Any) -> str:
    """What the model's first layer takes, in words ("; its first layer ... takes ...")."""
    from ..modules import ParamLinear

    for name, m in model.named_modules():
        features = (m.weight.shape[0] if isinstance(m, ParamLinear)
                    else getattr(m, "in_features", None))
        if isinstance(features, int):
            return (f"; its first layer '{name}' takes {features} features "
                    f"(e.g. --input-shape 8,{features})")
        if isinstance(getattr(m, "num_embeddings", None), int):
            return (f"; its first layer '{name}' takes token ids below {m.num_embeddings} "
                    "(--input-dtype int64)")
        weight = getattr(m, "weight", None)
        if getattr(weight, "ndim", 0) == 2 and not list(m.children()):
            shape = "x".join(map(str, weight.shape))
            return f"; its first layer '{name}' holds a {shape} weight"
    return ""


def compare_output_lists(actual: Sequence[Any], expected: Sequence[Any], kind: str,
                         actual_name: str, expected_name: str, atol: float | None,
                         rtol: float | None) -> list[CheckResult]:
    """Two models' flattened outputs, tensor by tensor (count, shape, dtype, then values)."""
    import torch

    from ..dtypes import dtype_from_torch

    if len(actual) != len(expected):
        return [CheckResult("outputs", "", kind, False, message=(
            f"{expected_name} returns {len(expected)} tensors, {actual_name} {len(actual)}"))]
    results = []
    for i, (a, e) in enumerate(zip(actual, expected)):
        dtype = dtype_from_torch(e.dtype)
        res = CheckResult(f"output[{i}]", f"output[{i}]", kind, True, dtype, tuple(a.shape))
        if a.shape != e.shape or a.dtype != e.dtype:
            res.passed = False
            res.message = (f"{expected_name} gives {dtype} {tuple(e.shape)}, {actual_name} "
                           f"{dtype_from_torch(a.dtype)} {tuple(a.shape)}")
        elif not e.is_floating_point():
            res.bit_exact = bool(torch.equal(a, e))
            res.passed = res.bit_exact
            res.message = "" if res.passed else "integer outputs differ"
        else:
            r_tol, a_tol = tolerance_for(dtype, atol, rtol)
            res.passed, res.max_abs_err, res.rel_err, res.atol_needed, res.message = \
                compare_outputs(a, e, 1, r_tol, a_tol)
        results.append(res)
    return results


def verify_models(src: Checkpoint, dst: Checkpoint, *, source_model: str, target_model: str,
                  input_shapes: Sequence[tuple[int, ...]], input_dtype: str = "float32",
                  input_high: int | None = None, device: str = "cpu", seed: int = 0,
                  atol: float | None = None, rtol: float | None = None) -> VerifyReport:
    """Load SRC and DST into the user's two models and compare every output tensor."""
    import torch

    from ..factory import build_model

    if not input_shapes:
        raise UsageError("whole-model verification needs at least one --input-shape, e.g. "
                         "--input-shape 4,784.")
    dev = resolve_device(device)
    sm = build_model(source_model, "--source-model")
    tm = build_model(target_model, "--target-model")
    _load_strictly(sm, src, "SRC", source_model)
    _load_strictly(tm, dst, "DST", target_model)
    sm.to(dev).eval()
    tm.to(dev).eval()
    inputs = make_inputs(sm, input_shapes, input_dtype, input_high, seed, dev)
    report = VerifyReport(str(src.path), str(dst.path), str(dev), "equivalence",
                          "whole model", seed=seed, batch_size=input_shapes[0][0]
                          if input_shapes[0] else 0, atol=atol, rtol=rtol)
    with torch.no_grad(), ieee_float32():
        outs_s = flatten_outputs(run_model(sm, inputs, source_model))
        outs_t = flatten_outputs(run_model(tm, inputs, target_model))
    report.results += compare_output_lists(outs_t, outs_s, "output", "the target model",
                                           "the source model", atol, rtol)
    return report

