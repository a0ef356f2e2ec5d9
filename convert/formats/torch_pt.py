"""torch.save files (`.pt`, `.pth`, `.bin`): loaded with `weights_only=True` only, never less.

`mmap=True` where the file is a zip archive (torch's format since 1.6), so tensor data stays on
disk until it is touched. Before torch sees a zip archive, its members are checked: stored, not
compressed (no zip bomb), each once, inside the file, and no TorchScript code. Globals outside
the allow-list are refused (exit 3) and named, with the `--allow-global` escape; there is no
fallback to `weights_only=False`. torch's own messages are translated into one sentence.
"""

from __future__ import annotations

import ctypes
import importlib
import mmap
import os
import pickle
import re
import struct
import sys
import tarfile
import threading
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, BinaryIO

from ..dtypes import dtype_from_torch
from ..errors import CorruptInputError, UnsafeInputError, UsageError
from .safetensors import looks_like_safetensors, open_regular, read_into, shorten
from .source import Source, TensorSpec

ZIP_MAGIC = b"PK\x03\x04"
MIN_TORCH = "2.10"  # GHSA-63cw-57p8-fm3p: memory corruption in older weights_only unpicklers
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module")


def looks_like_torch(head: bytes) -> bool:
    """Whether a file's first bytes start like torch.save output (zip, or legacy pickle)."""
    return head.startswith(ZIP_MAGIC) or head[:1] == b"\x80"


def resolve_globals(names: Sequence[str]) -> list[object]:
    """Import each `module.Name` the user allowed (their own option, never read from a file)."""
    out = []
    for spec in names:
        module, _, attr = spec.rpartition(".")
        if not module:
            raise UsageError(f"--allow-global '{spec}' must be written module.Name.")
        try:
            obj = importlib.import_module(module)
            for part in attr.split(":"):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise UsageError(f"--allow-global '{spec}' cannot be imported ({e}); check the "
                             "spelling and that its package is installed.") from e
        out.append(obj)
    return out


def load(path: Path, allow_globals: Sequence[str] = ()) -> object:
    """torch.load PATH with weights_only=True (and mmap=True for zip files); never less.

    A zip archive is checked member by member first (`check_archive`); torch's own messages,
    which advise `weights_only=False` and carry terminal colour codes, are translated into one
    sentence.

    Raises:
        UnsafeInputError: the pickle needs a global outside the allow-list; a TorchScript
            archive; a compressed zip member.
        CorruptInputError: the file is not a readable torch checkpoint.
    """
    import torch

    if torch.__version__ < MIN_TORCH:
        raise UnsafeInputError(f"refusing to unpickle '{path}' with torch {torch.__version__}: "
                               f"its weights_only loader has known memory-corruption bugs "
                               f"before {MIN_TORCH}; upgrade torch (pip install 'torch>="
                               f"{MIN_TORCH}').")
    allowed = resolve_globals(allow_globals)
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(512)
    except OSError as e:
        raise CorruptInputError(f"cannot read '{path}': {e.strerror or e}.") from e
    if size == 0:
        raise CorruptInputError(f"'{path}' is empty (0 bytes), not a torch checkpoint; "
                                "re-download or re-save it.")
    is_zip = head.startswith(ZIP_MAGIC)
    if is_zip:
        check_archive(path, size)
    elif _is_tar(path):
        raise CorruptInputError(f"'{path}' is in the legacy .tar format of torch before 0.4, "
                                "which cannot be loaded without running its pickles; re-save it "
                                "with a current torch.save in a trusted environment.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        refused = refused_globals(path, str(e), is_zip, allowed, allow_globals)
        if refused is not None:
            raise refused from e
        raise CorruptInputError(f"'{path}' is not a readable torch checkpoint: "
                                f"{_what_went_wrong(head, is_zip, e)}.") from e
    # The weights_only unpickler raises many types on malformed input (DESIGN.md's stated
    # exception to "no bare Exception"): each means the file is unreadable, exit 4.
    except (RuntimeError, EOFError, IndexError, KeyError, ValueError, TypeError, OverflowError,
            AttributeError, zipfile.BadZipFile, UnicodeDecodeError, OSError, MemoryError,
            struct.error, RecursionError, NotImplementedError, AssertionError) as e:
        raise CorruptInputError(f"'{path}' is not a readable torch checkpoint: "
                                f"{_what_went_wrong(head, is_zip, e)}.") from e


# --- zip archives (torch.save since 1.6) ------------------------------------------------------

_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")


def check_archive(path: Path, size: int, file: BinaryIO | None = None) -> None:
    """Refuse a zip archive torch.save could not have written, before torch reads it.

    FILE, if given, is the archive (seekable) and PATH only names it in messages (a blob
    inside a larger file, as in a DCP folder's `.distcp`).

    torch.save stores every member uncompressed, once, inside the file. A compressed member
    can expand to far more than the file (a zip bomb) and cannot be mapped; a member that
    claims more bytes than the archive holds, or a name given twice, is damage or a trick.
    A TorchScript archive (`torch.jit.save`) holds code.

    Raises:
        UnsafeInputError: a compressed member, a TorchScript archive.
        CorruptInputError: not a valid zip archive, or implausible sizes.
    """
    try:
        with zipfile.ZipFile(file if file is not None else path) as z:
            infos = z.infolist()
    # zipfile raises these on damaged archives; all mean "not a valid zip", exit 4.
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError,
            struct.error, UnicodeDecodeError, KeyError, IndexError, OverflowError,
            NotImplementedError, MemoryError) as e:
        raise CorruptInputError(f"'{path}' is not a readable torch checkpoint: it starts like "
                                "a zip archive (torch.save's format) but is not a valid one "
                                f"({reason(e)}; truncated?); re-download or re-save it.") from e
    seen: set[str] = set()
    total = 0
    for info in infos:
        name = shorten(info.filename)
        inner = info.filename.split("/", 1)[-1]
        if inner == "constants.pkl" or inner.startswith("code/"):
            raise UnsafeInputError(f"'{path}' is a TorchScript archive (torch.jit.save), which "
                                   "holds code that linconvert never runs; in a trusted "
                                   "environment, torch.save(torch.jit.load(...).state_dict()) "
                                   "and convert that.")
        if info.filename in seen:
            raise CorruptInputError(f"'{path}' is not a readable torch checkpoint: its zip archive "
                                    f"holds member '{name}' twice; re-download or re-save it.")
        seen.add(info.filename)
        if info.compress_type != zipfile.ZIP_STORED:
            raise UnsafeInputError(f"'{path}' holds compressed zip member '{name}' (method "
                                   f"{info.compress_type}); torch.save never compresses and a "
                                   "compressed member can expand without bound (a zip bomb), "
                                   "so linconvert refuses it: re-save the checkpoint with "
                                   "torch.save.")
        if info.flag_bits & 0x1:
            raise CorruptInputError(f"'{path}': zip member '{name}' is encrypted, which torch "
                                    "cannot read; re-save the checkpoint with torch.save.")
        total += info.file_size
        if (info.file_size != info.compress_size
                or info.header_offset + _LOCAL_HEADER.size + info.file_size > size
                or total > size):
            raise CorruptInputError(f"'{path}' is not a readable torch checkpoint: zip member "
                                    f"'{name}' claims {info.file_size} bytes, more than the "
                                    f"{size}-byte archive can hold; re-download or re-save it.")
    _check_local_headers(path, infos, size, file)


def _check_local_headers(path: Path, infos: Sequence[zipfile.ZipInfo], size: int,
                         file: BinaryIO | None) -> None:
    """Each member's local header agrees with the central directory (torch's reader uses both)."""
    try:
        with (nullcontext(file) if file is not None else open(path, "rb")) as f:
            for info in infos:
                name = shorten(info.filename)
                f.seek(info.header_offset)
                raw = f.read(_LOCAL_HEADER.size)
                fields = _LOCAL_HEADER.unpack(raw) if len(raw) == _LOCAL_HEADER.size else None
                if fields is None or fields[0] != ZIP_MAGIC:
                    why = "has no local header where the directory says"
                elif fields[4] != zipfile.ZIP_STORED:
                    raise UnsafeInputError(f"'{path}' holds compressed zip member "
                                           f"'{name}' (its local header says method "
                                           f"{fields[4]}); torch.save never compresses, so "
                                           "linconvert refuses it: re-save the checkpoint with "
                                           "torch.save.")
                elif (info.header_offset + _LOCAL_HEADER.size + fields[10] + fields[11]
                      + info.file_size > size):
                    why = "runs past the end of the file"
                else:
                    continue
                raise CorruptInputError(f"'{path}' is not a readable torch checkpoint: zip member "
                                        f"'{name}' {why}; re-download or re-save it.")
    except OSError as e:
        raise CorruptInputError(f"cannot read '{path}': {e.strerror or e}.") from e


def _is_tar(path: Path) -> bool:
    """Whether PATH is a plain tar archive, as torch's legacy loader would open it."""
    try:
        with tarfile.open(path, mode="r:"):
            return True
    except (tarfile.TarError, OSError, ValueError, EOFError, UnicodeDecodeError):
        return False


# --- translating torch's errors ---------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_NAMED_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")
_GOT_CLASS = re.compile(r"but got <class '([^']+)'>")
_UNRECOGNIZED = re.compile(r"unrecognized function <(?:built-in )?function (\S+?)>")
_UNSAFE_HINTS = ("GLOBAL", "allowlisted", "add_safe_globals", "unrecognized function",
                 "must be imported to load")
_BLOCKED_MODULES = ("sys", "os", "posix", "nt")


def strip_ansi(text: str) -> str:
    """TEXT without terminal colour and cursor codes."""
    return _ANSI.sub("", text)


def reason(e: BaseException) -> str:
    """The gist of a library's error: no colour codes, no advice, one short line."""
    lines = [line.strip() for line in strip_ansi(str(e)).splitlines() if line.strip()]
    skip = ("Weights only load failed", "In PyTorch 2.6", "Please file an issue",
            "Check the documentation", "(1)", "(2)")
    lines = [line for line in lines if not line.startswith(skip)] or lines
    text = lines[0] if lines else ""
    text = text.split("WeightsUnpickler error: ")[-1].split(". This is an internal miniz")[0]
    text = text.strip().rstrip(".")
    if len(text) > 160:
        text = text[:157] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _what_went_wrong(head: bytes, is_zip: bool, e: BaseException) -> str:
    if is_zip:
        return f"torch could not read it ({reason(e)}); re-download or re-save it"
    if looks_like_safetensors(head):
        return "it looks like a safetensors file; give it the .safetensors suffix"
    if head[:1] == b"\x80":
        return (f"its legacy torch.save pickle is damaged ({reason(e)}); re-download or "
                "re-save it")
    return ("it is neither a zip archive (torch.save since 1.6) nor a torch.save pickle; check "
            "that this is the file you meant")


def refused_globals(path: Path, message: str, is_zip: bool, allowed: Sequence[object],
                     allow_globals: Sequence[str]) -> UnsafeInputError | None:
    """The refusal for an unpickling error caused by a global off the allow-list, else None."""
    message = strip_ansi(message)
    if not any(hint in message for hint in _UNSAFE_HINTS):
        return None
    granted = set(allow_globals) | {
        f"{getattr(o, '__module__', '')}.{getattr(o, '__qualname__', '')}" for o in allowed}
    names = [g for g in (_unsafe_globals(path) if is_zip else []) if g not in granted]
    for pattern in (_NAMED_GLOBAL, _GOT_CLASS, _UNRECOGNIZED):
        for g in pattern.findall(message):
            g = g if "." in g else f"builtins.{g}"  # torch shortens builtins.print to print
            if g not in names and g not in granted:
                names.append(g)
    shown = ", ".join(f"'{g}'" for g in names[:12]) or "a global it does not name"
    if len(names) > 12:
        shown += f" and {len(names) - 12} more"
    blocked = [g for g in names if g.split(".", 1)[0] in _BLOCKED_MODULES]
    if blocked:
        calls = ", ".join(f"'{g}'" for g in blocked)
        return UnsafeInputError(f"'{path}' is refused: its pickle calls {calls}, which can run "
                                "commands on this machine and is never allowed, not even with "
                                "--allow-global; do not use this file.")
    if any(g.startswith("torch.nn.modules.") for g in names):
        return UnsafeInputError(f"'{path}' holds a whole pickled model (globals {shown}), which "
                                "only its classes' code can load; in a trusted environment "
                                "re-save it with torch.save(model.state_dict(), ...) and convert "
                                "that.")
    return UnsafeInputError(f"'{path}' needs pickle globals outside the allow-list ({shown}); "
                            "linconvert does not load them unasked: if you trust this file and "
                            "these classes, pass --allow-global for each, e.g. --allow-global "
                            f"{names[0] if names else 'module.Name'}.")


def _unsafe_globals(path: Path) -> list[str]:
    import torch

    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - only used to improve a message; the refusal stands
        return []


def is_tensor_mapping(obj: object) -> bool:
    """A mapping of string keys holding at least one tensor."""
    import torch

    return isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values()) \
        and all(isinstance(k, str) for k in obj)


def find_state_dict(obj: object, path: Path,
                    state_dict_key: str | None) -> tuple[Mapping[str, object], tuple[str, ...]]:
    """The state dict inside a loaded checkpoint and the key path that reaches it.

    A flat mapping of tensors is the state dict itself; a training checkpoint holds it under
    `state_dict`, `model`, `model_state_dict` or `module`, or the dotted `state_dict_key`.
    """
    if state_dict_key:
        node = obj
        for i, part in enumerate(state_dict_key.split(".")):
            if not isinstance(node, Mapping) or part not in node:
                where = ".".join(state_dict_key.split(".")[:i]) or "the top level"
                keys = sorted(map(describe_key, node)) if isinstance(node, Mapping) else []
                raise UsageError(f"'{path}' has no key '{part}' under {where} (keys there: "
                                 f"{', '.join(keys[:12]) or 'none'}); fix "
                                 "--state-dict-key.")
            node = node[part]
        if not is_tensor_mapping(node):
            raise UsageError(f"'{path}': '{state_dict_key}' is not a mapping of tensors; fix "
                             "--state-dict-key.")
        return node, tuple(state_dict_key.split("."))
    if not isinstance(obj, Mapping):
        raise CorruptInputError(f"'{path}' holds a {type(obj).__name__}, not a state dict or a "
                                "training checkpoint.")
    import torch

    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _string_keys(obj, path), ()
    for key in STATE_DICT_KEYS:
        if is_tensor_mapping(obj.get(key)):
            return obj[key], (key,)
    if is_tensor_mapping(obj):
        return obj, ()
    keys = ", ".join(describe_key(k) for k in list(obj)[:12])
    raise CorruptInputError(f"'{path}' has no state dict at its top level or under "
                            f"{', '.join(STATE_DICT_KEYS)} (keys: {keys}); name it with "
                            "--state-dict-key a.b.")


def describe_key(key: object) -> str:
    """A key of a loaded mapping for a message: short, and never the repr of an arbitrary
    object (a storage's repr warns on stderr, a tensor's is long)."""
    if isinstance(key, (str, int, float, bool)) or key is None:
        return shorten(repr(key))
    return f"<a {type(key).__name__}>"


def _string_keys(sd: Mapping[object, object], path: Path) -> Mapping[str, object]:
    """SD itself, if every key is a string (a state dict's keys are parameter names)."""
    bad = next((k for k in sd if not isinstance(k, str)), None)
    if bad is not None:
        raise CorruptInputError(f"'{path}' holds a mapping of tensors whose key "
                                f"{describe_key(bad)} is not a string, so it is not a state "
                                "dict; re-save it with string parameter names.")
    return sd  # type: ignore[return-value]


def replace_at(root: object, key_path: tuple[str, ...], value: object) -> object:
    """A copy of ROOT (copying only the mappings along KEY_PATH) with VALUE at KEY_PATH."""
    if not key_path:
        return value
    assert isinstance(root, Mapping)
    out = dict(root)
    out[key_path[0]] = replace_at(root[key_path[0]], key_path[1:], value)
    return out


# --- reading tensors ------------------------------------------------------------------------

class TorchSource(Source):
    """torch.save files, loaded with weights_only=True and mmap where possible.

    Attributes:
        roots: each file's loaded object (a training checkpoint keeps its extras there).
        key_paths: where the state dict sits inside each root.
        state_dicts: each file's state dict.
    """

    format = "pt"
    keeps_extras = True

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
            root = load(f, allow_globals)
            sd, key_path = find_state_dict(root, f, state_dict_key)
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
        self._madvise = _madvise()
        self._fds: dict[Path, int] = {}
        self._fds_lock = threading.Lock()
        self._located: dict[str, tuple[int, int] | None] = {}
        self._records: dict[Path, dict[int, tuple[int, int]]] = {}

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

    def storage_range(self, storage: Any) -> tuple[int, int, int | None] | None:
        """Where a loaded STORAGE's bytes lie in its file (as `raw_range`), and the CRC-32
        its archive records for them where they are one whole record (torch maps each storage
        from its own): what a writer that keeps the storage whole needs to copy it unread."""
        if storage.nbytes() == 0:
            return None
        loc = self._locate_bytes(storage.data_ptr(), storage.nbytes())
        if loc is None:
            return None
        path = next(p for p, fd in self._fds.items() if fd == loc[0])
        if path not in self._records:
            self._records[path] = _record_crcs(path)
        size, crc = self._records[path].get(loc[1], (-1, 0))
        return loc[0], loc[1], crc if size == storage.nbytes() else None

    def _locate(self, t: Any) -> tuple[int, int] | None:
        if not t.is_contiguous() or t.numel() == 0:
            return None
        return self._locate_bytes(
            t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size(),
            t.numel() * t.element_size())

    def _locate_bytes(self, addr: int, length: int) -> tuple[int, int] | None:
        if not self._maps or sys.byteorder != "little":
            return None
        for path, start, end, offset in self._maps:
            if start <= addr and addr + length <= end:
                with self._fds_lock:  # verification reads from two threads
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
                out += [k if isinstance(k, str) else describe_key(k)
                        for k in root if k != kp[0]]
        return out

    def read_bytes(self, key: str, scratch: bytearray) -> Any:
        import numpy as np
        import torch

        loc = self.raw_range(key)
        t = self._tensors[key].detach()
        if loc is not None:
            n = t.numel() * t.element_size()
            if len(scratch) >= n:
                read_into(loc[0], loc[1], memoryview(scratch)[:n])
                return np.frombuffer(scratch, dtype=np.uint8, count=n)
        if t.numel() == 0:
            return np.empty(0, dtype=np.uint8)
        if not t.is_contiguous():
            t = t.contiguous()
        return t.reshape(-1).view(torch.uint8).numpy()

    def read_part(self, key: str, start: int, length: int, scratch: bytearray) -> Any:
        import numpy as np
        import torch

        loc = self.raw_range(key)
        if loc is not None and len(scratch) >= length:
            read_into(loc[0], loc[1] + start, memoryview(scratch)[:length])
            return np.frombuffer(scratch, dtype=np.uint8, count=length)
        t = self._tensors[key].detach()
        if not t.is_contiguous():
            t = t.contiguous()
        flat = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        return flat[start:start + length].numpy()

    def release(self, key: str) -> None:
        """Drop KEY's pages from memory where they are pages of the mapped file (they are read
        back from it if touched again); memory torch allocated itself (a legacy non-zip file)
        is kept: released, it would read back as zeros (a tied tensor, a verification)."""
        t = self._tensors[key]
        if t.numel():
            addr = t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
            length = t.numel() * t.element_size()
            if any(start <= addr and addr + length <= end for _, start, end, _ in self._maps):
                _dontneed(self._madvise, addr, length)

    def tensor(self, key: str) -> Any:
        return self._tensors[key]


def _record_crcs(path: Path) -> dict[int, tuple[int, int]]:
    """Each member of zip archive PATH (already checked by `check_archive`) by the offset of its
    data: its size and CRC-32."""
    out = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            f.seek(info.header_offset)
            fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
            start = info.header_offset + _LOCAL_HEADER.size + fields[10] + fields[11]
            out[start] = (info.file_size, info.CRC)
    return out


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


def _madvise() -> Any:
    """libc's madvise, or None where there is none to call (not Linux, no MADV_DONTNEED)."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None


def _dontneed(madvise: Any, addr: int, length: int) -> None:
    """madvise(MADV_DONTNEED) the whole pages inside [addr, addr+length); a no-op without it."""
    if madvise is None:
        return
    page = mmap.PAGESIZE
    start = (addr + page - 1) // page * page
    end = (addr + length) // page * page
    if end > start:
        madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start),
                ctypes.c_int(mmap.MADV_DONTNEED))
