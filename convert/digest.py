"""The source's SHA-256 (what provenance and batch's journal record), read on a thread.

The command line starts hashing SRC as soon as it has parsed its arguments (`start_early`),
before it imports what plans the conversion: that phase runs on one core, and the hash then
ends before the stream does instead of after it (on the 12-layer benchmark the conversion
waited 0.1 s for it at the end). A conversion takes the early hash only if the file it
hashes (the descriptor it reads) is still the file at that path when the conversion starts
streaming (same device, inode, size, modification and change times); otherwise the early one
is stopped and a new one started. Its own module, importing nothing of the package, so that
starting it costs nothing before the rest is imported.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from pathlib import Path

CHUNK = 8 << 20  # formats.safetensors.COPY_CHUNK, not imported from there (see above)


def sha256_files(files: tuple[Path | int, ...], stop: threading.Event | None = None) -> str:
    """SHA-256 of FILES' bytes (paths, or descriptors read from their start and closed),
    concatenated in order (what provenance records); "" if STOP was set on the way."""
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    for file in files:
        with open(file, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(view[:n])  # hashlib drops the GIL for this
                if stop is not None and stop.is_set():
                    return ""
    return h.hexdigest()


Identity = tuple[int, int, int, int, int]


def _identity(st: os.stat_result) -> Identity:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class SourceHash(threading.Thread):
    """SHA-256 of FILES, in order, read on a thread of its own; `result()` waits for it."""

    def __init__(self, files: tuple[Path | int, ...]):
        super().__init__(daemon=True, name="linconvert-sha256")
        self.files = files
        self.digest = ""
        self.error: OSError | None = None
        self._cancelled = threading.Event()

    def run(self) -> None:
        try:
            self.digest = sha256_files(self.files, self._cancelled)
        except OSError as e:
            self.error = e

    def stop(self) -> None:
        """No longer wanted: end at the next chunk."""
        self._cancelled.set()

    def result(self) -> str:
        """The hex digest.

        Raises:
            CorruptInputError: a file could not be read.
        """
        self.join()
        if self.error is not None:
            from .errors import CorruptInputError

            raise CorruptInputError(f"cannot read the source while hashing it "
                                    f"({self.error.strerror or self.error}).") from self.error
        return self.digest


_early: tuple[Identity, SourceHash] | None = None
_lock = threading.Lock()


def start_early(path: Path) -> None:
    """Start hashing PATH now, if it is a regular file (a folder's shards, a FIFO or a device
    are left to the conversion), for `hash_files` to take."""
    global _early
    try:  # (O_NONBLOCK: opening a FIFO does not wait for a writer)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return
        os.set_blocking(fd, True)
    except OSError:
        os.close(fd)
        return
    hasher = SourceHash((fd,))  # reads, and closes, the very file whose identity is kept
    with _lock:
        if _early is not None:
            _early[1].stop()
        _early = (_identity(st), hasher)
        hasher.start()


def hash_files(files: tuple[Path, ...]) -> SourceHash:
    """A started hash of FILES: the early one where it is of that same file, else a new one."""
    early = _take_early()
    if early is not None:
        identity, hasher = early
        try:
            same = len(files) == 1 and _identity(os.stat(files[0])) == identity
        except OSError:
            same = False
        if same:
            return hasher
        hasher.stop()
    hasher = SourceHash(tuple(files))
    hasher.start()
    return hasher


def stop_early() -> None:
    """Stop an early hash that no conversion took (the command refused, say)."""
    early = _take_early()
    if early is not None:
        early[1].stop()


def _take_early() -> tuple[Identity, SourceHash] | None:
    """The early hash, if any, now no longer anybody else's to take."""
    global _early
    with _lock:
        early, _early = _early, None
    return early
