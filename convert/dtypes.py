"""The dtype vocabulary: safetensors' names, their widths, and torch's names for them.

Torch-free on purpose: planning and safetensors streaming never import torch.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    """One element type as safetensors names it."""

    name: str
    bits: int
    is_float: bool
    torch_name: str | None

    @property
    def itemsize(self) -> int:
        """Whole bytes per element (only meaningful when bits is a multiple of 8)."""
        return self.bits // 8


_TABLE = [
    # name, bits, transposable float weight, torch attribute
    ("BOOL", 8, False, "bool"),
    ("U8", 8, False, "uint8"),
    ("I8", 8, False, "int8"),
    ("F8_E5M2", 8, True, "float8_e5m2"),
    ("F8_E4M3", 8, True, "float8_e4m3fn"),
    ("F8_E8M0", 8, False, "float8_e8m0fnu"),
    ("I16", 16, False, "int16"),
    ("U16", 16, False, "uint16"),
    ("F16", 16, True, "float16"),
    ("BF16", 16, True, "bfloat16"),
    ("I32", 32, False, "int32"),
    ("U32", 32, False, "uint32"),
    ("F32", 32, True, "float32"),
    ("F64", 64, True, "float64"),
    ("I64", 64, False, "int64"),
    ("U64", 64, False, "uint64"),
    ("C64", 64, False, "complex64"),
    # Sub-byte packed types: copied as bytes, never transposed.
    ("F4", 4, False, None),
    ("F6_E2M3", 6, False, None),
    ("F6_E3M2", 6, False, None),
]

DTYPES: dict[str, DType] = {n: DType(n, b, f, t) for n, b, f, t in _TABLE}
_BY_TORCH_NAME = {d.torch_name: d.name for d in DTYPES.values() if d.torch_name}


def nbytes_of(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes that a tensor of this dtype and shape occupies on disk."""
    numel = 1
    for dim in shape:
        numel *= dim
    bits = numel * DTYPES[dtype].bits
    return (bits + 7) // 8


def is_float_weight(dtype: str, shape: tuple[int, ...]) -> bool:
    """True for a float tensor of 2 or more dims: a matrix, or a stack of them (every leading
    dim a stack dim, as stacked experts), whose last two dims linconvert may swap."""
    d = DTYPES.get(dtype)
    return len(shape) >= 2 and d is not None and d.is_float


def is_transposable(dtype: str, shape: tuple[int, ...]) -> bool:
    """True for a tensor of 2 or more dims whose elements are whole bytes: its last two dims
    can be swapped byte-wise (a float weight, a quantized int8 one, a scale grid)."""
    d = DTYPES.get(dtype)
    return len(shape) >= 2 and d is not None and d.bits % 8 == 0


def swapped(shape: tuple[int, ...]) -> tuple[int, ...]:
    """SHAPE with its last two dims swapped (the transpose of a matrix or of a stack's members)."""
    return (*shape[:-2], shape[-1], shape[-2])


def describe_shape(shape: tuple[int, ...]) -> str:
    """`4x6`, or `8 x 4x6` for a stack of 8 matrices."""
    if len(shape) > 2:
        return f"{'x'.join(map(str, shape[:-2]))} x {shape[-2]}x{shape[-1]}"
    return "x".join(map(str, shape)) or "scalar"


def dtype_from_torch(torch_dtype: object) -> str:
    """The safetensors name of a torch dtype, or `torch.<name>` for one safetensors lacks."""
    name = str(torch_dtype).removeprefix("torch.")
    return _BY_TORCH_NAME.get(name, f"torch.{name}")


def dtype_from_name(name: str) -> str | None:
    """The safetensors name for a numpy/ml_dtypes dtype name (`float32`, `bfloat16`), or None."""
    return _BY_TORCH_NAME.get(name)


def torch_dtype(dtype: str):  # noqa: ANN201 - returns torch.dtype, torch imported lazily
    """The torch dtype for a safetensors dtype name."""
    import torch

    d = DTYPES.get(dtype)
    if d is not None and d.torch_name:
        return getattr(torch, d.torch_name)
    if dtype.startswith("torch."):
        return getattr(torch, dtype.removeprefix("torch."))
    raise KeyError(dtype)
