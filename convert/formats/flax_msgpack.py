"""Flax msgpack checkpoints (`flax.serialization.to_bytes`), decoded with `msgpack` alone.

Flax writes a nested dict whose arrays are msgpack extension type 1: `(shape, dtype name, C
bytes)`, itself msgpack. Arrays over flax's chunk limit are written as
`{"__msgpack_chunked_array__": True, "shape": {...}, "chunks": {"0": ..., ...}}` and are
reassembled here. Numpy scalars (type 3, e.g. a step counter) are extras. Any other extension
type is refused. msgpack has no index, so the file is read into memory (bounded by its size);
arrays are views of that buffer, never allocated from an unvalidated header.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import CorruptInputError
from . import import_extra

NDARRAY, COMPLEX, NPSCALAR = 1, 2, 3
CHUNKED = "__msgpack_chunked_array__"
_COLLECTIONS = ("params", "batch_stats")


def import_msgpack() -> Any:
    return import_extra("msgpack", "Flax msgpack", "flax")


class _Array:
    """An ndarray payload: validated shape and dtype, bytes still in the file's buffer."""

    __slots__ = ("shape", "dtype", "data")

    def __init__(self, shape: tuple[int, ...], dtype: str, data: memoryview):
        self.shape, self.dtype, self.data = shape, dtype, data


def _decode_array(payload: bytes, path: Path) -> _Array:
    from ..dtypes import dtype_from_name, nbytes_of

    msgpack = import_msgpack()
    try:
        shape, dtype_name, buffer = msgpack.unpackb(payload, raw=True)
        dtype_name = dtype_name.decode("ascii")
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError,
            msgpack.exceptions.UnpackException) as e:
        raise CorruptInputError(f"'{path}' holds a malformed flax array ({e}).") from e
    dtype = dtype_from_name(dtype_name)
    if dtype is None:
        raise CorruptInputError(f"'{path}' holds an array of dtype {dtype_name!r}, which "
                                "linconvert does not convert.")
    if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CorruptInputError(f"'{path}' holds a flax array with an invalid shape {shape!r}.")
    if not isinstance(buffer, bytes) or len(buffer) != nbytes_of(dtype, tuple(shape)):
        raise CorruptInputError(f"'{path}' holds a {dtype_name} {list(shape)} array whose data "
                                f"is {len(buffer) if isinstance(buffer, bytes) else '?'} bytes, "
                                "not the size its shape says.")
    return _Array(tuple(shape), dtype, memoryview(buffer))


def read_flax(path: Path) -> tuple[dict[str, _Array], list[str]]:
    """Flattened arrays (`params.fc1.kernel`) and the names of the extras left out."""
    msgpack = import_msgpack()

    def ext_hook(code: int, data: bytes) -> Any:
        if code == NDARRAY:
            return _decode_array(data, path)
        if code == NPSCALAR:
            return ("npscalar", _decode_array(data, path))
        raise CorruptInputError(f"'{path}' holds msgpack extension type {code}, which is not "
                                "flax's ndarray; refusing to guess what it is.")

    try:
        data = path.read_bytes()
    except OSError as e:
        raise CorruptInputError(f"cannot read '{path}': {e.strerror or e}.") from e
    try:
        # unpackb sizes its limits from len(data): no allocation beyond the file's size
        tree = msgpack.unpackb(data, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except CorruptInputError:
        raise
    except (ValueError, TypeError, KeyError, RecursionError,
            msgpack.exceptions.UnpackException) as e:
        raise CorruptInputError(f"'{path}' is not a readable flax msgpack file "
                                f"({type(e).__name__}: {e}).") from e
    if not isinstance(tree, dict):
        raise CorruptInputError(f"'{path}' holds a msgpack {type(tree).__name__}, not flax "
                                "variables.")
    extras: list[str] = []
    if any(c in tree for c in _COLLECTIONS):
        extras = [str(k) for k in tree if k not in _COLLECTIONS]
        tree = {k: v for k, v in tree.items() if k in _COLLECTIONS}
    arrays: dict[str, _Array] = {}
    _flatten(tree, "", arrays, extras, path)
    if not arrays:
        raise CorruptInputError(f"'{path}' holds no arrays.")
    return arrays, extras


def _flatten(node: Any, prefix: str, out: dict[str, _Array], extras: list[str],
             path: Path) -> None:
    if isinstance(node, dict):
        if node.get(CHUNKED) is True:
            out[prefix] = _unchunk(node, prefix, path)
            return
        for k, v in node.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out, extras, path)
    elif isinstance(node, _Array):
        out[prefix] = node
    else:
        extras.append(prefix)


def _unchunk(node: dict[str, Any], key: str, path: Path) -> _Array:
    """Reassemble an array flax split into 1-D chunks."""
    from ..dtypes import nbytes_of

    try:
        shape_d, chunks_d = node["shape"], node["chunks"]
        shape = tuple(shape_d[str(i)] for i in range(len(shape_d)))
        chunks = [chunks_d[str(i)] for i in range(len(chunks_d))]
    except (KeyError, TypeError) as e:
        raise CorruptInputError(f"'{path}': chunked array '{key}' is malformed ({e}).") from e
    if not chunks or not all(isinstance(c, _Array) and c.dtype == chunks[0].dtype
                             and len(c.shape) == 1 for c in chunks):
        raise CorruptInputError(f"'{path}': chunked array '{key}' has inconsistent chunks.")
    if not all(isinstance(d, int) and d >= 0 for d in shape):
        raise CorruptInputError(f"'{path}': chunked array '{key}' has an invalid shape.")
    dtype = chunks[0].dtype
    total = sum(len(c.data) for c in chunks)
    if total != nbytes_of(dtype, shape):
        raise CorruptInputError(f"'{path}': chunked array '{key}' holds {total} bytes, not the "
                                f"{nbytes_of(dtype, shape)} its shape {list(shape)} needs.")
    joined = bytearray(total)
    pos = 0
    for c in chunks:
        joined[pos:pos + len(c.data)] = c.data
        pos += len(c.data)
    return _Array(shape, dtype, memoryview(joined))
