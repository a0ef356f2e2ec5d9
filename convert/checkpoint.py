"""A lazy view over any source: names, shapes, dtypes, extras and provenance.

Opening a checkpoint reads headers only (safetensors) or maps the file without reading tensor
data (`.pt` through `mmap=True`). Tensor bytes are fetched one key at a time by the executor.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .dtypes import DTYPES, dtype_from_torch, nbytes_of
from .errors import CorruptInputError
from .formats import safetensors as st
from .formats import sharded, torch_pt
from .provenance import METADATA_KEY, Provenance, merge_provenance, parse_provenance

PT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
CHECKPOINT_SUFFIXES = (SAFETENSORS_SUFFIX, *PT_SUFFIXES)


@dataclass(frozen=True)
class TensorSpec:
    """What a header says about one tensor."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape) if self.dtype in DTYPES else -1


class Checkpoint:
    """Named tensors of one source (one file, or a sharded index and its shards).

    Attributes:
        path: the source as the user named it.
        format: "safetensors" or "pt"; `sharded` says whether an index was read.
        specs: key -> TensorSpec, in the source's order.
        provenance: linconvert's record, if the source was written by linconvert.
        files: the files whose bytes make up the source, in index order (hashed into provenance).
        tied: groups of keys that share one tensor (`.pt` only).
        folder: the folder SRC, if the user named a folder.
    """

    format = ""

    def __init__(self, path: Path):
        self.path = path
        self.specs: dict[str, TensorSpec] = {}
        self.provenance: Provenance | None = None
        self.files: tuple[Path, ...] = ()
        self.tied: tuple[tuple[str, ...], ...] = ()
        self.folder: Path | None = None
        self.sharded = False

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release open files and maps."""

    def raw_range(self, key: str) -> tuple[int, int] | None:
        """(fd, offset) of KEY's bytes in a file, when they can be copied without decoding."""
        return None

    def read_bytes(self, key: str, scratch: bytearray) -> Any:
        """KEY's bytes, C-contiguous, as a numpy uint8 array (may live in SCRATCH)."""
        raise NotImplementedError

    def release(self, key: str) -> None:
        """Drop KEY's pages from this process's memory once it has been written."""

    def tensor(self, key: str) -> Any:
        """KEY as a torch tensor (imports torch)."""
        raise NotImplementedError


class SafetensorsCheckpoint(Checkpoint):
    """One safetensors file or a sharded set; data read with pread, never mapped."""

    format = "safetensors"

    def __init__(self, path: Path, headers: Sequence[st.SafetensorsHeader]):
        super().__init__(path)
        self._records: dict[str, tuple[int, st.TensorRecord]] = {}
        self._fds: list[int] = []
        try:
            for h in headers:
                self._fds.append(os.open(h.path, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as e:
            self.close()
            raise CorruptInputError(f"cannot open '{h.path}': {e.strerror or e}.") from e
        provs = []
        for i, h in enumerate(headers):
            for name, rec in h.tensors.items():
                self._records[name] = (i, rec)
                self.specs[name] = TensorSpec(rec.shape, rec.dtype)
            if METADATA_KEY in h.metadata:
                provs.append(parse_provenance(h.metadata[METADATA_KEY], h.path))
        if provs:
            if len(provs) != len(headers):
                raise CorruptInputError(f"only some shards of '{path}' carry linconvert "
                                        "provenance; the checkpoint mixes files.")
            self.provenance = merge_provenance(provs, path)
        self.files = tuple(h.path for h in headers)
        self.metadata = dict(headers[0].metadata) if headers else {}

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def record(self, key: str) -> st.TensorRecord:
        return self._records[key][1]

    def raw_range(self, key: str) -> tuple[int, int]:
        i, rec = self._records[key]
        return self._fds[i], rec.begin

    def read_bytes(self, key: str, scratch: bytearray) -> Any:
        import numpy as np

        i, rec = self._records[key]
        view = memoryview(scratch)[: rec.nbytes]
        st.read_into(self._fds[i], rec.begin, view)
        return np.frombuffer(scratch, dtype=np.uint8, count=rec.nbytes)

    def tensor(self, key: str) -> Any:
        import numpy as np
        import torch

        from .dtypes import torch_dtype

        i, rec = self._records[key]
        buf = bytearray(rec.nbytes)
        st.read_into(self._fds[i], rec.begin, memoryview(buf))
        if not buf:
            return torch.empty(rec.shape, dtype=torch_dtype(rec.dtype))
        flat = torch.from_numpy(np.frombuffer(buf, dtype=np.uint8))
        return flat.view(torch_dtype(rec.dtype)).reshape(rec.shape)


class TorchCheckpoint(Checkpoint):
    """torch.save files, loaded with weights_only=True and mmap where possible.

    Attributes:
        roots: each file's loaded object (a training checkpoint keeps its extras there).
        key_paths: where the state dict sits inside each root.
        state_dicts: each file's state dict.
    """

    format = "pt"

    def __init__(self, path: Path, files: Sequence[Path], state_dict_key: str | None,
                 allow_globals: Sequence[str]):
        import torch

        super().__init__(path)
        self.files = tuple(files)
        self.roots: list[object] = []
        self.key_paths: list[tuple[str, ...]] = []
        self.state_dicts: list[Mapping[str, object]] = []
        self._tensors: dict[str, torch.Tensor] = {}
        self.non_tensors: dict[str, object] = {}
        for f in files:
            root = torch_pt.load(f, allow_globals)
            sd, key_path = torch_pt.find_state_dict(root, f, state_dict_key)
            self.roots.append(root)
            self.key_paths.append(key_path)
            self.state_dicts.append(sd)
            for k, v in sd.items():
                if k in self._tensors or k in self.non_tensors:
                    raise CorruptInputError(f"key '{k}' appears in more than one shard of "
                                            f"'{path}'.")
                if isinstance(v, torch.Tensor):
                    if v.layout != torch.strided or v.is_quantized:
                        raise CorruptInputError(f"'{f}': tensor '{k}' is {v.layout} "
                                                f"{'quantized ' if v.is_quantized else ''}"
                                                "storage, which linconvert cannot convert.")
                    self._tensors[k] = v
                    self.specs[k] = TensorSpec(tuple(v.shape), dtype_from_torch(v.dtype))
                else:
                    self.non_tensors[k] = v
        self.tied = _tied_groups(self._tensors)
        self._maps = _file_mappings(self.files)
        self._fds: dict[Path, int] = {}
        self._located: dict[str, tuple[int, int] | None] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def raw_range(self, key: str) -> tuple[int, int] | None:
        """Where KEY's bytes lie in its file, when torch mapped the file (mmap=True) and the
        tensor is C-contiguous: reading them there touches no mapped page."""
        if key not in self._located:
            self._located[key] = self._locate(self._tensors[key])
        return self._located[key]

    def _locate(self, t: Any) -> tuple[int, int] | None:
        if not self._maps or not t.is_contiguous() or t.numel() == 0 or sys.byteorder != "little":
            return None
        addr = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
        for path, start, end, offset in self._maps:
            if start <= addr and addr + t.numel() * t.element_size() <= end:
                fd = self._fds.get(path)
                if fd is None:
                    fd = self._fds[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                return fd, addr - start + offset
        return None

    @property
    def extras(self) -> list[str]:
        """Top-level entries beside the state dict (optimizer state, epoch, ...)."""
        out = []
        for root, kp in zip(self.roots, self.key_paths):
            if kp and isinstance(root, Mapping):
                out += [k if isinstance(k, str) else torch_pt.describe_key(k)
                        for k in root if k != kp[0]]
        return out

    def raw_tensor(self, key: str) -> Any:
        return self._tensors[key]

    def read_bytes(self, key: str, scratch: bytearray) -> Any:
        import numpy as np
        import torch

        loc = self.raw_range(key)
        t = self._tensors[key].detach()
        if loc is not None:
            n = t.numel() * t.element_size()
            if len(scratch) >= n:
                st.read_into(loc[0], loc[1], memoryview(scratch)[:n])
                return np.frombuffer(scratch, dtype=np.uint8, count=n)
        if t.numel() == 0:
            return np.empty(0, dtype=np.uint8)
        if not t.is_contiguous():
            t = t.contiguous()
        return t.reshape(-1).view(torch.uint8).numpy()

    def release(self, key: str) -> None:
        t = self._tensors[key]
        if t.numel():
            _dontneed(t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size(),
                      t.numel() * t.element_size())

    def tensor(self, key: str) -> Any:
        return self._tensors[key]


def _file_mappings(files: Sequence[Path]) -> list[tuple[Path, int, int, int]]:
    """(file, start, end, file offset) of this process's mappings of FILES (Linux)."""
    wanted = {os.path.realpath(f): Path(f) for f in files}
    out = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n") in wanted:
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    out.append((wanted[parts[5].rstrip("\n")], start, end, int(parts[2], 16)))
    except OSError:
        return []
    return out


def _tied_groups(tensors: Mapping[str, Any]) -> tuple[tuple[str, ...], ...]:
    """Keys whose tensors are one and the same view of one storage."""
    groups: dict[tuple, list[str]] = {}
    for k, t in tensors.items():
        if t.numel() == 0:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                 tuple(t.stride()), t.dtype)
        groups.setdefault(ident, []).append(k)
    return tuple(tuple(g) for g in groups.values() if len(g) > 1)


_libc = None


def _dontneed(addr: int, length: int) -> None:
    """madvise(MADV_DONTNEED) the whole pages inside [addr, addr+length); a no-op elsewhere."""
    global _libc
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _libc = False
    if not _libc:
        return
    page = mmap.PAGESIZE
    start = (addr + page - 1) // page * page
    end = (addr + length) // page * page
    if end > start:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                      ctypes.c_int(mmap.MADV_DONTNEED))


def _sniff(path: Path) -> str:
    try:
        with st.open_regular(path) as f:
            head = f.read(16)
    except IsADirectoryError:
        return "folder"
    except OSError as e:
        raise CorruptInputError(f"cannot read '{path}': {e.strerror or e}.") from e
    if st.looks_like_safetensors(head):
        return "safetensors"
    if torch_pt.looks_like_torch(head):
        return "pt"
    return ""


def source_kind(path: Path) -> str:
    """"safetensors", "pt", "index", "folder", "flax" or "keras" for PATH; exit 4 otherwise."""
    if path.is_dir():
        return "folder"
    if path.name.endswith(".index.json"):
        return "index"
    suffix = path.suffix.lower()
    if suffix == ".msgpack":
        return "flax"
    if suffix in (".h5", ".keras"):
        return "keras"
    if suffix == SAFETENSORS_SUFFIX:
        return "safetensors"
    if suffix in PT_SUFFIXES:
        return "pt"
    kind = _sniff(path)
    if not kind:
        raise CorruptInputError(f"'{path}' is not a checkpoint: its suffix is not one of "
                                f"{', '.join(CHECKPOINT_SUFFIXES)}, .index.json and its first "
                                "bytes are neither safetensors nor torch.save.")
    return kind


def find_in_folder(folder: Path) -> Path:
    """The checkpoint a folder holds: an index first, else its one checkpoint file."""
    for name in sharded.INDEX_NAMES:
        if (folder / name).is_file():
            return folder / name
    indexes = sorted(folder.glob("*.index.json"))
    if len(indexes) == 1:
        return indexes[0]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES
                   and not p.name.startswith("."))
    if len(files) == 1:
        return files[0]
    found = ", ".join(p.name for p in (indexes or files)) or "none"
    raise CorruptInputError(f"folder '{folder}' holds no single checkpoint to read (candidates: "
                            f"{found}); name the file or index instead.")


def open_checkpoint(path: Path | str, *, state_dict_key: str | None = None,
                    allow_globals: Sequence[str] = ()) -> Checkpoint:
    """Open any supported source lazily.

    Args:
        path: a `.safetensors`, `.pt/.pth/.bin` file, a `*.index.json`, or a folder with one.
        state_dict_key: dotted path of the state dict inside a `.pt` training checkpoint.
        allow_globals: `module.Name` pickle globals the user trusts.

    Raises:
        CorruptInputError, UnsafeInputError, UsageError.
    """
    path = Path(path)
    folder = None
    target = path
    kind = source_kind(path)
    if kind == "folder":
        folder = path
        target = find_in_folder(path)
        kind = source_kind(target)
    if kind in ("flax", "keras"):
        ckpt = _open_framework(target, kind)
    elif kind == "index":
        ckpt = _open_index(target, state_dict_key, allow_globals)
    elif kind == "safetensors":
        if state_dict_key:
            from .errors import UsageError

            raise UsageError(f"--state-dict-key does not apply to '{target}': safetensors holds "
                             "a flat state dict.")
        ckpt = SafetensorsCheckpoint(path, [st.read_header(target)])
    else:
        ckpt = TorchCheckpoint(path, [target], state_dict_key, allow_globals)
    ckpt.folder = folder
    return ckpt


def _open_index(index_path: Path, state_dict_key: str | None,
                allow_globals: Sequence[str]) -> Checkpoint:
    index = sharded.read_index(index_path)
    kinds = {source_kind(s) for s in index.shards}
    if len(kinds) != 1:
        raise CorruptInputError(f"shard index '{index_path}' mixes shard formats.")
    ckpt: Checkpoint
    if kinds == {"safetensors"}:
        headers = [st.read_header(s) for s in index.shards]
        for h in headers:
            sharded.check_shard_keys(index, h.path, list(h.tensors))
        ckpt = SafetensorsCheckpoint(index_path, headers)
        total = sum(s.nbytes for s in ckpt.specs.values())
        if index.total_size is not None and index.total_size != total:
            ckpt.close()
            raise CorruptInputError(f"shard index '{index_path}' says total_size "
                                    f"{index.total_size} but its shards hold {total} bytes of "
                                    "tensors.")
    else:
        ckpt = TorchCheckpoint(index_path, index.shards, state_dict_key, allow_globals)
        for f, sd in zip(index.shards, ckpt.state_dicts):
            sharded.check_shard_keys(index, f, list(sd))
    ckpt.sharded = True
    return ckpt


class ArrayCheckpoint(Checkpoint):
    """Flax msgpack or Keras weights: arrays fetched on demand by the format's reader."""

    def __init__(self, path: Path, fmt: str, specs: dict[str, TensorSpec],
                 fetch: Any, closer: Any = None, extras: Sequence[str] = (),
                 notes: Sequence[str] = ()):
        super().__init__(path)
        self.format = fmt
        self.specs = specs
        self.files = (path,)
        self._fetch, self._closer = fetch, closer
        self.extras = list(extras)
        self.notes = list(notes)

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None

    def read_bytes(self, key: str, scratch: bytearray) -> Any:
        import numpy as np

        data = self._fetch(key)
        if isinstance(data, np.ndarray):
            return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        return np.frombuffer(data, dtype=np.uint8)

    def tensor(self, key: str) -> Any:
        import torch

        from .dtypes import torch_dtype

        spec = self.specs[key]
        raw = bytearray(self.read_bytes(key, bytearray()).tobytes())
        if not raw:
            return torch.empty(spec.shape, dtype=torch_dtype(spec.dtype))
        return torch.frombuffer(raw, dtype=torch.uint8).view(
            torch_dtype(spec.dtype)).reshape(spec.shape)


def _open_framework(path: Path, kind: str) -> Checkpoint:
    if kind == "flax":
        from .formats.flax_msgpack import read_flax

        arrays, extras = read_flax(path)
        specs = {k: TensorSpec(a.shape, a.dtype) for k, a in arrays.items()}
        return ArrayCheckpoint(path, "flax msgpack", specs, lambda k: arrays[k].data,
                               extras=extras)
    from .formats.keras_h5 import KerasWeights

    weights = KerasWeights(path)
    try:
        specs = {k: TensorSpec(*weights.spec(k)) for k in weights.datasets}
    except CorruptInputError:
        weights.close()
        raise
    return ArrayCheckpoint(path, "keras", specs, weights.read, weights.close,
                           notes=weights.notes)


def open_written(paths: Sequence[Path], fmt: str, display: Path, *,
                 state_dict_key: str | None = None,
                 allow_globals: Sequence[str] = ()) -> Checkpoint:
    """Open files just written (temporary names, so no suffix rules) as one checkpoint."""
    if fmt == "safetensors":
        return SafetensorsCheckpoint(display, [st.read_header(p) for p in paths])
    return TorchCheckpoint(display, list(paths), state_dict_key, allow_globals)
