"""Equivalence: a converted checkpoint computes the same function as its source.

Per layer, each converted weight's `param` side runs in `ParamLinear` (`x @ W + b`) and its
`linear` side in `nn.Linear` on the same seeded inputs; the weights are also checked for a
bit-exact transpose, and every other key for bit-exact equality. Whole-model mode loads SRC and
DST into the user's two models and compares every output tensor.

Tolerance, per element: `|a - b| <= atol * sqrt(in) + rtol * |b|`, with
`torch.testing.assert_close`'s per-dtype defaults; `in` is the layer's reduction length (the
rounding error of a dot product grows about with its square root), 1 in whole-model mode.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .checkpoint import Checkpoint
from .dtypes import DTYPES, is_float_matrix
from .errors import NotEquivalentError, UsageError
from .layout import Layout
from .plan import Plan, build_plan
from .selection import Selection, bias_evidence

# (rtol, atol): torch.testing.assert_close's defaults, by the dtype the forward pass runs in.
DEFAULT_TOLERANCES = {
    "F64": (1e-7, 1e-7),
    "F32": (1.3e-6, 1e-5),
    "F16": (1e-3, 1e-5),
    "BF16": (1.6e-2, 1e-5),
}
# Per-layer forward passes run in float32 for half and float8 weights: the upcast is exact, so
# the check measures the weights, not how two half-precision kernels round (x @ W and
# F.linear differ by an fp16 ulp at binade edges, far past fp16's default atol of 1e-5).
_COMPUTE_DTYPE = {"F64": "F64", "F32": "F32", "F16": "F32", "BF16": "F32",
                  "F8_E4M3": "F32", "F8_E5M2": "F32"}
_BIAS_OF = {"weight": ("bias",), "W": ("b",), "kernel": ("bias",)}


@dataclass(frozen=True)
class Pair:
    """A SRC key and its DST counterpart; `transposed` pairs are linear layers."""

    source: str
    target: str
    transposed: bool


@dataclass
class CheckResult:
    """One line of the report: a layer, a tensor, an output, or a key without a partner."""

    name: str
    source: str
    kind: str  # "layer", "tensor", "output", "missing", "unexpected"
    passed: bool
    dtype: str = ""
    shape: tuple[int, ...] = ()
    max_abs_err: float | None = None
    rel_err: float | None = None
    atol_needed: float | None = None
    bit_exact: bool | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "kind": self.kind,
                "passed": self.passed, "dtype": self.dtype, "shape": list(self.shape),
                "max_abs_err": self.max_abs_err, "rel_err": self.rel_err,
                "atol_needed": self.atol_needed, "bit_exact": self.bit_exact,
                "message": self.message}


@dataclass
class VerifyReport:
    """The outcome of a verification: every check, and what was proven."""

    source: str
    destination: str
    device: str
    proven: str  # "plan" (per layer) or "equivalence" (whole model)
    pairing: str  # where the pairs came from
    results: list[CheckResult] = field(default_factory=list)
    seed: int = 0
    batch_size: int = 0
    atol: float | None = None
    rtol: float | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def equivalent(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "destination": self.destination, "device": self.device,
                "equivalent": self.equivalent, "proven": self.proven, "pairing": self.pairing,
                "seed": self.seed, "batch_size": self.batch_size,
                "atol": self.atol, "rtol": self.rtol, "warnings": self.warnings,
                "failures": [r.name for r in self.failures],
                "results": [r.to_dict() for r in self.results]}

    def raise_if_different(self) -> None:
        """NotEquivalentError (exit 1) naming the failing checks."""
        if self.failures:
            names = ", ".join(f"'{r.name}' ({r.message})" for r in self.failures[:5])
            more = f" and {len(self.failures) - 5} more" if len(self.failures) > 5 else ""
            raise NotEquivalentError(f"'{self.destination}' is not equivalent to "
                                     f"'{self.source}': {names}{more}; nothing was written.",
                                     self)


# --- pairing --------------------------------------------------------------------------------

def pairs_from_plan(plan: Plan) -> list[Pair]:
    return [Pair(a.source, a.target, a.transpose) for a in plan.written]


def pair_keys(src: Checkpoint, dst: Checkpoint, selection: Selection | None = None,
              reference: Any = None) -> tuple[list[Pair], set[str], Layout | None, str]:
    """Pairs of SRC and DST keys: from DST's provenance, else the selection, else by name.

    Returns the pairs, SRC keys deliberately dropped, DST's layout if known, and how the pairs
    were found. A square weight that neither provenance nor options decide is exit 2.
    """
    selection = selection or Selection()
    prov = dst.provenance
    if prov is not None and not selection.chooses_layers:
        pairs = [Pair(s, d, t) for d, (s, t) in prov.keys.items()]
        return pairs, set(prov.dropped), prov.layout, "DST's provenance"
    if selection.chooses_layers or selection.renames or selection.drop:
        best: Plan | None = None
        best_score = -1
        for layout in (Layout.LINEAR, Layout.PARAM):
            try:
                plan = build_plan(src.specs, layout, selection, reference=reference,
                                  tied=src.tied, source=str(src.path))
            except UsageError:
                continue
            score = sum(1 for a in plan.written if a.target in dst.specs
                        and dst.specs[a.target].shape == a.target_shape)
            if score > best_score:
                best, best_score = plan, score
        if best is None:  # let the planner say why
            build_plan(src.specs, Layout.LINEAR, selection, reference=reference,
                       tied=src.tied, source=str(src.path))
            raise AssertionError("unreachable")
        return pairs_from_plan(best), set(best.dropped), best.layout, "the selection options"
    pairs = []
    ambiguous = []
    for k, s in src.specs.items():
        d = dst.specs.get(k)
        if d is None:
            continue
        if is_float_matrix(s.dtype, s.shape) and s.shape == d.shape and s.shape[0] == s.shape[1]:
            ambiguous.append(k)
        transposed = (is_float_matrix(s.dtype, s.shape) and s.shape[0] != s.shape[1]
                      and d.shape == s.shape[::-1])
        pairs.append(Pair(k, k, transposed))
    if ambiguous:
        shown = ", ".join(f"'{k}'" for k in ambiguous)
        raise UsageError(f"'{dst.path}' has no linconvert provenance and square weights {shown} "
                         "could be transposed or not; say which with --layers (converted) and "
                         "--exclude (unchanged), or pass the --rules/--preset used to convert.")
    return pairs, set(), None, "names and transposed shapes"


# --- comparison -----------------------------------------------------------------------------

@contextmanager
def ieee_float32() -> Iterator[None]:
    """No TF32 on CUDA while checking: float32 matmuls and convolutions in IEEE precision."""
    import torch

    backends = [torch.backends.cuda.matmul, torch.backends.cudnn, torch.backends.cudnn.conv]
    saved = [getattr(b, "fp32_precision", None) for b in backends]
    try:
        for b in backends:
            if hasattr(b, "fp32_precision"):
                b.fp32_precision = "ieee"
        yield
    finally:
        for b, value in zip(backends, saved):
            if value is not None:
                b.fp32_precision = value


def resolve_device(device: str) -> Any:
    """A torch.device, or exit 2 if it is not available here."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"--device '{device}' is not a device (use cpu, cuda or cuda:N).") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine; use "
                             "--device cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s).")
    elif dev.type != "cpu":
        raise UsageError(f"--device '{device}' is not supported (use cpu, cuda or cuda:N).")
    return dev


def tolerance_for(dtype: str, atol: float | None, rtol: float | None) -> tuple[float, float]:
    """(rtol, atol) for outputs of DTYPE, with the user's overrides."""
    d_rtol, d_atol = DEFAULT_TOLERANCES.get(dtype, DEFAULT_TOLERANCES["F32"])
    return (d_rtol if rtol is None else rtol), (d_atol if atol is None else atol)


def compare_outputs(actual: Any, expected: Any, n: int, rtol: float,
                    atol: float) -> tuple[bool, float, float, float, str]:
    """Per element `|a - b| <= atol*sqrt(n) + rtol*|b|`; NaN and Inf by position.

    Returns (passed, max_abs_err, rel_err, atol_needed, message).
    """
    import torch

    a = actual.detach().to("cpu", torch.float64)
    b = expected.detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        return False, math.inf, math.inf, math.inf, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return False, math.inf, math.inf, math.inf, "NaN at different positions"
    inf_a, inf_b = torch.isinf(a), torch.isinf(b)
    if not torch.equal(inf_a, inf_b) or not torch.equal(a[inf_a], b[inf_b]):
        return False, math.inf, math.inf, math.inf, "Inf at different positions or signs"
    finite = torch.isfinite(b)
    a, b = a[finite], b[finite]
    if a.numel() == 0:
        return True, 0.0, 0.0, 0.0, ""
    diff = (a - b).abs()
    scale = math.sqrt(max(n, 1))
    allowed = atol * scale + rtol * b.abs()
    passed = bool((diff <= allowed).all())
    max_abs = float(diff.max())
    norm = float(b.norm())
    rel = float((a - b).norm()) / norm if norm else (0.0 if max_abs == 0 else math.inf)
    needed = float(((diff - rtol * b.abs()).clamp(min=0) / scale).max())
    message = "" if passed else (f"max abs error {max_abs:.3g} exceeds atol {atol:g}*sqrt({n}) "
                                 f"+ rtol {rtol:g}*|b| (would pass with atol {needed:.3g})")
    return passed, max_abs, rel, needed, message


def _bits(t: Any) -> Any:
    """T's bytes as an integer tensor, for bit-exact comparison (NaN == NaN, -0 != 0)."""
    import torch

    t = t.detach().contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


_INT_VIEW = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


def _transposed_bits_equal(w_src: Any, w_dst: Any) -> bool:
    """Whether W_DST is W_SRC transposed bit for bit, through same-width integer views (no
    transposed copy; NaN == NaN, -0 != 0)."""
    import torch

    view = getattr(torch, _INT_VIEW[w_src.element_size()])
    return bool(torch.equal(w_src.view(view).t(), w_dst.view(view)))


def _sibling_bias(key: str, specs: Mapping[str, Any]) -> str | None:
    prefix, dot, leaf = key.rpartition(".")
    for b in _BIAS_OF.get(leaf, ()):
        k = f"{prefix}{dot}{b}"
        if k in specs and len(specs[k].shape) == 1:
            return k
    return None


CHUNK = 8 << 20


def _bytes_equal(src: Checkpoint, a_key: str, dst: Checkpoint, b_key: str,
                 nbytes: int) -> bool | None:
    """Compare two tensors' bytes on disk in chunks (None if either is not a plain file range)."""
    import numpy as np

    from .formats.safetensors import read_into

    a_loc, b_loc = src.raw_range(a_key), dst.raw_range(b_key)
    if a_loc is None or b_loc is None:
        return None
    buf_a, buf_b = bytearray(min(CHUNK, nbytes)), bytearray(min(CHUNK, nbytes))
    done = 0
    while done < nbytes:
        n = min(CHUNK, nbytes - done)
        read_into(a_loc[0], a_loc[1] + done, memoryview(buf_a)[:n])
        read_into(b_loc[0], b_loc[1] + done, memoryview(buf_b)[:n])
        if not np.array_equal(np.frombuffer(buf_a, np.uint8, n), np.frombuffer(buf_b, np.uint8, n)):
            return False
        done += n
    return True


def _compare_exact(pair: Pair, src: Checkpoint, dst: Checkpoint) -> CheckResult:
    """Same dtype, shape and bytes; large tensors are compared on disk, chunk by chunk."""
    s, d = src.specs[pair.source], dst.specs[pair.target]
    src_dtype, dst_dtype = s.dtype, d.dtype
    res = CheckResult(pair.target, pair.source, "tensor", True, dst_dtype, d.shape)
    if src_dtype != dst_dtype:
        res.passed, res.message = False, f"dtype changed from {src_dtype} to {dst_dtype}"
    elif s.shape != d.shape:
        res.passed, res.message = False, f"shape changed from {s.shape} to {d.shape}"
    else:
        res.bit_exact = _bytes_equal(src, pair.source, dst, pair.target, s.nbytes)
        a = b = None
        if res.bit_exact is None:
            a, b = src.tensor(pair.source), dst.tensor(pair.target)
            res.bit_exact = bool(_bits(a).equal(_bits(b)))
        if not res.bit_exact:
            if a is None:
                a, b = src.tensor(pair.source), dst.tensor(pair.target)
            res.passed = False
            res.message = "not bit-exact"
            if DTYPES.get(src_dtype) is not None and DTYPES[src_dtype].is_float:
                import torch

                diff = (a.double() - b.double()).abs()
                diff = diff[torch.isfinite(diff)]
                res.max_abs_err = float(diff.max()) if diff.numel() else math.inf
                res.message = f"not bit-exact (max abs difference {res.max_abs_err:.3g})"
    return res


def _verify_layer(pair: Pair, src: Checkpoint, dst: Checkpoint, src_param: bool,
                  bias_pairs: Mapping[str, str], device: Any, batch_size: int, seed: int,
                  atol: float | None, rtol: float | None) -> CheckResult:
    """One linear layer: ParamLinear on the param side vs nn.Linear on the linear side."""
    import torch
    from torch import nn

    from .modules import ParamLinear

    s_spec, d_spec = src.specs[pair.source], dst.specs[pair.target]
    res = CheckResult(pair.target, pair.source, "layer", True, d_spec.dtype, d_spec.shape)
    if s_spec.dtype != d_spec.dtype:
        res.passed, res.message = False, (f"dtype changed from {s_spec.dtype} to "
                                          f"{d_spec.dtype}")
        return res
    if d_spec.shape != s_spec.shape[::-1]:
        res.passed, res.message = False, (f"shape {d_spec.shape} is not the transpose of "
                                          f"{s_spec.shape}")
        return res
    w_src, w_dst = src.tensor(pair.source), dst.tensor(pair.target)
    res.bit_exact = _transposed_bits_equal(w_src, w_dst)

    src_bias_key = _sibling_bias(pair.source, src.specs)
    dst_bias_key = bias_pairs.get(src_bias_key) if src_bias_key else None
    b_src = src.tensor(src_bias_key) if src_bias_key else None
    b_dst = dst.tensor(dst_bias_key) if dst_bias_key and dst_bias_key in dst.specs else None
    w_param, b_param, w_lin, b_lin = ((w_src, b_src, w_dst, b_dst) if src_param
                                      else (w_dst, b_dst, w_src, b_src))
    compute = _COMPUTE_DTYPE.get(s_spec.dtype, "F32")
    tdtype = getattr(torch, DTYPES[compute].torch_name)
    in_f, out_f = w_param.shape
    bias_ok = (b_param is None or b_param.shape == (out_f,)) and (
        b_lin is None or b_lin.shape == (out_f,))
    if (b_param is None) != (b_lin is None) or not bias_ok:
        res.passed, res.message = False, "bias missing or misshapen on one side"
        return res
    if in_f == 0 or out_f == 0:  # nothing to compute: the bit-exact check is the whole story
        res.passed = res.bit_exact
        res.message = "" if res.passed else "weight is not the bit-exact transpose of its source"
        return res
    has_bias = b_param is not None
    param = ParamLinear(in_f, out_f, bias=has_bias, device="meta")
    linear = nn.Linear(in_f, out_f, bias=has_bias, device="meta")

    def load(module: nn.Module, w: Any, b: Any) -> None:
        sd = {"weight": w.to(device, tdtype)}
        if b is not None:
            sd["bias"] = b.to(device, tdtype)
        module.load_state_dict(sd, assign=True)

    load(param, w_param, b_param)
    load(linear, w_lin, b_lin)
    gen = torch.Generator().manual_seed(seed + zlib.crc32(pair.target.encode()))
    x = torch.randn(batch_size, in_f, generator=gen, dtype=torch.float64).to(device, tdtype)
    with torch.no_grad(), ieee_float32():
        y_param, y_lin = param(x), linear(x)
    expected, actual = (y_param, y_lin) if src_param else (y_lin, y_param)
    r_tol, a_tol = tolerance_for(compute, atol, rtol)
    passed, res.max_abs_err, res.rel_err, res.atol_needed, msg = compare_outputs(
        actual, expected, in_f, r_tol, a_tol)
    if not res.bit_exact:
        passed, msg = False, ("weight is not the bit-exact transpose of its source"
                              + (f"; {msg}" if msg else ""))
    res.passed, res.message = passed, msg
    return res


def verify_checkpoints(src: Checkpoint, dst: Checkpoint, *, pairs: Sequence[Pair],
                       dropped: set[str] = frozenset(), dst_layout: Layout | None = None,
                       pairing: str = "", device: str = "cpu", batch_size: int = 8,
                       seed: int = 0, atol: float | None = None,
                       rtol: float | None = None) -> VerifyReport:
    """Check DST against SRC pair by pair; keys that pair with nothing are differences."""
    dev = resolve_device(device)
    report = VerifyReport(str(src.path), str(dst.path), str(dev), "plan", pairing,
                          seed=seed, batch_size=batch_size, atol=atol, rtol=rtol)
    paired_src = {p.source for p in pairs}
    paired_dst = {p.target for p in pairs}
    for k in src.specs:
        if k not in paired_src and k not in dropped:
            report.results.append(CheckResult(k, k, "missing", False,
                                              message="SRC key has no counterpart in DST"))
    for k in dst.specs:
        if k not in paired_dst:
            report.results.append(CheckResult(k, "", "unexpected", False,
                                              message="DST key has no counterpart in SRC"))
    shapes = {k: s.shape for k, s in src.specs.items()}
    bias_pairs = {p.source: p.target for p in pairs if not p.transposed}
    for p in pairs:
        if p.source not in src.specs:
            report.results.append(CheckResult(p.target, p.source, "missing", False,
                                              message=f"its source '{p.source}' is not in SRC"))
            continue
        if p.target not in dst.specs:
            report.results.append(CheckResult(p.target, p.source, "missing", False,
                                              message="missing from DST"))
            continue
        if p.transposed:
            s = src.specs[p.source]
            if dst_layout is not None:
                src_param = dst_layout is Layout.LINEAR
            else:
                ev = bias_evidence(p.source, s.shape, shapes) if len(s.shape) == 2 else None
                src_param = ev is None or ev[0] is Layout.PARAM
            if not is_float_matrix(s.dtype, s.shape):
                report.results.append(CheckResult(p.target, p.source, "layer", False, s.dtype,
                                                  s.shape, message="not a 2-D float tensor"))
                continue
            report.results.append(_verify_layer(p, src, dst, src_param, bias_pairs, dev,
                                                batch_size, seed, atol, rtol))
        else:
            report.results.append(_compare_exact(p, src, dst))
        src.release(p.source)
        dst.release(p.target)
    return report


# --- whole model ----------------------------------------------------------------------------

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


def compare_output_lists(actual: Sequence[Any], expected: Sequence[Any], kind: str,
                         actual_name: str, expected_name: str, atol: float | None,
                         rtol: float | None) -> list[CheckResult]:
    """Two models' flattened outputs, tensor by tensor (count, shape, dtype, then values)."""
    import torch

    from .dtypes import dtype_from_torch

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

    from .factory import build_model

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
        outs_s = flatten_outputs(sm(*inputs))
        outs_t = flatten_outputs(tm(*inputs))
    report.results += compare_output_lists(outs_t, outs_s, "output", "the target model",
                                           "the source model", atol, rtol)
    return report


# --- ONNX -----------------------------------------------------------------------------------

_ORT_RUNS = {"F32", "F16", "F64"}  # onnxruntime's CPU Gemm/MatMul kernels


def _ort_session(path: Any) -> tuple[Any, str]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]), ""
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

    from .formats.onnx import read_layers
    from .modules import ParamLinear
    from .provenance import METADATA_KEY, parse_provenance

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
    for k in src.specs:
        if k not in {s for s, _ in prov.keys.values()} and k not in dropped:
            report.warnings.append(f"'{k}' is not in the layer graph (not a converted linear "
                                   "layer's weight or bias).")

    def expected_bits(dst_key: str) -> Any:
        source, transposed = prov.keys[dst_key]
        t = src.tensor(source)
        return _bits(t.t() if transposed else t)

    session, why_not = _ort_session(model_path)
    feeds, refs = {}, {}
    for layer in layers:
        res = CheckResult(layer.weight, prov.keys.get(layer.weight, ("", False))[0],
                          "onnx-layer", True, layer.dtype,
                          tuple(inits[layer.weight].dims) if layer.weight in inits else ())
        ok = True
        for key in filter(None, (layer.weight, layer.bias)):
            if key not in inits or key not in prov.keys:
                ok, res.message = False, f"initializer '{key}' is missing"
                break
            raw = onnx.numpy_helper.to_array(inits[key]) if not inits[key].raw_data else None
            data = inits[key].raw_data or raw.tobytes()
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
        source, _ = prov.keys[layer.weight]
        w = src.tensor(source)
        b = src.tensor(prov.keys[layer.bias][0]) if layer.bias else None
        src_param = prov.layout is Layout.LINEAR
        compute = torch.float64 if layer.dtype == "F64" else torch.float32
        module = (ParamLinear(layer.in_features, layer.out_features, bias=b is not None,
                              device="meta") if src_param else
                  nn.Linear(layer.in_features, layer.out_features, bias=b is not None,
                            device="meta"))
        sd = {"weight": w.to(compute)} | ({"bias": b.to(compute)} if b is not None else {})
        module.load_state_dict(sd, assign=True)
        with torch.no_grad():
            refs[layer.output] = (module(x.to(compute)), layer, res)
    if session is not None and feeds:
        outputs = dict(zip([o.name for o in session.get_outputs()],
                           session.run(None, {k: v for k, v in feeds.items()})))
    else:
        outputs = {}
    for name, (expected, layer, res) in refs.items():
        if not res.passed:
            continue
        if name not in outputs:
            res.message = (f"onnxruntime cannot run {layer.dtype} on CPU "
                           f"({why_not or 'no kernel'}); initializer bytes checked instead")
            continue
        actual = torch.from_numpy(np.asarray(outputs[name]).astype(np.float64))
        r_tol, a_tol = tolerance_for(layer.dtype, atol, rtol)
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
