"""Appending a large output file with direct I/O (`O_DIRECT`), past the page cache, where
nothing reads it back at once (`--no-verify`: a verification reads it from the page cache).

A buffered `write()` must first get a page of the page cache for every 4 KiB it writes, and
the final fsync then writes them all out. Where fresh pages are slow to get that dominates: on
the build machine (a VM whose freed memory goes back to its host), writing the 12-layer
benchmark's 600 MB of transposed tensors took 0.2 s when the kernel had pages just freed at
hand and 2.7-4 s when it had not (the old DST of an `--overwrite` still holds its pages until
the new file replaces it), and fsync another 0.3 s. Direct I/O moves the bytes from three reused,
aligned 8 MiB buffers to the disk (768 MB in 0.3-0.5 s there, whichever case, with nothing
left for fsync), and leaves the page cache to what the user was doing. Full buffers are
written in turn on a thread while the next one fills.

Direct I/O wants aligned offsets, lengths and memory: the file is written from offset 0 in
whole buffers; the last one is padded to a 4 KiB multiple and the file truncated to its size.
Where the file system refuses it (tmpfs, some network file systems: EINVAL), the same writes go
on through the page cache. Used for files of `DIRECT_MIN` bytes and more.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

STAGE = 8 << 20  # bytes per buffer
# buffers in turn: two written or waiting while one fills. With two, the writer sat idle for
# 0.33 s of the 12-layer benchmark's 1.1 s stream (whenever a transpose ran late) and the
# stream waited 0.27 s on it; with three, 0.09 s idle (whole runs: 0.90x the wall, median of
# 10 interleaved pairs); larger buffers measured no better
BUFFERS = 3
ALIGN = 4096
DIRECT_MIN = 64 << 20  # smaller files go through the page cache (its cost is small there)


def wanted(size: int) -> bool:
    """Whether a file of SIZE bytes is written with direct I/O."""
    return size >= DIRECT_MIN and hasattr(os, "O_DIRECT")


class DirectAppender:
    """Appends bytes to PATH (already created, empty) through its own O_DIRECT descriptor.

    `write` and `copy_from` append; `flushed` is how many bytes are in the file (a reader may
    read them); `end(size)` writes the rest and truncates the file to SIZE. Raises OSError.
    """

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_DIRECT)
        self.direct = True
        self._stage = STAGE
        self._buffers = [mmap.mmap(-1, STAGE) for _ in range(BUFFERS)]
        self._views = [memoryview(b) for b in self._buffers]
        self._current = 0
        self._fill = 0  # bytes in the current buffer
        self.flushed = 0  # bytes in the file (written and waited for)
        self._submitted = 0  # bytes handed to the writing thread
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="linconvert-direct")
        self._pending: deque[tuple[Future[None], int]] = deque()  # (write, bytes then in file)
        self._ended = False

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = min(len(view), self._stage - self._fill)
            self._views[self._current][self._fill:self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == self._stage:
                self._submit()

    def copy_from(self, src_fd: int, offset: int, length: int) -> None:
        """Append LENGTH bytes of SRC_FD at OFFSET, read straight into the buffers."""
        while length:
            n = min(length, self._stage - self._fill)
            got = os.preadv(src_fd, [self._views[self._current][self._fill:self._fill + n]],
                            offset)
            if got == 0:
                raise EOFError
            self._fill += got
            offset += got
            length -= got
            if self._fill == self._stage:
                self._submit()

    def _wait(self, keep: int = 0) -> None:
        """Wait until no more than KEEP writes are pending."""
        while len(self._pending) > keep:
            pending, end = self._pending.popleft()
            pending.result()  # its OSError, raised here
            self.flushed = end

    def _submit(self, length: int | None = None) -> None:
        length = self._stage if length is None else length
        view, at = self._views[self._current][:length], self._submitted
        self._submitted += length
        self._pending.append((self._pool.submit(self._write_at, view, at), self._submitted))
        self._current = (self._current + 1) % len(self._buffers)
        self._wait(len(self._buffers) - 1)  # the next buffer is free again
        self._fill = 0

    def _write_at(self, view: memoryview, offset: int) -> None:
        while view:
            try:
                n = os.pwrite(self.fd, view, offset)
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                import fcntl

                # this file system takes no direct I/O: go on through the page cache
                fcntl.fcntl(self.fd, fcntl.F_SETFL,
                            fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False
                continue
            view, offset = view[n:], offset + n

    def end(self, size: int) -> None:
        """Write what is buffered, truncate the file to SIZE bytes; close (idempotent)."""
        if self._ended:
            return
        self._ended = True
        try:
            tail = self._fill
            if tail:
                padded = -(-tail // ALIGN) * ALIGN
                self._views[self._current][tail:padded] = bytes(padded - tail)
                self._submit(padded)
            self._wait()
            self.flushed = min(self.flushed, size)
            os.ftruncate(self.fd, size)
        finally:
            self.close()

    def close(self) -> None:
        """Stop (also after an error): nothing more is written; the buffers are freed."""
        self._ended = True
        while self._pending:
            self._pending.popleft()[0].exception()  # let it finish; its error is moot
        self._pool.shutdown(wait=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for v in self._views:
            v.release()
        for b in self._buffers:
            # a failed write's traceback may still hold a slice of it: then it is freed with
            # that, not now
            with contextlib.suppress(BufferError):
                b.close()
        self._views, self._buffers = [], []

