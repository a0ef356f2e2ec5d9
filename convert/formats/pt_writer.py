"""torch.save's zip format, written tensor by tensor (no state dict in memory, no torch needed).

A torch.save file is an uncompressed zip archive: `archive/data.pkl` (the object, pickled with
protocol 2, each tensor a `_rebuild_tensor_v2` of a persistent storage id), `.format_version`,
`.storage_alignment`, `byteorder`, then one record `data/K` per storage in the order the pickle
met them, then `version` and `.data/serialization_id`, then the central directory. torch writes
it through miniz, and so this module writes it the same way, byte for byte: every record's data
starts on a 64-byte boundary (padding in an `FB` extra field of its local header, which
`mmap=True` relies on), its CRC-32 and sizes follow it in a data descriptor, ZIP64 fields appear
where a size or an offset reaches 4 GiB, and the ZIP64 end records are always written.

Only the serialization id differs: torch's first half hashes the record names with the C++
standard library's string hash in an unordered set's order; ours hashes them with SHA-256 (its
second half, the CRC-32s combined, is torch's). torch only logs it.

`pickle_checkpoint` pickles an object tree in which tensors still to be written are
`TensorRef`s over `StorageRef`s (real torch tensors, where the tree holds some, are pickled as
torch pickles them); `PtWriter` then takes each storage's bytes in that order. A second thread
does the writing (and the CRC-32s), fed from a few pooled chunks, so that making the next
tensor overlaps writing the last with memory bounded.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import queue
import struct
import sys
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CorruptInputError
from .atomic import AtomicFile, output_error
from .safetensors import USE_COPY_FILE_RANGE, read_into
from .safetensors import _copy_range as copy_range

PREFIX = "archive/"  # torch.save names the folder so when it writes to a file object
ALIGNMENT = 64  # torch.serialization's storage alignment
ZIP64_AT = 0xFFFFFFFF  # sizes and offsets from here on need ZIP64 fields (miniz's rule)
_SENTINEL = 0xFFFFFFFF
_COPY_CHUNK = 8 << 20
_OVERLAP_FROM = 1 << 20  # smaller writes are queued as copies, larger ones in pooled chunks
_BUFFERS = 4  # chunks in flight to the writing thread (32 MiB)

# torch's legacy storage classes (torch.storage._dtype_to_storage_type_map); every other dtype
# is pickled as an UntypedStorage with the dtype beside it (_rebuild_tensor_v3).
_STORAGE_CLASS = {
    "float64": "DoubleStorage", "float32": "FloatStorage", "float16": "HalfStorage",
    "int64": "LongStorage", "int32": "IntStorage", "int16": "ShortStorage", "int8": "CharStorage",
    "uint8": "ByteStorage", "bool": "BoolStorage", "bfloat16": "BFloat16Storage",
    "complex128": "ComplexDoubleStorage", "complex64": "ComplexFloatStorage",
}


@dataclass(eq=False)
class StorageRef:
    """A storage still to be written: its torch dtype name, size, and what makes its bytes
    (the caller's: an entry of the plan, or a function returning a tensor)."""

    dtype: str  # torch's attribute name: float32, bfloat16, float8_e4m3fn, ...
    itemsize: int
    numel: int
    source: Any = None

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(eq=False)
class TensorRef:
    """A tensor for data.pkl: its view of a StorageRef (contiguous unless told otherwise)."""

    storage: StorageRef
    shape: tuple[int, ...]
    stride: tuple[int, ...] = ()
    offset: int = 0
    requires_grad: bool = False

    def __post_init__(self) -> None:
        if not self.stride and self.shape:
            self.stride = contiguous_stride(self.shape)


def contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides torch gives a contiguous tensor of SHAPE (a 0 dim counts as 1)."""
    out = []
    step = 1
    for d in reversed(shape):
        out.append(step)
        step *= max(d, 1)
    return tuple(reversed(out))


def transposed_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The strides torch's `.transpose(-2, -1).contiguous()` leaves on a contiguous tensor
    whose transpose has SHAPE: the swapped strides where torch counts the view as contiguous
    already (a dim of 1 moved, or no elements: `.contiguous()` is then a no-op), else the
    contiguous ones. The bytes are the same either way."""
    before = (*shape[:-2], shape[-1], shape[-2])
    s = contiguous_stride(before)
    view = (*s[:-2], s[-1], s[-2])
    if 0 in shape:
        return view
    expected = 1
    for size, stride in zip(reversed(shape), reversed(view)):
        if size != 1:
            if stride != expected:
                return contiguous_stride(shape)
            expected *= size
    return view


@dataclass
class Record:
    """One `data/K` record: its key, size, and the storage (StorageRef or torch's) it holds."""

    key: str
    nbytes: int
    storage: Any


class _Global:
    """A module-level name, pickled by reference without importing its module."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args: object) -> None:  # pickle insists a reduce function is callable
        raise TypeError(f"{self.module}.{self.name} is a name for pickling only")


class _Pickler(pickle._Pickler):  # type: ignore[name-defined,misc]
    """torch.save's pickler (protocol 2, storages as persistent ids), in pure Python so that
    torch's names can be written without torch; real torch objects pickle as torch's own do."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def __init__(self, file: io.BytesIO, torch: Any):
        super().__init__(file, protocol=2)
        self.records: list[Record] = []
        self._keys: dict[int, str] = {}
        self._names: dict[tuple[str, str], object] = {}
        self._torch = torch

    def name(self, module: str, attr: str) -> object:
        """The object torch's pickle names: torch's own where the tree holds torch objects
        (so that the memo is shared with the tensors torch reduces itself), else a stand-in
        (never a torch that another thread may be importing)."""
        found = self._names.get((module, attr))
        if found is None:
            if self._torch is None:
                found = _Global(module, attr)
            else:
                found = getattr(sys.modules[module], attr)
            self._names[(module, attr)] = found
        return found

    def _key(self, ident: int, nbytes: int, storage: object) -> str:
        key = self._keys.get(ident)
        if key is None:  # as torch: id_map.setdefault(storage._cdata, str(len(id_map)))
            key = self._keys[ident] = str(len(self._keys))
            self.records.append(Record(key, nbytes, storage))
        return key

    def persistent_id(self, obj: object) -> object:
        if type(obj) is StorageRef:
            key = self._key(id(obj), obj.nbytes, obj)
            if obj.dtype in _STORAGE_CLASS:
                return ("storage", self.name("torch", _STORAGE_CLASS[obj.dtype]), key, "cpu",
                        obj.numel)
            return ("storage", self.name("torch.storage", "UntypedStorage"), key, "cpu",
                    obj.nbytes)
        torch = self._torch
        if torch is not None and (isinstance(obj, torch.storage.TypedStorage)
                                  or torch.is_storage(obj)):
            return self._torch_storage(obj)
        return None

    def _torch_storage(self, obj: Any) -> tuple:
        """torch.serialization._save's persistent_id for a storage torch reduced itself."""
        torch = self._torch
        if isinstance(obj, torch.storage.TypedStorage):
            storage = obj._untyped_storage
            kind = getattr(torch, obj._pickle_storage_type())
            numel = obj._size()
        else:
            storage = obj
            kind = torch.serialization.normalize_storage_type(type(obj))
            numel = storage.nbytes()
        if storage.device.type != "cpu":
            raise RuntimeError("linconvert writes CPU storages only")
        key = self._key(storage._cdata, storage.nbytes(), storage)
        return ("storage", kind, key, "cpu", numel)

    def save_tensor_ref(self, ref: TensorRef) -> None:
        s = ref.storage
        args: tuple = (s, ref.offset, tuple(ref.shape), tuple(ref.stride), ref.requires_grad,
                       OrderedDict())
        if s.dtype in _STORAGE_CLASS:
            func = self.name("torch._utils", "_rebuild_tensor_v2")
        else:
            func = self.name("torch._utils", "_rebuild_tensor_v3")
            args = (*args, self.name("torch", s.dtype))
        self.save_reduce(func, args, obj=ref)

    def save_name(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + obj.module.encode("ascii") + b"\n"
                   + obj.name.encode("ascii") + b"\n")
        self.memoize(obj)

    dispatch[TensorRef] = save_tensor_ref
    dispatch[_Global] = save_name


def pickle_checkpoint(obj: object, torch: Any = None) -> tuple[bytes, list[Record]]:
    """data.pkl for OBJ, and its storages in the order their records follow; TORCH, the
    imported module, where OBJ holds torch objects (tensors of a `.pt` source)."""
    buf = io.BytesIO()
    pickler = _Pickler(buf, torch)
    pickler.dump(obj)
    return buf.getvalue(), pickler.records


def storage_for(dtype: str, itemsize: int, shape: tuple[int, ...], source: Any) -> StorageRef:
    """A new storage holding exactly one contiguous tensor of SHAPE."""
    numel = 1
    for d in shape:
        numel *= d
    return StorageRef(dtype, itemsize, numel, source)


# --- the zip archive ----------------------------------------------------------------------------

_LOCAL = struct.Struct("<IHHHHHIIIHH")
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")
_ZIP64_END = struct.Struct("<IQHHIIQQQQ")
_ZIP64_LOCATOR = struct.Struct("<IIQI")
_END = struct.Struct("<IHHHHIIH")
_UTF8 = 0x0800  # names are UTF-8
_DESCRIPTOR = 0x0008  # sizes and CRC follow the data


@dataclass
class _Entry:
    name: bytes
    offset: int
    size: int
    crc: int = 0


class PtWriter(AtomicFile):
    """Streams a torch.save archive into DST through its temporary file (an AtomicFile).

    Use as a context manager: `start` with data.pkl, then `add` small records whole, or
    `begin` / `write` / `copy` / `end` one record's bytes; `finish` writes the closing records
    and the directory and fsyncs; `commit(sync=False)` publishes DST. Leaving the context
    without `commit` leaves nothing behind.
    """

    def __init__(self, dst: Path, *, overwrite: bool):
        super().__init__(dst, overwrite=overwrite)
        self._pos = 0
        self._entries: list[_Entry] = []
        self._current: _Entry | None = None
        self._written = 0
        self._drain: _Drain | None = None
        self._scratch: bytearray | None = None
        self._kernel = [USE_COPY_FILE_RANGE]

    def __enter__(self) -> PtWriter:
        super().__enter__()
        try:  # a signal landing here still finds the temporary file to remove
            self._drain = _Drain(lambda view: AtomicFile.write(self, view))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self._drain is not None:
            self._drain.stop(abort=True)  # before the file is closed under its thread
        super().__exit__(*exc)

    def _out(self, data: bytes) -> None:
        """Queue DATA (immutable) at the archive's end, as it is."""
        assert self._drain is not None
        self._drain.put(data, None, None)
        self._pos += len(data)

    def start(self, data_pkl: bytes) -> None:
        """The records before the storages: the pickle, the format version, the alignment
        and the byte order (little: safetensors' and every supported source's)."""
        self.add("data.pkl", data_pkl)
        self.add(".format_version", b"1")
        self.add(".storage_alignment", str(ALIGNMENT).encode("ascii"))
        self.add("byteorder", b"little")

    def add(self, name: str, data: bytes) -> None:
        """A whole record."""
        self.begin(name, len(data))
        self.write(data)
        self.end()

    def begin(self, name: str, size: int) -> None:
        """Start record NAME of SIZE bytes: its local header, padded so its data is aligned."""
        if self._current is not None:
            raise RuntimeError(f"record {self._current.name!r} of {self.dst} was not ended")
        full = (PREFIX + name).encode("utf-8")
        offset = self._pos
        zip64 = _zip64_fields(size, offset, local=True)
        start = offset + _LOCAL.size + len(full) + len(zip64) + 4
        pad = -start % ALIGNMENT
        flags = _UTF8 | (_DESCRIPTOR if size else 0)
        header = _LOCAL.pack(0x04034B50, 0, flags, 0, 0, 0, 0, 0, 0, len(full),
                             len(zip64) + 4 + pad)
        self._out(header + full + zip64 + b"FB" + struct.pack("<H", pad) + b"Z" * pad)
        self._current = _Entry(full, offset, size)
        self._written = 0

    def write(self, data: Any) -> None:
        """Append DATA (bytes-like, free to reuse on return) to the current record: copied in
        chunks to the writing thread, which CRCs and writes them while the caller goes on."""
        view = memoryview(data).cast("B")
        entry = self._current
        drain = self._drain
        assert entry is not None and drain is not None
        self._written += len(view)
        self._pos += len(view)
        if len(view) < _OVERLAP_FROM:
            drain.put(bytes(view), entry, None)
            return
        for at in range(0, len(view), _COPY_CHUNK):
            part = view[at:at + _COPY_CHUNK]
            buf = drain.buffer()
            buf[:len(part)] = part
            drain.put(memoryview(buf)[:len(part)], entry, buf)

    def copy(self, fd: int, offset: int, length: int) -> None:
        """Append LENGTH bytes of FD at OFFSET to the current record (read, CRC'd, written)."""
        entry = self._current
        drain = self._drain
        assert entry is not None and drain is not None
        self._written += length
        self._pos += length
        while length:
            n = min(length, _COPY_CHUNK)
            buf = drain.buffer()
            read_into(fd, offset, memoryview(buf)[:n])
            drain.put(memoryview(buf)[:n], entry, buf)
            offset += n
            length -= n

    def copy_whole(self, fd: int, offset: int, length: int, crc: int) -> None:
        """The current record is LENGTH bytes of FD at OFFSET whose CRC-32 is known (a whole
        record of a source archive): copied by the kernel, never read."""
        entry = self._current
        drain = self._drain
        assert entry is not None and drain is not None and self._written == 0
        self._written += length
        self._pos += length
        entry.crc = crc
        drain.put(lambda: self._copy_range(fd, offset, length), None, None)

    def _copy_range(self, src: int, offset: int, length: int) -> bytes:
        """(On the writing thread) copy_file_range, or read and write where refused."""
        if self._scratch is None:
            self._scratch = bytearray(_COPY_CHUNK)
        try:
            while length:
                n = copy_range(src, self.fd, offset, length, self._scratch, self._kernel)
                if n == 0:
                    raise CorruptInputError("a checkpoint file shrank while it was being read.")
                offset += n
                length -= n
        except OSError as e:
            raise output_error(self.dst, e) from e
        return b""

    def end(self) -> None:
        """Close the current record: its data descriptor, its directory entry."""
        entry = self._current
        assert entry is not None
        if self._written != entry.size:
            raise RuntimeError(f"wrote {self._written} bytes to record {entry.name!r} of "
                               f"{self.dst}, planned {entry.size}")
        if entry.size:  # the data descriptor, once the thread knows the CRC-32
            wide = entry.size >= ZIP64_AT or entry.offset >= ZIP64_AT
            assert self._drain is not None
            self._drain.put(lambda: struct.pack("<IIQQ" if wide else "<IIII", 0x08074B50,
                                                entry.crc, entry.size, entry.size), None, None)
            self._pos += 24 if wide else 16
        self._entries.append(entry)
        self._current = None

    def finish(self) -> Path:
        """`version`, the serialization id and the directory; fsync. The staged file."""
        self.add("version", b"3\n")
        assert self._drain is not None
        self._drain.wait()  # every CRC-32 known from here on
        crcs = 0
        for e in self._entries:
            if e.size:
                crcs = _hash_combine(crcs, e.crc)
        names = hashlib.sha256(b"\0".join(sorted(e.name for e in self._entries))).digest()
        self.add(".data/serialization_id",
                 f"{int.from_bytes(names[:8], 'little'):020d}{crcs:020d}".encode("ascii"))
        self._drain.wait()
        start = self._pos
        directory = bytearray()
        for e in self._entries:
            extra = _zip64_fields(e.size, e.offset, local=False)
            flags = _UTF8 | (_DESCRIPTOR if e.size else 0)
            size32 = _SENTINEL if e.size >= ZIP64_AT else e.size
            directory += _CENTRAL.pack(0x02014B50, 0, 0, flags, 0, 0, 0, e.crc, size32, size32,
                                       len(e.name), len(extra), 0, 0, 0, 0,
                                       _SENTINEL if e.offset >= ZIP64_AT else e.offset)
            directory += e.name + extra
        n = len(self._entries)
        end64 = start + len(directory)
        directory += _ZIP64_END.pack(0x06064B50, _ZIP64_END.size - 12, 0x031E, 0x002D, 0, 0,
                                     n, n, len(directory), start)
        directory += _ZIP64_LOCATOR.pack(0x07064B50, 0, end64, 1)
        size = end64 - start
        directory += _END.pack(0x06054B50, 0, 0, min(n, 0xFFFF), min(n, 0xFFFF),
                               min(size, _SENTINEL), min(start, _SENTINEL), 0)
        self._out(bytes(directory))
        self._drain.stop(abort=False)
        self.fsync()
        return self.tmp


class _Drain:
    """One thread that writes the archive's bytes in the order given, CRC-32s of record data
    on the way (zlib and the write both release the GIL), so that making the next tensor
    (reading, transposing) overlaps writing the last; at most _BUFFERS chunks are in flight."""

    def __init__(self, out: Callable[[Any], None]):
        self._out = out
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        self._made = 0
        self._error: BaseException | None = None
        self._abort = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name="linconvert-pt-writer")
        self._thread.start()

    def _run(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            data, entry, buf = task
            try:
                if self._error is None and not self._abort:
                    if callable(data):
                        data = data()
                    if entry is not None:
                        entry.crc = zlib.crc32(data, entry.crc)
                    self._out(data)
            except BaseException as e:  # kept for the caller, who raises it
                self._error = e
            finally:
                if buf is not None:
                    self._free.put(buf)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._thread.is_alive():
            raise RuntimeError("the .pt writing thread stopped")

    def buffer(self) -> bytearray:
        """A chunk buffer, waiting for one to come back where _BUFFERS are in flight."""
        self._check()
        if self._made < _BUFFERS:
            self._made += 1
            return bytearray(_COPY_CHUNK)
        while True:
            try:
                return self._free.get(timeout=0.5)
            except queue.Empty:
                self._check()

    def put(self, data: Any, entry: _Entry | None, buf: bytearray | None) -> None:
        """Queue DATA (or a function making it) for writing, after what is queued already."""
        self._check()
        self._tasks.put((data, entry, buf))

    def wait(self) -> None:
        """Until everything queued is written (raising what the thread met)."""
        done = threading.Event()
        self._tasks.put((lambda: (done.set(), b"")[1], None, None))
        while not done.wait(0.5):
            self._check()
        self._check()

    def stop(self, *, abort: bool) -> None:
        """End the thread: after writing what is queued, or (ABORT) dropping it."""
        if not self._thread.is_alive():
            return
        self._abort = abort
        self._tasks.put(None)
        self._thread.join()
        if not abort and self._error is not None:
            raise self._error


def _zip64_fields(size: int, offset: int, *, local: bool) -> bytes:
    """miniz's ZIP64 extra field: sizes where SIZE reaches 4 GiB (a local header's compressed
    size is still 0 then), the offset where OFFSET does; nothing where neither does."""
    values = []
    if size >= ZIP64_AT:
        values += [size, 0 if local else size]
    if offset >= ZIP64_AT:
        values.append(offset)
    if not values:
        return b""
    return struct.pack(f"<HH{len(values)}Q", 0x0001, 8 * len(values), *values)


def _hash_combine(seed: int, value: int) -> int:
    """c10::hash_combine on 64 bits."""
    mask = (1 << 64) - 1
    return (seed ^ ((value + 0x9E3779B9 + (seed << 6) + (seed >> 2)) & mask)) & mask

