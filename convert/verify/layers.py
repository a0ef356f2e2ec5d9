"""Per-layer checks: a converted checkpoint computes the same function as its source.

Each converted weight's `param` side runs in `ParamLinear` (`x @ W + b`) and its `linear` side
in `nn.Linear` on the same seeded inputs; the weights are also checked for a bit-exact
transpose, and every other key for bit-exact equality.

Tolerance, per element: `|a - b| <= atol * sqrt(in) + rtol * |b|`, with
`torch.testing.assert_close`'s per-dtype defaults; `in` is the layer's reduction length (the
rounding error of a dot product grows about with its square root), 1 in whole-model mode.
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..companions import CompanionError, Role, classify
from ..dtypes import DTYPES, is_float_weight, is_transposable, swapped
from ..errors import UsageError
from ..layout import Layout
from .pairing import Pair
from .report import CheckResult, Figures, VerifyReport

if TYPE_CHECKING:
    from ..checkpoint import Checkpoint

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
_UINT = {1: "u1", 2: "<u2", 4: "<u4", 8: "<u8"}
STRIP = 16  # source rows compared per step: a cache-sized block of each side (2x torch.equal)


def transposed_equal(a: Any, b: Any) -> bool:
    """Whether integer matrix B (cols x rows) is A (rows x cols) transposed, compared strip by
    strip (the writer's kernel is not used to check itself)."""
    import numpy as np

    rows = a.shape[0]
    if b.shape != a.shape[::-1]:
        return False
    if a.size == 0:  # (2**40 x 0 too: no 2**36 empty strips)
        return True
    return all(np.array_equal(a[i:i + STRIP].T, b[:, i:i + STRIP]) for i in range(0, rows, STRIP))


def transposed_bytes_equal(a: Any, b: Any, rows: int, cols: int, itemsize: int) -> bool:
    """Whether bytes B hold the cols x rows transpose of bytes A (rows x cols elements of
    ITEMSIZE bytes), bit for bit (NaN == NaN, -0 != 0)."""
    import numpy as np

    n = rows * cols * itemsize
    if n == 0:
        return True
    view = _UINT[itemsize]
    return transposed_equal(np.frombuffer(a, np.uint8, n).view(view).reshape(rows, cols),
                            np.frombuffer(b, np.uint8, n).view(view).reshape(cols, rows))


def _transposed_bits_equal(w_src: Any, w_dst: Any) -> bool:
    """Whether W_DST is W_SRC with its last two dims swapped, bit for bit, through same-width
    integer views (NaN == NaN, -0 != 0)."""
    import torch

    view = getattr(torch, _INT_VIEW[w_src.element_size()])
    a, b = w_src.view(view), w_dst.view(view)
    if a.ndim == 2 and a.device.type == "cpu" and b.device.type == "cpu":
        return transposed_equal(a.numpy(), b.numpy())
    return bool(torch.equal(a.transpose(-2, -1), b))

CHUNK = 8 << 20
VERIFY_THREADS = 2  # pairs checked at once, at most (and no more than the CPUs we may use)
SAMPLED_OUTPUTS = 256  # a layer proven bit-exact runs on this many of its outputs, at most


def _bytes_equal(src: Checkpoint, a_key: str, dst: Checkpoint, b_key: str,
                 nbytes: int) -> bool | None:
    """Compare two tensors' bytes on disk in chunks (None if either is not a plain file range)."""
    import numpy as np

    from ..formats.safetensors import read_into

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


def _compare_exact(pair: Pair, src: Checkpoint, dst: Checkpoint,
                   proven: bool | None = None) -> CheckResult:
    """Same dtype, shape and bytes; large tensors are compared on disk, chunk by chunk
    (PROVEN: that comparison's result, where it was made already)."""
    s, d = src.specs[pair.source], dst.specs[pair.target]
    src_dtype, dst_dtype = s.dtype, d.dtype
    s_shape, d_shape = _part(s.shape, pair.source_index), _part(d.shape, pair.target_index)
    res = CheckResult(pair.name, pair.source, "tensor", True, dst_dtype, d_shape)
    whole = pair.source_index is None and pair.target_index is None

    def tensors() -> tuple[Any, Any]:
        a, b = src.tensor(pair.source), dst.tensor(pair.target)
        return (a if pair.source_index is None else a[pair.source_index],
                b if pair.target_index is None else b[pair.target_index])

    if src_dtype != dst_dtype:
        res.passed, res.message = False, f"dtype changed from {src_dtype} to {dst_dtype}"
    elif s_shape != d_shape:
        res.passed, res.message = False, f"shape changed from {s_shape} to {d_shape}"
    else:
        res.bit_exact = None if not whole else (
            proven if proven is not None
            else _bytes_equal(src, pair.source, dst, pair.target, s.nbytes))
        a = b = None
        if res.bit_exact is None:
            a, b = tensors()
            res.bit_exact = bool(_bits(a).equal(_bits(b)))
        if not res.bit_exact:
            if a is None:
                a, b = tensors()
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
                  bias_pairs: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]],
                  device: Any, batch_size: int, seed: int, atol: float | None,
                  rtol: float | None, member: tuple[int, ...] = (),
                  loaded: tuple[Any, Any] | None = None,
                  companions: Sequence[tuple[str, str, Role, Any]] = (),
                  reference: str | None = None, proven: bool | None = None) -> CheckResult:
    """One linear layer: ParamLinear on the param side vs nn.Linear on the linear side.

    SHAPES maps SRC's keys to their shapes (to find the layer's bias). MEMBER picks one
    matrix of a stack (one expert of `[E, in, out]`), and its row of an `[E, out]` bias.
    COMPANIONS (SRC key, DST key, role, a rule's block) dequantize, unmask or renormalize the
    weight on each side before the layers run, in float32. PROVEN: the bit-exact transpose
    check's result where it was already made (on the same bytes, while they were written).
    """
    import torch
    from torch import nn

    from ..modules import ParamLinear
    from ..selection import bias_key

    s_spec, d_spec = src.specs[pair.source], dst.specs[pair.target]
    s_at = (*(() if pair.source_index is None else (pair.source_index,)), *member)
    d_at = (*(() if pair.target_index is None else (pair.target_index,)), *member)
    name = pair.target + "".join(f"[{i}]" for i in d_at)
    s_shape, d_shape = _part(s_spec.shape, pair.source_index), _part(d_spec.shape,
                                                                     pair.target_index)
    res = CheckResult(name, pair.source + "".join(f"[{i}]" for i in s_at), "layer", True,
                      d_spec.dtype, tuple(d_spec.shape[len(d_at):]))
    if s_spec.dtype != d_spec.dtype:
        res.passed, res.message = False, (f"dtype changed from {s_spec.dtype} to "
                                          f"{d_spec.dtype}")
        return res
    if d_shape != swapped(s_shape):
        res.passed, res.message = False, (f"shape {d_shape} is not the transpose of "
                                          f"{s_shape}")
        return res
    whole_src, whole_dst = loaded or (src.tensor(pair.source), dst.tensor(pair.target))
    w_src, w_dst = whole_src[s_at], whole_dst[d_at]
    res.bit_exact = proven if proven is not None else _transposed_bits_equal(w_src, w_dst)
    outputs = None  # a bit-exact weight's bytes are proven: its layer runs on a sample of
    n_out = w_src.shape[-1] if src_param else w_src.shape[-2]  # its outputs (all, where not)
    norms = any(t.rpartition(".")[2] in _NORMS for _, t, _, _ in companions)
    if n_out > SAMPLED_OUTPUTS and (res.bit_exact or companions) and not norms:
        gen = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
        outputs = torch.randperm(n_out, generator=gen)[:SAMPLED_OUTPUTS].sort().values
    if companions:  # a quantized, pruned or weight-normed layer: run what it computes with
        try:
            w_src = effective_weight(w_src, [(c, role, _row(src.tensor(c), s_at), block)
                                             for c, _, role, block in companions], src_param,
                                     outputs)
            w_dst = effective_weight(w_dst, [(t, role, _row(dst.tensor(t), d_at), block)
                                             for _, t, role, block in companions],
                                     not src_param, outputs)
        except CompanionError as e:
            res.passed, res.message = False, str(e)
            return res

    src_bias_key = bias_key(pair.source, shapes)
    hit = (bias_pairs.get((src_bias_key, pair.source_index))
           or bias_pairs.get((src_bias_key, None))) if src_bias_key else None
    b_src = _row(src.tensor(src_bias_key), s_at) if src_bias_key else None
    b_dst = None
    if hit is not None and hit[0] in dst.specs:
        t = dst.tensor(hit[0])
        if hit[1] is not None:  # the bias was stacked too: its row
            t = t[hit[1]]
        # a bias still stacked beside an unstacked weight takes the source's index
        b_dst = _row(t, d_at if len(d_at) >= t.ndim - 1 else s_at)
    if outputs is not None:
        if not companions:  # (effective_weight took the sample already)
            w_src = w_src[:, outputs] if src_param else w_src[outputs]
            w_dst = w_dst[outputs] if src_param else w_dst[:, outputs]
        b_src = b_src[outputs] if b_src is not None and b_src.ndim == 1 else b_src
        b_dst = b_dst[outputs] if b_dst is not None and b_dst.ndim == 1 else b_dst
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
    if companions:
        compute, tdtype = "F32", torch.float32
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
    gen = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
    x = torch.randn(batch_size, in_f, generator=gen, dtype=torch.float64).to(device, tdtype)
    with torch.no_grad(), ieee_float32():
        y_param, y_lin = param(x), linear(x)
    expected, actual = (y_param, y_lin) if src_param else (y_lin, y_param)
    r_tol, a_tol = tolerance_for(compute, atol, rtol)
    res.tolerance = (r_tol, a_tol, in_f)
    passed, res.max_abs_err, res.rel_err, res.atol_needed, msg = compare_outputs(
        actual, expected, in_f, r_tol, a_tol)
    if reference:  # the source layer once more, in the reference dtype on the same inputs
        from .figures import distance

        ref = getattr(torch, reference)
        w, b = w_src.to(device, ref), None if b_src is None else b_src.to(device, ref)
        with torch.no_grad(), ieee_float32():
            y_ref = x.to(ref) @ w if src_param else torch.nn.functional.linear(x.to(ref), w)
        y_ref = y_ref if b is None else y_ref + b
        res.figures = Figures(reference=reference, source_vs_reference=distance(expected, y_ref),
                              target_vs_reference=distance(actual, y_ref))
    if not res.bit_exact:
        passed, msg = False, ("weight is not the bit-exact transpose of its source"
                              + (f"; {msg}" if msg else ""))
    if not passed and companions:
        msg += " (dequantized with " + ", ".join(f"'{t}'" for _, t, _, _ in companions) + ")"
    res.passed, res.message = passed, msg
    return res


_ACTIVATION = ("input_scale", "input_zero_point", "input_global_scale", "weight_global_scale",
               "activation_scale")


_NORMS = ("weight_g", "original0")  # weight norm's g: normalizes v over the dims it is 1 on


def effective_weight(w: Any, companions: Sequence[tuple[str, Role, Any, Any]], param: bool,
                     outputs: Any = None) -> Any:
    """The float32 matrix a layer computes with: W (minus its zero point) times its expanded
    scale, times its mask, or weight norm's g * v / ||v||. PARAM: W is in x out (else out x in).
    OUTPUTS: only these output channels (columns of a param W, rows of a linear one).
    Activation scales do not change the weight and are checked bit for bit only.

    Raises:
        CompanionError: a companion whose shape does not fit W.
    """
    import torch

    rows, cols = w.shape
    axis = 1 if param else 0  # the output dim

    def pick(t: Any, block: int = 1) -> Any:  # T's slices for OUTPUTS along the output dim
        if outputs is None or t.shape[axis] == 1:
            return t
        return t.index_select(axis, outputs // block if block > 1 else outputs)

    out = pick(w).to(torch.float32)
    by_leaf = {key.rpartition(".")[2]: c for key, _, c, _ in companions}
    sigma = None
    if "weight_u" in by_leaf and "weight_v" in by_leaf:  # spectral_norm: W / (u . W v)
        full = w.to(torch.float32)
        sigma = torch.dot(by_leaf["weight_u"].to(torch.float32),
                          (full.T if param else full) @ by_leaf["weight_v"].to(torch.float32))
    # zero points first: (W - z) * s
    ordered = sorted(companions, key=lambda comp: not comp[0].endswith("zero_point"))
    for key, role, c, block in ordered:
        leaf = key.rpartition(".")[2]
        if role is Role.BIAS or leaf in _ACTIVATION or (
                sigma is not None and leaf in ("weight_u", "weight_v")):
            continue
        comp = classify(key, "its weight", role, tuple(c.shape), (rows, cols), block)
        c = c.to(torch.float32)
        if comp.block is not None:  # a grid (or [out, 1]): one value per block
            c = pick(c, comp.block[axis])
            for d in (0, 1):  # expanded where it does not already fit (or broadcast)
                if c.shape[d] not in (1, out.shape[d]):
                    c = c.repeat_interleave(comp.block[d], d).narrow(d, 0, out.shape[d])
        elif c.ndim == 1 and c.numel() > 1:  # per channel: along the output dim if it fits
            by_out = c.numel() == (cols if param else rows)
            c = pick(c[None, :] if param else c[:, None]) if by_out else (
                c[:, None] if param else c[None, :])
        elif c.ndim == 2:
            c = pick(c)
        if leaf.endswith("zero_point"):
            out = out - c
        elif leaf in _NORMS:  # weight norm: g * v / ||v||
            dims = [d for d in range(2) if c.shape[d] == 1] if c.ndim == 2 else [0, 1]
            if outputs is not None and axis in dims:
                raise CompanionError(f"'{key}' normalizes across output channels, so its layer "
                                     "cannot be checked on a sample of them")
            out = c * out / out.norm(dim=dims, keepdim=True)
        else:
            out = out * c
    return out if sigma is None else out / sigma


def _verify_companion(pair: Pair, weight: str, src: Checkpoint, dst: Checkpoint) -> CheckResult:
    """A grid, mask or weight norm's g that was transposed with its weight: the bit-exact
    transpose of its source, or the scale left as it was (the silent failure of its kind)."""
    s, d = src.specs[pair.source], dst.specs[pair.target]
    res = CheckResult(pair.name, pair.source, "companion", True, d.dtype, d.shape)
    if s.dtype != d.dtype or tuple(d.shape) != swapped(s.shape):
        res.passed, res.bit_exact = False, False
        res.message = (f"{'x'.join(map(str, d.shape))} {d.dtype} is not the transpose of its "
                       f"source ({'x'.join(map(str, s.shape))} {s.dtype}), as its weight "
                       f"'{weight}' is")
        return res
    res.bit_exact = _transposed_bits_equal(src.tensor(pair.source), dst.tensor(pair.target))
    if not res.bit_exact:
        res.passed = False
        res.message = (f"not the bit-exact transpose of its source: its weight '{weight}' was "
                       "transposed and it was not transposed with it")
    return res


def _verify_parts(pair: Pair, src: Checkpoint, dst: Checkpoint, device: Any, batch_size: int,
                  seed: int, atol: float | None, rtol: float | None,
                  held: _LastTensors | None = None) -> CheckResult:
    """A split's part or a merge, as what it computes: DST must be its pieces of SRC joined
    along the output dim (bit for bit), and, for a weight, the layer DST makes must give the
    outputs of the source layers at those output positions (interleave undone). Each source
    tensor is read once (HELD keeps the last for the next pair: an unstacked split reads its
    stacked fused tensor once for all its members)."""
    import torch

    read: dict[str, Any] = {}

    def tensor(key: str) -> Any:
        if key not in read:
            read[key] = held.get(src, key) if held is not None else src.tensor(key)
        return read[key]

    d = dst.specs[pair.target]
    res = CheckResult(pair.target, ",".join(dict.fromkeys(q[0] for q in pair.parts)), "part",
                      True, d.dtype, d.shape)
    blocks, axis = [], pair.parts[0][3]
    groups: dict[int | None, list[Any]] = {}
    for source, index, rows, ax, member in pair.parts:
        t = tensor(source)
        t = t if index is None else t[index]
        blocks.append(t.narrow(ax, rows[0], rows[1] - rows[0]))
        groups.setdefault(member, []).append(blocks[-1])
    if None in groups:
        expected = torch.cat(blocks, dim=axis)
    else:  # per-expert parts merged into a stack: each member joined, then stacked
        expected = torch.stack([torch.cat(groups[m], dim=axis) for m in sorted(groups)])
    if pair.transposed:
        expected = expected.transpose(-2, -1)
    actual = dst.tensor(pair.target)
    if tuple(expected.shape) != tuple(actual.shape) or expected.dtype != actual.dtype:
        res.passed, res.bit_exact = False, False
        res.message = (f"shape {tuple(actual.shape)} is not the {tuple(expected.shape)} its "
                       "pieces make")
        return res
    res.bit_exact = bool(_bits(expected).equal(_bits(actual)))
    if expected.ndim == 2 and expected.numel() and DTYPES[d.dtype].is_float:
        compute = getattr(torch, DTYPES[_COMPUTE_DTYPE.get(d.dtype, "F32")].torch_name)
        linear_src = axis == -2  # the sources' output dim: rows (linear) or columns (param)
        in_f = blocks[0].shape[-1] if linear_src else blocks[0].shape[-2]
        gen = torch.Generator().manual_seed(seed + zlib.crc32(pair.target.encode()))
        x = torch.randn(batch_size, in_f, generator=gen, dtype=torch.float64).to(device, compute)
        with torch.no_grad(), ieee_float32():
            outs = []
            for source, index, rows, _, _ in pair.parts:
                w = tensor(source)
                w = (w if index is None else w[index]).to(device, compute)
                y = x @ (w.t() if linear_src else w)
                outs.append(y[:, rows[0]:rows[1]])
            want = torch.cat(outs, dim=-1)
            w_dst = actual.to(device, compute)
            linear_dst = linear_src != pair.transposed
            got = x @ (w_dst.t() if linear_dst else w_dst)
        r_tol, a_tol = tolerance_for(d.dtype, atol, rtol)
        res.tolerance = (r_tol, a_tol, in_f)
        passed, res.max_abs_err, res.rel_err, res.atol_needed, msg = compare_outputs(
            got, want, in_f, r_tol, a_tol)
        res.passed, res.message = passed and res.bit_exact, msg
    else:
        res.passed = res.bit_exact
    if not res.bit_exact:
        where = ""
        if None not in groups:  # a stack of merged members: name the experts that differ
            bad = [m for m in sorted(groups)
                   if not _bits(expected[m]).equal(_bits(actual[m]))]
            where = f" in member{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad[:8]))}"
            res.name = pair.target + "".join(f"[{m}]" for m in bad[:1])
        res.message = f"not the bit-exact join of its pieces{where}" + (
            f"; {res.message}" if res.message else "")
    return res


class _LastTensors:
    """The last tensor read from each checkpoint, kept while the next pair wants it too (the
    members of a stack pair with one tensor in turn)."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[str, Any]] = {}

    def get(self, ckpt: Checkpoint, key: str) -> Any:
        last = self._last.get(id(ckpt))
        if last is None or last[0] != key:
            last = self._last[id(ckpt)] = (key, ckpt.tensor(key))
        return last[1]


def _part(shape: tuple[int, ...], index: int | None) -> tuple[int, ...]:
    """The shape of one member of a stack (or the whole, without an index)."""
    return shape if index is None else tuple(shape[1:])


def _row(bias: Any, at: tuple[int, ...]) -> Any:
    """The bias of the matrix at AT: a stack's `[E, out]` bias has one row per member."""
    extra = bias.ndim - 1
    return bias[at[len(at) - extra:]] if extra > 0 else bias


def verify_checkpoints(src: Checkpoint, dst: Checkpoint, *, pairs: Sequence[Pair],
                       dropped: set[str] = frozenset(), dst_layout: Layout | None = None,
                       pairing: str = "", device: str = "cpu", batch_size: int = 8,
                       seed: int = 0, atol: float | None = None,
                       rtol: float | None = None, reference: str | None = None,
                       companion_rules: Sequence[Any] = (),
                       proven: Any = None) -> VerifyReport:
    """Check DST against SRC pair by pair; keys that pair with nothing are differences.
    With REFERENCE ("float64") each layer's source side also runs in that dtype.
    COMPANION_RULES: the `[[companion]]` rules the conversion was planned with. PROVEN, a
    mapping's `get`: (source, target) of a whole-tensor pair to the result of its byte check
    (a transpose or equality) made on the same files by someone else (`convert.verify.
    worker`, whose `get` waits until the result is made), None where it was not."""
    proven = proven or {}
    from ..companions import companion_map
    from ..selection import bias_evidence

    dev = resolve_device(device)
    report = VerifyReport(str(src.path), str(dst.path), str(dev), "plan", pairing,
                          seed=seed, batch_size=batch_size, atol=atol, rtol=rtol,
                          reference=reference or "")
    paired_src = {p.source for p in pairs} | {q[0] for p in pairs for q in p.parts}
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
    bias_pairs = {(p.source, p.source_index): (p.target, p.target_index) for p in pairs
                  if not p.transposed and not p.parts}
    comps = companion_map(shapes, companion_rules)
    target_of = {p.source: p.target for p in pairs if not p.parts and p.target in dst.specs}
    layer_comps: dict[str, list[tuple[str, str, Role, Any]]] = {}
    for c, (w, role, block) in comps.items():
        if c in target_of:
            layer_comps.setdefault(w, []).append((c, target_of[c], role, block))

    def whole_proof(p: Pair) -> bool | None:
        whole = p.source_index is None and p.target_index is None and not p.parts
        return proven.get((p.source, p.target)) if whole else None

    def check(p: Pair, held: _LastTensors) -> list[CheckResult]:
        if p.source not in src.specs:
            return [CheckResult(p.target, p.source, "missing", False,
                                message=f"its source '{p.source}' is not in SRC")]
        if p.target not in dst.specs:
            return [CheckResult(p.target, p.source, "missing", False,
                                message="missing from DST")]
        if p.parts:
            return [_verify_parts(p, src, dst, dev, batch_size, seed, atol, rtol, held)]
        if p.transposed and p.source in comps:
            out = [_verify_companion(p, comps[p.source][0], src, dst)]
        elif p.transposed:
            s = src.specs[p.source]
            if dst_layout is not None:
                src_param = dst_layout is Layout.LINEAR
            else:
                ev = bias_evidence(p.source, s.shape, shapes) if len(s.shape) >= 2 else None
                src_param = ev is None or ev[0] is Layout.PARAM
            quantized = p.source in layer_comps and is_transposable(s.dtype, s.shape)
            if not is_float_weight(s.dtype, s.shape) and not quantized:
                return [CheckResult(p.target, p.source, "layer", False, s.dtype, s.shape,
                                    message="not a float matrix")]
            # A stack (stacked experts): each member is its own layer pair, named by its index;
            # the two tensors are read once for all of them.
            loaded = (held.get(src, p.source), held.get(dst, p.target))
            out = [_verify_layer(p, src, dst, src_param, bias_pairs, shapes, dev, batch_size,
                                 seed, atol, rtol, member, loaded,
                                 layer_comps.get(p.source, ()), reference,
                                 None if member else whole_proof(p))
                   for member in itertools.product(*(range(n) for n in
                                                     _part(s.shape, p.source_index)[:-2]))]
        else:
            out = [_compare_exact(p, src, dst, whole_proof(p))]
        src.release(p.source)
        dst.release(p.target)
        return out

    def check_group(group: list[Pair]) -> list[CheckResult]:
        held = _LastTensors()  # a stack's E pairs all want it: read it once, not E times
        return [r for p in group for r in check(p, held)]

    # Pairs that share a tensor (a stack's members) stay together; groups run on two threads
    # (reads, compares and matmuls release the GIL), results in pair order.
    groups: list[list[Pair]] = []
    for p in pairs:
        if groups and (groups[-1][-1].source == p.source or groups[-1][-1].target == p.target):
            groups[-1].append(p)
        else:
            groups.append([p])
    from ..batching import default_jobs  # the CPUs this process may use

    workers = min(VERIFY_THREADS, len(groups), default_jobs())
    with ieee_float32():  # set once for every thread (the flags are global, not per thread)
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers, thread_name_prefix="linconvert-verify") as pool:
                for results in pool.map(check_group, groups):
                    report.results.extend(results)
        else:
            for group in groups:
                report.results.extend(check_group(group))
    return report

