"""torch.distributed.checkpoint folders (`.metadata` and `__R_I.distcp`), read without a process
group and without `dcp_to_torch_save`.

`.metadata` is a pickle of DCP's `Metadata`: the shape, dtype and chunks of every tensor, and
where each chunk lies (a `.distcp` file, an offset, a length). `pickle.dump` writes it in
protocol 4, which torch's weights_only unpickler does not parse, so its opcodes are first
rewritten into protocol 2 (`STACK_GLOBAL` into `GLOBAL`, framing and memo shorthands dropped:
pure parsing, nothing runs) and then unpickled by that unpickler, allowing exactly DCP's
metadata classes, by name, as inert stand-ins: a global outside them is refused (exit 3) and no
code runs.

Each chunk is a `torch.save` blob (a zip archive) inside its `.distcp`; its storage record is
located with `torch.load(map_location="meta")`, which reads no tensor data, and read with pread.
A tensor sharded over ranks is assembled chunk by chunk into the buffer being written, so memory
is bounded by the largest tensor, never the model. Every offset and length is checked against
the files' sizes before anything is allocated from it.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import struct
import sys
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..dtypes import dtype_from_torch
from ..errors import CorruptInputError, UnsafeInputError, UsageError
from . import METADATA_NAME, dcp_folder
from .safetensors import open_regular, read_into, shorten
from .source import Source, TensorSpec
from .torch_pt import (
    MIN_TORCH,
    STATE_DICT_KEYS,
    ZIP_MAGIC,
    check_archive,
    reason,
    refused_globals,
    resolve_globals,
)

SUFFIX = ".distcp"
MAX_PAIRWISE = 1024  # chunks of one tensor checked pairwise for overlap; more: by their offsets


# --- .metadata --------------------------------------------------------------------------------

class _Record:
    """An inert stand-in for one of DCP's metadata dataclasses: unpickling fills its fields
    (`BUILD` with a dict) and runs none of DCP's code, and reading `.metadata` imports no
    torch.distributed (which a torch build may lack)."""


class _Metadata(_Record):
    state_dict_metadata: Any = None
    planner_data: Any = None
    storage_data: Any = None


class _TensorStorageMetadata(_Record):
    pass


class _BytesStorageMetadata(_Record):
    pass


class _ChunkStorageMetadata(_Record):
    pass


class _TensorProperties(_Record):
    def __setstate__(self, state: tuple) -> None:  # DCP pickles (dtype, layout, ...)
        self.dtype = state[0]


class _MetadataIndex(_Record):
    """A key of `storage_data`: equal by fqn and offset, as DCP's frozen dataclass."""

    @classmethod
    def of(cls, fqn: str, offset: Sequence[int]) -> _MetadataIndex:
        out = cls()
        out.fqn, out.offset = fqn, tuple(offset)
        return out

    def _ident(self) -> tuple:
        offset = getattr(self, "offset", None)
        return (getattr(self, "fqn", None), None if offset is None else tuple(offset))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _MetadataIndex) and self._ident() == other._ident()

    def __hash__(self) -> int:
        return hash(self._ident())


def _mem_format(value: int) -> int:
    """DCP's `_MEM_FORMAT_ENCODING(value)`: the value alone (memory formats are not used)."""
    return value


_DCP = "torch.distributed.checkpoint"
_STAND_INS = {f"{_DCP}.metadata.Metadata": _Metadata,
              f"{_DCP}.metadata.TensorStorageMetadata": _TensorStorageMetadata,
              f"{_DCP}.metadata.BytesStorageMetadata": _BytesStorageMetadata,
              f"{_DCP}.metadata.ChunkStorageMetadata": _ChunkStorageMetadata,
              f"{_DCP}.metadata.TensorProperties": _TensorProperties,
              f"{_DCP}.metadata._MEM_FORMAT_ENCODING": _mem_format,
              f"{_DCP}.metadata.MetadataIndex": _MetadataIndex,
              f"{_DCP}.metadata.StorageMeta": _Record,
              f"{_DCP}.filesystem._StorageInfo": _Record}


def _metadata_globals() -> list[object]:
    """Exactly the globals DCP's `.metadata` is made of, DCP's classes by their names as inert
    stand-ins (torch.Size and dtypes are allowed by torch's unpickler already)."""
    import pathlib

    return [*((obj, name) for name, obj in _STAND_INS.items()), pathlib.PosixPath,
            pathlib.PurePosixPath]


_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}
_GETS = {"BINGET", "LONG_BINGET", "GET"}
_PUTS = {"BINPUT", "LONG_BINPUT", "PUT"}


def as_protocol_2(data: bytes) -> bytes:
    """DATA, a pickle of protocol 2 to 5, rewritten into the protocol 2 opcodes torch's
    weights_only unpickler reads: `STACK_GLOBAL` becomes `GLOBAL` (its two strings taken from
    the opcodes that push them), `FRAME` is dropped, `MEMOIZE` becomes an explicit put and
    short strings become `BINUNICODE`. Only parses, in one pass; other opcodes are copied for
    torch's unpickler to accept or refuse (the allow-list is its, and applies to every global).

    Raises:
        ValueError: DATA is not a complete pickle, or a `STACK_GLOBAL` whose names are not
            two strings pushed just before it.
    """
    ops = list(pickletools.genops(io.BytesIO(data)))
    out = io.BytesIO()
    memo_str: dict[int, str] = {}  # memo slots that hold a string, as the pickle stands now
    # the last strings pushed and not yet written (a STACK_GLOBAL takes two), each with the
    # memo slots it was put in
    pending: list[tuple[str, list[int]]] = []
    count = 0
    stored = False  # whether the last push was a pending string (a MEMOIZE then stores it)

    def write_pending(n: int) -> None:
        for text, slots in pending[:n]:
            _write_string(out, text)
            for idx in slots:
                out.write(b"r" + struct.pack("<I", idx))
        del pending[:n]

    for i, (op, arg, pos) in enumerate(ops):
        name = op.name
        if name == "FRAME":
            continue
        if name == "MEMOIZE" or name in _PUTS:
            idx = count if name == "MEMOIZE" else arg
            count += name == "MEMOIZE"
            if stored:
                pending[-1][1].append(idx)
                memo_str[idx] = pending[-1][0]
            else:
                memo_str.pop(idx, None)
                out.write(b"r" + struct.pack("<I", idx))
            continue
        if name in _STRINGS or (name in _GETS and arg in memo_str):
            write_pending(len(pending) - 1)  # keep the last one: it and this may be a global's
            pending.append((arg if name in _STRINGS else memo_str[arg], []))
            stored = True
            continue
        stored = False
        if name == "STACK_GLOBAL":
            if len(pending) != 2 or any("\n" in text for text, _ in pending):
                raise ValueError("a STACK_GLOBAL whose module and name are not plain strings")
            (module, _), (attr, _) = pending
            pending.clear()  # their memo slots stay in memo_str: a later get pushes the string
            out.write(b"c" + f"{module}\n{attr}\n".encode())
            continue
        write_pending(len(pending))
        if name == "PROTO":
            out.write(b"\x80\x02")
        elif name in _GETS:
            out.write(b"j" + struct.pack("<I", arg))
        else:
            out.write(data[pos:ops[i + 1][2] if i + 1 < len(ops) else len(data)])
    return out.getvalue()


def _write_string(out: io.BytesIO, text: str) -> None:
    raw = text.encode("utf-8", "surrogatepass")
    out.write(b"X" + struct.pack("<I", len(raw)) + raw)


def read_metadata(path: Path, allow_globals: Sequence[str] = ()) -> Any:
    """DCP's `Metadata` from PATH, unpickled by torch's weights_only unpickler.

    Raises:
        UnsafeInputError: a global outside DCP's classes (and ALLOW_GLOBALS).
        CorruptInputError: not a readable pickle of DCP's metadata.
    """
    import torch
    from torch._weights_only_unpickler import Unpickler

    if torch.__version__ < MIN_TORCH:
        raise UnsafeInputError(f"refusing to unpickle '{path}' with torch {torch.__version__}: "
                               f"its weights_only unpickler has known memory-corruption bugs "
                               f"before {MIN_TORCH}; upgrade torch (pip install 'torch>="
                               f"{MIN_TORCH}').")
    allowed = [*_metadata_globals(), *resolve_globals(allow_globals)]
    try:
        with open_regular(path) as f:
            data = f.read()
    except OSError as e:
        raise CorruptInputError(f"cannot read '{path}': {e.strerror or e}.") from e
    try:
        plain = as_protocol_2(data)
    except (ValueError, EOFError, struct.error, UnicodeError) as e:
        raise CorruptInputError(f"'{path}' is not DCP's metadata: not a readable pickle "
                                f"({shorten(str(e), 120)}); re-copy the checkpoint folder.") from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.serialization.safe_globals(allowed):
                md = Unpickler(io.BytesIO(plain), encoding="utf-8").load()
    except pickle.UnpicklingError as e:
        refused = refused_globals(path, str(e), False, allowed, allow_globals)
        if refused is not None:
            raise refused from e
        raise CorruptInputError(f"'{path}' is not DCP's metadata: {reason(e)}.") from e
    # The unpickler raises many types on malformed input (DESIGN.md's stated exception to
    # "no bare Exception"): each means the file is unreadable, exit 4.
    except (RuntimeError, EOFError, IndexError, KeyError, ValueError, TypeError, OverflowError,
            AttributeError, UnicodeDecodeError, MemoryError, struct.error, RecursionError,
            NotImplementedError, AssertionError) as e:
        raise CorruptInputError(f"'{path}' is not DCP's metadata: {reason(e)}.") from e
    if not isinstance(md, _Metadata) or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise CorruptInputError(f"'{path}' holds a {type(md).__name__}, not the Metadata of a "
                                "torch.distributed.checkpoint folder.")
    bad = next((k for k in md.state_dict_metadata if not isinstance(k, str)), None)
    if bad is not None:
        raise CorruptInputError(f"'{path}' names an entry by a {type(bad).__name__}, not a "
                                "string key; it is not DCP's metadata.")
    return md


# --- the state dict inside the flattened keys -------------------------------------------------

@dataclass(frozen=True)
class _Chunk:
    """One saved piece of a tensor: where it sits in the tensor, and its blob in a file."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    file: str
    start: int
    length: int


def _key_paths(md: Any) -> dict[str, tuple[str, ...]]:
    """fqn -> the nested path it was flattened from (DCP's planner_data), else (fqn,)."""
    data = md.planner_data if isinstance(md.planner_data, dict) else {}
    out = {}
    for fqn in md.state_dict_metadata:
        p = data.get(fqn)
        if isinstance(p, (tuple, list)) and p and all(isinstance(x, (str, int)) for x in p):
            out[fqn] = tuple(map(str, p))
        else:
            out[fqn] = (fqn,)
    return out


def _find_state_dict(md: Any, path: Path, state_dict_key: str | None
                     ) -> tuple[dict[str, str], list[str]]:
    """key -> fqn of the state dict's tensors, and the names of everything else (extras),
    found as `torch_pt.find_state_dict` finds a nested `.pt` checkpoint's."""
    paths = _key_paths(md)
    is_tensor = {f: isinstance(m, _TensorStorageMetadata)
                 for f, m in md.state_dict_metadata.items()}
    top = list(dict.fromkeys(p[0] for p in paths.values()))
    if state_dict_key:
        prefix = tuple(state_dict_key.split("."))
        inside = [f for f, p in paths.items() if p[:len(prefix)] == prefix and len(p) > len(prefix)]
        if not any(is_tensor[f] for f in inside):
            shown = ", ".join(shorten(repr(t)) for t in top[:12]) or "none"
            raise UsageError(f"'{path}' holds no tensors under '{state_dict_key}' (its top-level "
                             f"keys: {shown}); fix --state-dict-key.")
    elif all(len(p) == 1 for f, p in paths.items() if is_tensor[f]) and all(is_tensor.values()):
        prefix = ()
    else:
        prefix = next(((k,) for k in STATE_DICT_KEYS
                       if any(is_tensor[f] and p[0] == k and len(p) > 1
                              for f, p in paths.items())), ())
        if not prefix and not any(is_tensor[f] and len(p) == 1 for f, p in paths.items()):
            shown = ", ".join(shorten(repr(t)) for t in top[:12])
            raise CorruptInputError(f"'{path}' has no state dict at its top level or under "
                                    f"{', '.join(STATE_DICT_KEYS)} (keys: {shown}); name it with "
                                    "--state-dict-key a.b.")
    keys: dict[str, str] = {}
    extras: dict[str, None] = {}
    for fqn, p in paths.items():
        if p[:len(prefix)] == prefix and is_tensor[fqn] and (prefix or len(p) == 1):
            key = ".".join(p[len(prefix):])
            if key in keys:
                raise CorruptInputError(f"'{path}' names state-dict key '{shorten(key)}' twice "
                                        f"('{keys[key]}' and '{fqn}').")
            keys[key] = fqn
        elif prefix and p[:len(prefix)] == prefix:
            extras[fqn] = None  # a non-tensor entry of the state dict (an _extra_state)
        else:  # outside the state dict: named down to where its path leaves PREFIX
            depth = next((i for i, (a, b) in enumerate(zip(p, prefix)) if a != b),
                         min(len(p), len(prefix)))
            extras[".".join(p[:depth + 1])] = None
    return keys, list(extras)


# --- checking the chunks against the files ----------------------------------------------------

def _check_chunks(meta_path: Path, key: str, fqn: str, tmeta: Any, storage: dict,
                  sizes: dict[str, int]) -> tuple[tuple[int, ...], str, int, list[_Chunk]]:
    """KEY's shape, dtype, item size and chunks, every one checked against the file holding it."""
    import torch

    where = f"'{meta_path}': key '{shorten(key)}'"
    props = getattr(tmeta, "properties", None)
    dtype = getattr(props, "dtype", None)
    shape = _dims(getattr(tmeta, "size", None))
    if not isinstance(dtype, torch.dtype) or shape is None:
        raise CorruptInputError(f"{where} has no valid dtype and size in the metadata.")
    chunks_meta = getattr(tmeta, "chunks", None)
    if not isinstance(chunks_meta, list):
        raise CorruptInputError(f"{where} has no chunk list in the metadata.")
    itemsize = dtype.itemsize
    chunks = []
    volume = 0
    for c in chunks_meta:
        ok = isinstance(c, _ChunkStorageMetadata)
        offsets = _dims(getattr(c, "offsets", None)) if ok else None
        csize = _dims(getattr(c, "sizes", None)) if offsets is not None else None
        if csize is None or len(offsets) != len(shape) or len(csize) != len(shape) or any(
                o + s > d for o, s, d in zip(offsets, csize, shape)):
            raise CorruptInputError(f"{where} has a chunk outside its shape {list(shape)}.")
        n = _numel(csize)
        volume += n
        info = storage.get(_MetadataIndex.of(fqn, offsets))
        if info is None:
            raise CorruptInputError(f"{where} has a chunk at offsets {list(offsets)} that the "
                                    "metadata stores nowhere; re-copy the checkpoint folder.")
        chunks.append(_chunk_of(meta_path, key, offsets, csize, info, sizes, n * itemsize))
    if volume != _numel(shape):
        raise CorruptInputError(f"{where} is {list(shape)} ({_numel(shape)} elements) but its "
                                f"chunks hold {volume}; the checkpoint is incomplete.")
    _check_disjoint(where, chunks)
    return shape, dtype_from_torch(dtype), itemsize, chunks


def _dims(value: object) -> tuple[int, ...] | None:
    if not isinstance(value, (tuple, list)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in value):
        return None
    return tuple(value)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _chunk_of(meta_path: Path, key: str, offsets: tuple[int, ...], csize: tuple[int, ...],
              info: Any, sizes: dict[str, int], nbytes: int) -> _Chunk:
    folder = meta_path.parent
    rel = getattr(info, "relative_path", None)
    start, length = getattr(info, "offset", None), getattr(info, "length", None)
    where = f"key '{shorten(key)}'"
    if not isinstance(rel, str) or not all(isinstance(x, int) and not isinstance(x, bool)
                                           and x >= 0 for x in (start, length)):
        raise CorruptInputError(f"'{meta_path}': {where} has a malformed storage entry.")
    if not rel or rel in (".", "..") or "/" in rel or "\\" in rel or "\0" in rel:
        raise UnsafeInputError(f"'{meta_path}': {where} is stored in '{shorten(rel)}', a path "
                               "outside the checkpoint folder; linconvert reads only the "
                               "folder's own files.")
    transforms = getattr(info, "transform_descriptors", None)
    if transforms:
        raise CorruptInputError(f"'{folder / rel}': {where} is stored through the transform "
                                f"{', '.join(map(repr, transforms))}, which linconvert cannot "
                                "decode; save the checkpoint without _extensions.")
    if rel not in sizes:
        try:
            with open_regular(folder / rel) as f:
                sizes[rel] = os.fstat(f.fileno()).st_size
        except FileNotFoundError as e:
            raise CorruptInputError(f"'{folder / rel}', which holds {where}, is missing; "
                                    "re-copy the whole checkpoint folder.") from e
        except OSError as e:
            raise CorruptInputError(f"cannot read '{folder / rel}' ({where}): "
                                    f"{e.strerror or e}.") from e
    if start + length > sizes[rel]:
        raise CorruptInputError(f"'{folder / rel}' ends at byte {sizes[rel]} but {where} is "
                                f"stored at bytes {start}..{start + length} (truncated?); "
                                "re-copy the checkpoint folder.")
    if length < nbytes:
        raise CorruptInputError(f"'{folder / rel}': {where} has a chunk of {nbytes} bytes "
                                f"stored in {length}; the metadata does not match the file.")
    return _Chunk(offsets, csize, rel, start, length)


def _check_disjoint(where: str, chunks: list[_Chunk]) -> None:
    """No two chunks cover one element (with the volume check: they tile the tensor)."""
    if len(chunks) <= MAX_PAIRWISE:
        for i, a in enumerate(chunks):
            for b in chunks[i + 1:]:
                if all(ao < bo + bs and bo < ao + as_ for ao, as_, bo, bs in
                       zip(a.offsets, a.sizes, b.offsets, b.sizes)) and _numel(a.sizes) \
                        and _numel(b.sizes):
                    raise CorruptInputError(f"{where} has overlapping chunks at offsets "
                                            f"{list(a.offsets)} and {list(b.offsets)}.")
    elif len({c.offsets for c in chunks}) != len(chunks):
        raise CorruptInputError(f"{where} has two chunks at one offset.")


# --- reading tensors ------------------------------------------------------------------------

def _natural(name: str) -> list[object]:
    """`__10_0.distcp` after `__2_0.distcp`: rank and file numbers compared as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class _Slice(io.RawIOBase):
    """A read-only, seekable file over LENGTH bytes of FD from START (one chunk's blob)."""

    def __init__(self, fd: int, start: int, length: int):
        super().__init__()
        self.fd, self.start, self.length, self.pos = fd, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        if n == 0:
            return 0
        got = os.preadv(self.fd, [memoryview(buffer).cast("B")[:n]], self.start + self.pos)
        self.pos += got
        return got


class DcpSource(Source):
    """A torch.distributed.checkpoint folder: tensors read chunk by chunk with pread.

    Attributes:
        extras: the entries beside the state dict (optimizer state, step, ...), not read.
    """

    format = "dcp"

    def __init__(self, path: Path, state_dict_key: str | None = None,
                 allow_globals: Sequence[str] = ()):
        super().__init__(path)
        folder = dcp_folder(path)
        self._meta_path = folder / METADATA_NAME
        self._allowed = resolve_globals(allow_globals)
        self._allow_names = tuple(allow_globals)
        md = read_metadata(self._meta_path, allow_globals)
        keys, self.extras = _find_state_dict(md, path, state_dict_key)
        sizes: dict[str, int] = {}
        self._chunks: dict[str, list[_Chunk]] = {}
        self._itemsize: dict[str, int] = {}
        for key, fqn in keys.items():
            shape, dtype, itemsize, chunks = _check_chunks(
                self._meta_path, key, fqn, md.state_dict_metadata[fqn], md.storage_data, sizes)
            self.specs[key] = TensorSpec(shape, dtype)
            self._chunks[key] = chunks
            self._itemsize[key] = itemsize
        names = sorted(sizes, key=_natural)
        self.files = (self._meta_path, *(folder / n for n in names))
        self._fds: dict[str, int] = {}
        try:
            for n in names:
                self._fds[n] = os.open(folder / n, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            self.close()
            raise CorruptInputError(f"cannot open '{folder / n}': {e.strerror or e}.") from e
        self._layouts: dict[_Chunk, tuple[int, int] | None] = {}
        self._cache: tuple[str, bytearray] | None = None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}
        self._cache = None

    # -- one chunk

    def _where(self, key: str, c: _Chunk) -> str:
        return f"'{self._meta_path.parent / c.file}': key '{shorten(key)}'"

    def _load_blob(self, key: str, c: _Chunk, meta: bool) -> Any:
        """The chunk's tensor from its torch.save blob: on the meta device (no data read),
        or read into memory."""
        import torch

        where = self._where(key, c)
        blob = io.BufferedReader(_Slice(self._fds[c.file], c.start, c.length))
        if blob.peek(4)[:4] != ZIP_MAGIC:
            raise CorruptInputError(f"{where}: its chunk at byte {c.start} is not a torch.save "
                                    "blob (the only serialization linconvert reads in a .distcp; "
                                    "DCP's safetensors serialization is not supported).")
        try:
            check_archive(self._meta_path.parent / c.file, c.length, blob)
            blob.seek(0)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with torch.serialization.safe_globals(self._allowed):
                    t = torch.load(blob, map_location="meta" if meta else "cpu",
                                   weights_only=True)
        except (CorruptInputError, UnsafeInputError) as e:
            shown = str(e).replace(f"'{self._meta_path.parent / c.file}' ", "its chunk ", 1)
            raise type(e)(f"{where}: {shown}") from e
        except pickle.UnpicklingError as e:
            refused = refused_globals(self._meta_path.parent / c.file, str(e), False,
                                      self._allowed, self._allow_names)
            raise (refused or CorruptInputError(f"{where}: its chunk is not readable "
                                                f"({reason(e)}).")) from e
        except (RuntimeError, EOFError, IndexError, KeyError, ValueError, TypeError,
                OverflowError, AttributeError, zipfile.BadZipFile, UnicodeDecodeError, OSError,
                MemoryError, struct.error, RecursionError, NotImplementedError,
                AssertionError) as e:
            raise CorruptInputError(f"{where}: its chunk is not readable ({reason(e)}).") from e
        spec = self.specs[key]
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided \
                or dtype_from_torch(t.dtype) != spec.dtype or tuple(t.shape) != c.sizes:
            got = (f"{dtype_from_torch(t.dtype)} {list(t.shape)}" if isinstance(t, torch.Tensor)
                   else f"a {type(t).__name__}")
            raise CorruptInputError(f"{where}: its chunk holds {got} where the metadata says "
                                    f"{spec.dtype} {list(c.sizes)}.")
        return t

    def _layout(self, key: str, c: _Chunk) -> tuple[int, int] | None:
        """(file offset, bytes) of the chunk's C-contiguous data, or None where it must be
        decoded by torch (a strided or byte-swapped storage)."""
        if c not in self._layouts:
            t = self._load_blob(key, c, meta=True)
            storage = t.untyped_storage()
            record = getattr(storage, "_checkpoint_offset", None)
            itemsize = self._itemsize[key]
            n = t.numel() * itemsize
            begin = t.storage_offset() * itemsize
            if record is None:  # a torch that does not say where the record lies: decode
                self._layouts[c] = None
                return None
            if not isinstance(record, int) or record + storage.nbytes() > c.length \
                    or begin + n > storage.nbytes():
                raise CorruptInputError(f"{self._where(key, c)}: its chunk's data record lies "
                                        "outside the chunk.")
            little = sys.byteorder == "little" and self._byteorder(c) == "little"
            self._layouts[c] = (c.start + record + begin, n) \
                if t.is_contiguous() and little else None
        return self._layouts[c]

    def _byteorder(self, c: _Chunk) -> str:
        """The byte order a chunk's blob records (torch.save writes `byteorder`)."""
        with zipfile.ZipFile(io.BufferedReader(_Slice(self._fds[c.file], c.start, c.length))) as z:
            name = next((n for n in z.namelist() if n.endswith("/byteorder")), None)
            return z.read(name).decode("ascii", "replace") if name else "little"

    def _chunk_bytes(self, key: str, c: _Chunk, out: memoryview) -> None:
        """Fill OUT with the chunk's bytes in C order."""
        import torch

        loc = self._layout(key, c)
        if loc is not None:
            read_into(self._fds[c.file], loc[0], out)
            return
        t = self._load_blob(key, c, meta=False).contiguous()
        if t.numel():
            out[:] = memoryview(t.reshape(-1).view(torch.uint8).numpy())

    # -- one tensor

    def _nbytes(self, key: str) -> int:
        return _numel(self.specs[key].shape) * self._itemsize[key]

    def _single(self, key: str) -> tuple[int, int] | None:
        chunks = self._chunks[key]
        if len(chunks) != 1:
            return None
        return self._layout(key, chunks[0])

    def _fill(self, key: str, out: memoryview) -> None:
        """Assemble KEY's chunks into OUT (C order): a slab of whole rows (FSDP shards dim 0)
        is read straight into place, any other chunk through a buffer of its own size."""
        import numpy as np

        spec = self.specs[key]
        itemsize = self._itemsize[key]
        row = _numel(spec.shape[1:]) * itemsize
        full = None
        for c in self._chunks[key]:
            n = _numel(c.sizes) * itemsize
            if n == 0:
                continue
            if not spec.shape or (all(o == 0 for o in c.offsets[1:])
                                  and c.sizes[1:] == spec.shape[1:]):
                begin = c.offsets[0] * row if spec.shape else 0
                self._chunk_bytes(key, c, out[begin:begin + n])
                continue
            if full is None:
                full = np.frombuffer(out, dtype=np.uint8).reshape(*spec.shape, itemsize)
            part = bytearray(n)
            self._chunk_bytes(key, c, memoryview(part))
            region = tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))
            full[region] = np.frombuffer(part, dtype=np.uint8).reshape(*c.sizes, itemsize)

    def raw_range(self, key: str) -> tuple[int, int] | None:
        """Where KEY's bytes lie, when it was saved as one contiguous chunk."""
        loc = self._single(key)
        if loc is None:
            return None
        return self._fds[self._chunks[key][0].file], loc[0]

    def read_bytes(self, key: str, scratch: bytearray) -> Any:
        import numpy as np

        n = self._nbytes(key)
        if self._cache is not None and self._cache[0] == key:
            return np.frombuffer(self._cache[1], dtype=np.uint8, count=n)
        buf = scratch if len(scratch) >= n else bytearray(n)
        self._fill(key, memoryview(buf)[:n])
        return np.frombuffer(buf, dtype=np.uint8, count=n)

    def read_part(self, key: str, start: int, length: int, scratch: bytearray) -> Any:
        """A part of KEY (a member of a stack): read in place from a single chunk, else cut from
        the tensor assembled once and kept until `release`."""
        import numpy as np

        loc = self._single(key)
        if loc is not None:
            buf = scratch if len(scratch) >= length else bytearray(length)
            read_into(self._fds[self._chunks[key][0].file], loc[0] + start,
                      memoryview(buf)[:length])
            return np.frombuffer(buf, dtype=np.uint8, count=length)
        if self._cache is None or self._cache[0] != key:
            self._cache = None
            whole = bytearray(self._nbytes(key))
            self._fill(key, memoryview(whole))
            self._cache = (key, whole)
        return np.frombuffer(self._cache[1], dtype=np.uint8, count=length, offset=start)

    def release(self, key: str) -> None:
        if self._cache is not None and self._cache[0] == key:
            self._cache = None

    def tensor(self, key: str) -> Any:
        import torch

        from ..dtypes import torch_dtype

        spec = self.specs[key]
        dtype = torch_dtype(spec.dtype)
        n = self._nbytes(key)
        if n == 0:
            return torch.empty(spec.shape, dtype=dtype)
        buf = bytearray(n)
        self._fill(key, memoryview(buf))
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(spec.shape)
