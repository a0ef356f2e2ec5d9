"""The Source interface every format's reader offers, and the shared spec of one tensor.

A Source is a lazy view of named tensors: names, shapes and dtypes come from headers without
reading data; the executor then asks for one tensor's bytes at a time (or where they lie in a
file, to copy them untouched) and releases each once written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..dtypes import DTYPES, nbytes_of
from ..provenance import Provenance


@dataclass(frozen=True)
class TensorSpec:
    """What a header says about one tensor."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.dtype, self.shape) if self.dtype in DTYPES else -1


class Source:
    """Named tensors of one source (one file, or a sharded index and its shards).

    Attributes:
        path: the source as the user named it.
        format: "safetensors" or "pt"; `sharded` says whether an index was read.
        specs: key -> TensorSpec, in the source's order.
        provenance: linconvert's record, if the source was written by linconvert.
        files: the files whose bytes make up the source, in index order (hashed into provenance).
        tied: groups of keys that share one tensor (`.pt` only).
        folder: the folder SRC, if the user named a folder.
        keeps_extras: whether a `.pt` output keeps the source's extras (optimizer state, ...).
    """

    format = ""
    keeps_extras = False

    def __init__(self, path: Path):
        self.path = path
        self.specs: dict[str, TensorSpec] = {}
        self.provenance: Provenance | None = None
        self.files: tuple[Path, ...] = ()
        self.tied: tuple[tuple[str, ...], ...] = ()
        self.folder: Path | None = None
        self.sharded = False

    def __enter__(self) -> Source:
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

    def read_part(self, key: str, start: int, length: int, scratch: bytearray) -> Any:
        """LENGTH bytes of KEY from byte START (one member of a stack), as a numpy uint8 array
        (may live in SCRATCH). Sources that can seek read only that part."""
        data = self.read_bytes(key, bytearray(self.specs[key].nbytes))
        return data[start:start + length]

    def release(self, key: str) -> None:
        """Drop KEY's pages from this process's memory once it has been written."""

    def tensor(self, key: str) -> Any:
        """KEY as a torch tensor (imports torch)."""
        raise NotImplementedError


class ArraySource(Source):
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

        from ..dtypes import torch_dtype

        spec = self.specs[key]
        raw = bytearray(self.read_bytes(key, bytearray()).tobytes())
        if not raw:
            return torch.empty(spec.shape, dtype=torch_dtype(spec.dtype))
        return torch.frombuffer(raw, dtype=torch.uint8).view(
            torch_dtype(spec.dtype)).reshape(spec.shape)
