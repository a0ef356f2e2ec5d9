"""safetensors, read and written as bytes: an 8-byte length, a JSON header, raw data.

Reading validates the header completely before anything is sized from it. Writing is our own
(the official library's `save_file` needs every tensor in memory at once): it streams tensors
in order, copies untouched ones without decoding them, and patches the header at the end
(provenance holds the source's SHA-256, known only once the source has been read).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..dtypes import DTYPES, nbytes_of
from ..errors import CorruptInputError, OutputError
from ..provenance import METADATA_KEY as PROVENANCE_KEY
from ..provenance import merge_provenance, parse_provenance
from . import direct
from .atomic import AtomicFile, output_error
from .source import Source, TensorSpec

MAX_HEADER_BYTES = 100_000_000  # the official reader's cap
MAX_EXTENT = 2**63 - 1  # torch's and the official reader's element counts are 64-bit
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorRecord:
    """One tensor of a safetensors file: dtype, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensors in header order, string metadata, where the data starts."""

    path: Path
    tensors: dict[str, TensorRecord]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def looks_like_safetensors(head: bytes) -> bool:
    """Whether a file's first bytes (at least 9) start like a safetensors file."""
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= MAX_HEADER_BYTES and head[8:9] == b"{"


class DuplicateKeyError(ValueError):
    """A JSON object names one key twice (json.loads would silently keep the last)."""


def unique_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """object_pairs_hook for json.loads that refuses a key given twice."""
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKeyError(k)
        out[k] = v
    return out


def shorten(text: str, limit: int = 80) -> str:
    """TEXT cut to LIMIT characters, so a hostile header cannot flood the message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def open_regular(path: Path) -> BinaryIO:
    """Open PATH for reading only if it is a regular file (a FIFO or device would block or
    never end)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CorruptInputError(f"'{path}' is not a regular file, so it is not a "
                                    "checkpoint; name the file itself.")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _bad(path: Path, why: str) -> CorruptInputError:
    return CorruptInputError(f"'{path}' is not a valid safetensors file: {why}.")


def read_header(path: Path, *, growing: bool = False) -> SafetensorsHeader:
    """Read and validate the header of a safetensors file; reads no tensor data.

    GROWING: the file is still being written (its header is, its data may not all be yet):
    the tensors must tile the data from its start, but the file may end before they do.

    Raises:
        CorruptInputError: truncated file, oversized or malformed header, bad dtype, shape or
            offsets, or offsets that do not tile the data exactly.
    """
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"the file has {size} bytes, fewer than the 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > MAX_HEADER_BYTES:
                raise _bad(path, f"its header claims {n} bytes, more than the {MAX_HEADER_BYTES} "
                                 "allowed")
            if n > size - 8:
                raise _bad(path, f"its header claims {n} bytes but only {size - 8} follow "
                                 "(truncated?)")
            raw = f.read(n)
    except OSError as e:
        raise CorruptInputError(f"cannot read '{path}': {e.strerror or e}.") from e
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=unique_object)
    except DuplicateKeyError as e:
        raise _bad(path, f"its header has a duplicate key '{shorten(e.args[0])}'") from e
    except RecursionError as e:
        raise _bad(path, "its header is JSON nested too deeply to be a header") from e
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(path, f"its header is not valid JSON ({shorten(str(e))})") from e
    if not isinstance(obj, dict):
        raise _bad(path, "its header is not a JSON object")

    data_start = 8 + n
    data_len = size - data_start
    metadata: dict[str, str] = {}
    records: dict[str, TensorRecord] = {}
    for name, entry in obj.items():
        if name == METADATA_KEY:
            if entry is None:
                continue
            if not isinstance(entry, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in entry.items()
            ):
                raise _bad(path, "__metadata__ must map strings to strings")
            metadata = dict(entry)
            continue
        records[name] = _record(path, name, entry, data_start)

    cursor = data_start
    for rec in sorted(records.values(), key=lambda r: (r.begin, r.end)):
        if rec.begin != cursor:
            raise _bad(path, f"tensor '{rec.name}' starts at data offset {rec.begin - data_start}"
                             f" where {cursor - data_start} was expected (gap or overlap)")
        cursor = rec.end
    if cursor != size and not (growing and cursor > size):
        raise _bad(path, f"the tensors cover {cursor - data_start} bytes of data but the file "
                         f"holds {data_len} (truncated or trailing bytes)")
    return SafetensorsHeader(path, records, metadata, data_start, cursor if growing else size)


def _record(path: Path, name: str, entry: object, data_start: int) -> TensorRecord:
    key = shorten(name)
    if not isinstance(entry, dict):
        raise _bad(path, f"the entry for tensor '{key}' is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _bad(path, f"tensor '{key}' has unknown dtype {shorten(repr(dtype))}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise _bad(path, f"tensor '{key}' has an invalid shape {shorten(repr(shape))}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _bad(path, f"tensor '{key}' has invalid data_offsets {shorten(repr(offsets))}")
    extent = 1
    for d in shape:  # stop early: a hostile shape's product could take minutes to compute
        extent *= max(d, 1)
        if extent > MAX_EXTENT:
            break
    span = offsets[1] - offsets[0]
    shown = shorten(repr(shape))
    if extent > MAX_EXTENT:
        if 0 in shape:  # a zero dimension hides the others from the size check
            raise _bad(path, f"tensor '{key}' has shape {shown}, whose dimensions overflow a "
                             "64-bit element count")
        raise _bad(path, f"tensor '{key}' is {dtype} {shown} (more than 2**63 elements) but "
                         f"its data_offsets span {span} bytes")
    want = nbytes_of(dtype, tuple(shape))
    if span != want:
        raise _bad(path, f"tensor '{key}' is {dtype} {shown} ({want} bytes) but its "
                         f"data_offsets span {span} bytes")
    return TensorRecord(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def encode_header(entries: Iterable[tuple[str, str, tuple[int, ...]]],
                  metadata: dict[str, str]) -> tuple[bytes, list[tuple[int, int]]]:
    """The header bytes (length prefix included, padded to 8) and each tensor's data range."""
    obj: dict[str, object] = {}
    if metadata:
        obj[METADATA_KEY] = metadata
    ranges = []
    offset = 0
    for name, dtype, shape in entries:
        n = nbytes_of(dtype, shape)
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        ranges.append((offset, offset + n))
        offset += n
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, ranges


class SafetensorsWriter:
    """Streams tensors, in the order given, into DST through an AtomicFile.

    Use as a context manager: `write()`/`copy_from()` in order, then `finish(metadata)` with
    metadata whose encoded header has the same length as the one given at the start.
    DIRECT_IO: a large file goes to disk past the page cache (`formats.direct`), for outputs
    that nothing reads back at once (a verification would read it from the page cache).
    """

    def __init__(self, dst: Path, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str], *, overwrite: bool, direct_io: bool = False):
        self.dst = dst
        self.direct_io = direct_io
        self.entries = entries
        self.header, ranges = encode_header(entries, metadata)
        self.data_size = ranges[-1][1] if ranges else 0
        self._file = AtomicFile(dst, overwrite=overwrite)
        self._pos = 0
        self._direct: direct.DirectAppender | None = None

    def __enter__(self) -> SafetensorsWriter:
        self._file.__enter__()
        try:
            if self.direct_io and direct.wanted(len(self.header) + self.data_size):
                try:
                    self._direct = direct.DirectAppender(self._file.tmp)
                except OSError:  # no direct I/O here (tmpfs refuses O_DIRECT at open)
                    self._direct = None
            self._write_all(self.header)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._direct is not None:
            self._direct.close()
        self._file.__exit__(*exc)

    @property
    def fd(self) -> int:
        return self._file.fd

    @property
    def position(self) -> int:
        """How many bytes are in the file (a reader may read them)."""
        return self._pos if self._direct is None else self._direct.flushed

    def _write_all(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        try:
            if self._direct is not None:
                self._direct.write(view)
                self._pos += len(view)
                return
            while view:
                n = os.write(self._file.fd, view)
                view = view[n:]
                self._pos += n
        except OSError as e:
            raise output_error(self.dst, e) from e

    def write(self, data: memoryview | bytes) -> None:
        """Append raw tensor bytes."""
        self._write_all(data)

    def copy_from(self, src_fd: int, offset: int, length: int, scratch: bytearray,
                  kernel: list[bool]) -> None:
        """Append LENGTH bytes of SRC_FD from OFFSET without decoding them."""
        try:
            if self._direct is not None:
                try:
                    self._direct.copy_from(src_fd, offset, length)
                except EOFError:
                    raise OutputError(f"cannot write '{self.dst}': the source ended "
                                      "early.") from None
                self._pos += length
                return
            while length:
                n = _copy_range(src_fd, self._file.fd, offset, length, scratch, kernel)
                if n == 0:
                    raise OutputError(f"cannot write '{self.dst}': the source ended early.")
                offset += n
                length -= n
                self._pos += n
        except OSError as e:
            raise output_error(self.dst, e) from e

    @property
    def tmp_path(self) -> Path:
        return self._file.tmp

    def end_data(self) -> None:
        """Every byte appended is in the file (direct I/O's last buffer written)."""
        if self._direct is not None:
            try:
                self._direct.end(self._pos)
            except OSError as e:
                raise output_error(self.dst, e) from e

    def sync(self) -> None:
        """fsync what is written so far (the data; `finish` still fsyncs the header)."""
        self.end_data()
        self._file.fsync()

    def finish(self, metadata: dict[str, str]) -> None:
        """Patch the header with final metadata, check the size and fsync (not yet published)."""
        header, _ = encode_header(self.entries, metadata)
        if len(header) != len(self.header):
            raise RuntimeError("final safetensors header does not fit the reserved space")
        if self._pos != len(self.header) + self.data_size:
            raise RuntimeError(f"wrote {self._pos} bytes to {self.dst}, planned "
                               f"{len(self.header) + self.data_size}")
        self.end_data()
        try:
            os.pwrite(self._file.fd, header, 0)
        except OSError as e:
            raise output_error(self.dst, e) from e
        self._file.fsync()

    def commit(self) -> None:
        """Publish DST (after `finish`)."""
        self._file.commit(sync=False)


def _copy_range(src_fd: int, dst_fd: int, offset: int, length: int, scratch: bytearray,
                kernel: list[bool]) -> int:
    """Copy up to LENGTH bytes at OFFSET to DST_FD's position; returns how many were copied.

    KERNEL holds one flag: whether `copy_file_range` is worth trying (cleared where the file
    systems refuse it, so the fallback is taken at once from then on).
    """
    if kernel[0]:
        try:
            return os.copy_file_range(src_fd, dst_fd, min(length, 1 << 30), offset)
        except OSError as e:
            import errno

            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP,
                               errno.EPERM):
                raise
            kernel[0] = False
    view = memoryview(scratch)[: min(length, len(scratch))]
    n = os.preadv(src_fd, [view], offset)
    out = view[:n]
    while out:
        w = os.write(dst_fd, out)
        out = out[w:]
    return n


COPY_CHUNK = 8 << 20
USE_COPY_FILE_RANGE = hasattr(os, "copy_file_range")  # each sink learns for itself if it fails


class SafetensorsSink:
    """Writes the tensor files of an output plan (one file, or shards and their index).

    Every file is written under a temporary name in plan order; `write` and `copy` take the
    next destination key's bytes (raw copies of adjacent source ranges are merged into one
    `copy_file_range`); `finish` patches each header with its final metadata and fsyncs;
    `commit` publishes the shards, then the index, then removes an overwritten set's extra
    shards. Leaving the context without `commit` leaves nothing behind.
    """

    def __init__(self, files: Sequence[tuple[Path, list[tuple[str, str, tuple[int, ...]]]]],
                 index: Path | None, metadata_for: Callable[[list[str]], dict[str, str]], *,
                 overwrite: bool, direct_io: bool = False):
        self.index = index
        self.overwrite = overwrite
        self.writers = [SafetensorsWriter(path, entries, metadata_for([e[0] for e in entries]),
                                          overwrite=overwrite, direct_io=direct_io)
                        for path, entries in files]
        self._file_of = {e[0]: i for i, (_, entries) in enumerate(files) for e in entries}
        self._current = 0
        self._run: list[int] = []  # [fd, offset, length] of a pending raw copy
        self._scratch = bytearray(COPY_CHUNK)
        self._kernel = [USE_COPY_FILE_RANGE]
        self._entered: list[SafetensorsWriter] = []
        # told (file index, bytes now in that file) after each write reaches the file: a
        # verifier reading the temporary files while they grow waits on it
        self.on_written: Callable[[int, int], None] | None = None

    def __enter__(self) -> SafetensorsSink:
        if self.index is not None:
            from .sharded import remove_stale_partials

            remove_stale_partials(self.index)
        try:
            for w in self.writers:
                self._entered.append(w)  # before entering: an interrupt inside still cleans up
                w.__enter__()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for w in self._entered:
            w.__exit__(*exc)

    def _switch(self, key: str) -> SafetensorsWriter:
        i = self._file_of[key]
        if i != self._current:
            self._flush()
            self._end(self._current)  # plan order: nothing more goes to that file
            self._current = i
        return self.writers[i]

    def _end(self, i: int) -> None:
        w = self.writers[i]
        w.end_data()
        if self.on_written is not None:
            self.on_written(i, w.position)

    def _flush(self) -> None:
        if self._run:
            fd, offset, length = self._run
            w = self.writers[self._current]
            w.copy_from(fd, offset, length, self._scratch, self._kernel)
            self._run = []
            if self.on_written is not None:
                self.on_written(self._current, w.position)

    def write(self, key: str, data: memoryview | bytes) -> None:
        """KEY's bytes, in plan order."""
        w = self._switch(key)
        self._flush()
        w.write(data)
        if self.on_written is not None:
            self.on_written(self._current, w.position)

    def copy(self, key: str, fd: int, offset: int, length: int) -> None:
        """KEY's bytes are LENGTH bytes of FD at OFFSET: copied without decoding."""
        self._switch(key)
        run = self._run
        if run and run[0] == fd and run[1] + run[2] == offset:
            run[2] += length
        else:
            self._flush()
            self._run = [fd, offset, length]

    @property
    def tmp_paths(self) -> list[Path]:
        """The files being written, under their temporary names, in output order."""
        return [w.tmp_path for w in self.writers]

    def sync_data(self) -> None:
        """Write every file's tensor bytes to disk now, while the source's hash completes
        (the final fsync then has one header page to write; 0.27 s of the 12-layer
        benchmark's wall overlapped with the hash's last 0.14 s)."""
        self._flush()
        for i, w in enumerate(self.writers):
            self._end(i)
            w.sync()

    def finish(self, metadata_for: Callable[[list[str]], dict[str, str]]) -> list[Path]:
        """Patch every header with its final metadata, check it, fsync; the staged files."""
        self._flush()
        for w in self.writers:
            w.finish(metadata_for([e[0] for e in w.entries]))
            _check_written(w)
        return [w.tmp_path for w in self.writers]

    def commit(self, total_size: int) -> None:
        """Publish the shards, then the index (a crash between leaves the old index)."""
        for w in self.writers:
            w.commit()
        if self.index is not None:
            from .sharded import shards_named_by, write_index

            stale = shards_named_by(self.index) - {w.dst.name for w in self.writers}
            weight_map = {e[0]: w.dst.name for w in self.writers for e in w.entries}
            write_index(self.index, weight_map, total_size, overwrite=self.overwrite)
            for name in stale:  # an overwritten set that had more shards: drop the leftovers
                (self.index.parent / name).unlink(missing_ok=True)


def _check_written(w: SafetensorsWriter) -> None:
    """Read the written header back: every planned key, shape and dtype, and nothing else."""
    header = read_header(w.tmp_path)
    want = {name: (dtype, tuple(shape)) for name, dtype, shape in w.entries}
    have = {name: (r.dtype, r.shape) for name, r in header.tensors.items()}
    if want != have:
        raise RuntimeError(f"the header written to {w.dst} does not match its plan "
                           f"({len(have)} keys written, {len(want)} planned)")


def read_into(fd: int, offset: int, out: memoryview) -> None:
    """Fill OUT with bytes of FD from OFFSET (the file was validated to hold them)."""
    while out:
        n = os.preadv(fd, [out], offset)
        if n == 0:
            raise CorruptInputError("a checkpoint file shrank while it was being read.")
        out = out[n:]
        offset += n


def read_range(fd: int, offset: int, length: int) -> bytes:
    """LENGTH bytes of FD at OFFSET."""
    buf = bytearray(length)
    read_into(fd, offset, memoryview(buf))
    return bytes(buf)


# --- reading tensors ------------------------------------------------------------------------

class SafetensorsSource(Source):
    """One safetensors file or a sharded set; data read with pread, never mapped."""

    format = "safetensors"

    def __init__(self, path: Path, headers: Sequence[SafetensorsHeader]):
        super().__init__(path)
        self._records: dict[str, tuple[int, TensorRecord]] = {}
        self._fds: list[int] = []
        try:
            for h in headers:
                self._fds.append(os.open(h.path, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as e:
            self.close()
            raise CorruptInputError(f"cannot open '{h.path}': {e.strerror or e}.") from e
        try:
            self._read_provenance(path, headers)
        except CorruptInputError:
            self.close()
            raise
        self.files = tuple(h.path for h in headers)
        self.metadata = dict(headers[0].metadata) if headers else {}

    def _read_provenance(self, path: Path, headers: Sequence[SafetensorsHeader]) -> None:
        provs = []
        for i, h in enumerate(headers):
            for name, rec in h.tensors.items():
                self._records[name] = (i, rec)
                self.specs[name] = TensorSpec(rec.shape, rec.dtype)
            if PROVENANCE_KEY in h.metadata:
                provs.append(parse_provenance(h.metadata[PROVENANCE_KEY], h.path))
        if provs:
            if len(provs) != len(headers):
                raise CorruptInputError(f"only some shards of '{path}' carry linconvert "
                                        "provenance; the checkpoint mixes files.")
            self.provenance = merge_provenance(provs, path)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
    def raw_range(self, key: str) -> tuple[int, int]:
        i, rec = self._records[key]
        return self._fds[i], rec.begin

    def read_bytes(self, key: str, scratch: bytearray) -> Any:
        import numpy as np

        i, rec = self._records[key]
        view = memoryview(scratch)[: rec.nbytes]
        read_into(self._fds[i], rec.begin, view)
        return np.frombuffer(scratch, dtype=np.uint8, count=rec.nbytes)

    def read_part(self, key: str, start: int, length: int, scratch: bytearray) -> Any:
        import numpy as np

        i, rec = self._records[key]
        read_into(self._fds[i], rec.begin + start, memoryview(scratch)[:length])
        return np.frombuffer(scratch, dtype=np.uint8, count=length)

    def tensor(self, key: str) -> Any:
        import numpy as np
        import torch

        from ..dtypes import torch_dtype

        i, rec = self._records[key]
        if not rec.nbytes:
            return torch.empty(rec.shape, dtype=torch_dtype(rec.dtype))
        buf = np.empty(rec.nbytes, dtype=np.uint8)  # not zero-filled: read over at once
        read_into(self._fds[i], rec.begin, memoryview(buf))
        return torch.from_numpy(buf).view(torch_dtype(rec.dtype)).reshape(rec.shape)
