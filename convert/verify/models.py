"""Whole-model checks: SRC and DST loaded into the user's two models, every output compared."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import NotEquivalentError, UsageError
from .layers import compare_outputs, ieee_float32, resolve_device, tolerance_for
from .report import CheckResult, Figures, VerifyReport

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint


def flatten_outputs(out: Any) -> list[Any]:
    """Tensors of a model's output in order: tensor, tuple/list, mapping, dataclass."""
    return [t for _, t in named_outputs(out)]


def named_outputs(out: Any, path: str = "") -> list[tuple[str, Any]]:
    """(name, tensor) for each tensor of a model's output, in order: a field of a mapping or
    dataclass by its name (`logits`, `past_key_values[0][1]`), a bare tensor or a member of a
    bare tuple by its position (`output[0]`)."""
    import dataclasses

    import torch

    def at(i: int) -> str:
        return f"{path}[{i}]" if path else f"output[{i}]"

    def field(name: str) -> str:
        return f"{path}.{name}" if path else str(name)

    if isinstance(out, torch.Tensor):
        return [(path or "output[0]", out)]
    if isinstance(out, Mapping):
        return [t for k, v in out.items() for t in named_outputs(v, field(k))]
    if isinstance(out, (tuple, list)):
        return [t for i, v in enumerate(out) for t in named_outputs(v, at(i))]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [t for f in dataclasses.fields(out)
                for t in named_outputs(getattr(out, f.name), field(f.name))]
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
                         rtol: float | None,
                         names: Sequence[str] | None = None) -> list[CheckResult]:
    """Two models' flattened outputs, tensor by tensor (count, shape, dtype, then values);
    NAMES are the outputs' names (`output[i]` without)."""
    import torch

    from ..dtypes import dtype_from_torch

    if len(actual) != len(expected):
        return [CheckResult("outputs", "", kind, False, message=(
            f"{expected_name} returns {len(expected)} tensors, {actual_name} {len(actual)}"))]
    results = []
    for i, (a, e) in enumerate(zip(actual, expected)):
        dtype = dtype_from_torch(e.dtype)
        name = names[i] if names is not None else f"output[{i}]"
        res = CheckResult(name, name, kind, True, dtype, tuple(a.shape))
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
            res.tolerance = (r_tol, a_tol, 1)
            res.passed, res.max_abs_err, res.rel_err, res.atol_needed, res.message = \
                compare_outputs(a, e, 1, r_tol, a_tol)
        results.append(res)
    return results


_GATES = {"min_cosine": "--min-cosine", "max_kl": "--max-kl", "min_top1": "--min-top1"}


def _logits_names(names: Sequence[str], logits: str | None) -> set[str]:
    """The outputs that are logits: the one `--logits` names (by name or position), else any
    named `logits`."""
    if logits is None:
        return {n for n in names if n.rsplit(".", 1)[-1] == "logits"}
    if logits in names:
        return {logits}
    if logits.isdigit() and int(logits) < len(names):
        return {names[int(logits)]}
    shown = ", ".join(repr(n) for n in names[:8]) + (" ..." if len(names) > 8 else "")
    raise UsageError(f"--logits '{logits}' names no output of the source model; its outputs "
                     f"are {shown} (or give a position, e.g. --logits 0).")


def add_figures(results: Sequence[CheckResult], actual: Sequence[Any], expected: Sequence[Any],
                logits: set[str], gates: Mapping[str, float]) -> None:
    """Each float output's cosine similarity and, for logits, top-1 agreement and KL; a
    gated figure that misses fails its output, and the gates, where one applies, judge the
    output instead of the element-wise tolerance (NaN, Inf, shape and dtype still fail)."""
    from .figures import cosine_similarity, kl_divergence, top1_agreement

    for res, a, e in zip(results, actual, expected):
        if res.kind != "output" or res.tolerance is None:  # not compared as floats
            continue
        fig = res.figures or Figures()
        res.figures = fig
        fig.cosine = cosine_similarity(a, e)
        if res.name in logits:
            fig.logits = True
            fig.top1, fig.kl = top1_agreement(a, e), kl_divergence(a, e)
        checks = [("min_cosine", "cosine", fig.cosine, lambda v, g: v >= g)]
        if fig.logits:
            checks += [("max_kl", "KL", fig.kl, lambda v, g: v <= g),
                       ("min_top1", "top-1 agreement", fig.top1, lambda v, g: v >= g)]
        applied = [(gate, word, value) for gate, word, value, _ in checks if gate in gates]
        if not applied or res.max_abs_err == math.inf:
            continue
        fig.gated = tuple(gate for gate, _, _ in applied)
        missed = [f"{word} {value:.6g} misses {_GATES[gate]} {gates[gate]:g}"
                  for gate, word, value, ok in checks
                  if gate in gates and not ok(value, gates[gate])]
        judged = ", ".join(_GATES[g] for g in fig.gated)
        res.passed = not missed
        res.message = ("; ".join(missed) if missed else
                       f"passes {judged}" + (f" (element-wise: {res.message})"
                                            if res.message else ""))


def add_reference(results: Sequence[CheckResult], actual: Sequence[Any],
                  expected: Sequence[Any], reference: Sequence[Any], dtype: str) -> None:
    """Each float output's distance, on both sides, from the source's run in DTYPE."""
    from .figures import distance

    for res, a, e, r in zip(results, actual, expected, reference):
        if res.tolerance is None or tuple(r.shape) != tuple(e.shape):
            continue
        fig = res.figures or Figures()
        res.figures = fig
        fig.reference = dtype
        fig.source_vs_reference, fig.target_vs_reference = distance(e, r), distance(a, r)


def _run_reference(model: Any, inputs: Sequence[Any], dtype: str, spec: str) -> list[Any]:
    """MODEL's flattened outputs, run on a copy of it in DTYPE with its float inputs cast."""
    import copy

    import torch

    tdtype = getattr(torch, dtype)
    ref = copy.deepcopy(model).to(tdtype)
    cast = [t.to(tdtype) if t.is_floating_point() else t for t in inputs]
    try:
        return flatten_outputs(ref(*cast))
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UsageError(f"--reference {dtype}: the source model '{spec}' cannot run in "
                         f"{dtype} ({why}); leave --reference out.") from e


def check_gates(gates: Mapping[str, float | None], reference: str | None) -> dict[str, float]:
    """The gates given (None left out); exit 2 for a gate that is not a number in its range or
    a REFERENCE that is not float32 or float64."""
    given = {k: float(v) for k, v in gates.items() if v is not None}
    for k, v in given.items():
        top = math.inf if k == "max_kl" else 1.0
        low = -1.0 if k == "min_cosine" else 0.0
        if not low <= v <= top:
            raise UsageError(f"{_GATES[k]} {v:g} is out of range; give a number in "
                             f"[{low:g}, {top:g}].")
    if reference not in (None, "float32", "float64"):
        raise UsageError(f"--reference '{reference}' is not float32 or float64.")
    return given


def verify_models(src: Checkpoint, dst: Checkpoint, *, source_model: str, target_model: str,
                  input_shapes: Sequence[tuple[int, ...]], input_dtype: str = "float32",
                  input_high: int | None = None, device: str = "cpu", seed: int = 0,
                  atol: float | None = None, rtol: float | None = None,
                  logits: str | None = None, reference: str | None = None,
                  min_cosine: float | None = None, max_kl: float | None = None,
                  min_top1: float | None = None) -> VerifyReport:
    """Load SRC and DST into the user's two models and compare every output tensor.

    Every float output gets its cosine similarity, logits (an output named `logits`, or the
    one LOGITS names) top-1 agreement and KL; MIN_COSINE, MAX_KL and MIN_TOP1 gate on them.
    With REFERENCE ("float64") the source model also runs in that dtype, and each side's
    distance from that run is reported.
    """
    import torch

    from ..factory import build_model

    gates = check_gates({"min_cosine": min_cosine, "max_kl": max_kl, "min_top1": min_top1},
                        reference)
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
                          if input_shapes[0] else 0, atol=atol, rtol=rtol, gates=gates,
                          reference=reference or "")
    with torch.no_grad(), ieee_float32():
        named = named_outputs(run_model(sm, inputs, source_model))
        outs_s = [t for _, t in named]
        outs_t = flatten_outputs(run_model(tm, inputs, target_model))
        outs_r = _run_reference(sm, inputs, reference, source_model) if reference else None
    names = [n for n, _ in named]
    wanted = _logits_names(names, logits)
    if not wanted and {"max_kl", "min_top1"} & set(gates):
        raise UsageError("--max-kl and --min-top1 need a logits output: the source model has "
                         f"none named 'logits'; name one with --logits (its outputs: "
                         f"{', '.join(names[:8])}).")
    results = compare_output_lists(outs_t, outs_s, "output", "the target model",
                                   "the source model", atol, rtol, names)
    if len(outs_t) == len(outs_s):
        add_figures(results, outs_t, outs_s, wanted, gates)
        if outs_r is not None and len(outs_r) == len(outs_s):
            add_reference(results, outs_t, outs_s, outs_r, reference)
    report.results += results
    return report
