"""Crash-safe output: a temporary file beside DST, fsynced, renamed into place."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from ..errors import OutputError


def partial_path(dst: Path) -> Path:
    """The temporary name for DST; derived from DST so the next run removes a killed run's."""
    return dst.parent / f".{dst.name}.partial"


def fsync_dir(folder: Path) -> None:
    """Make a rename in FOLDER durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def output_error(path: Path, e: OSError) -> OutputError:
    """One sentence for an OSError met while writing PATH."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        why = "the disk is full; free space or write elsewhere with -o"
    elif e.errno == errno.EFBIG:
        why = ("the file would exceed the largest file this process may write (ulimit -f); "
               "raise the limit or write elsewhere with -o")
    elif e.errno == errno.EROFS:
        why = "the file system is read-only; choose a writable folder with -o"
    elif e.errno in (errno.EACCES, errno.EPERM):
        why = "permission denied; choose a writable folder with -o"
    else:
        why = f"{e.strerror or e}; choose another path with -o"
    return OutputError(f"cannot write '{path}': {why}.")


def new_file_mode() -> int:
    """The mode an ordinary new file gets here: 0o666 less the umask (read without changing
    it where Linux tells it, since os.umask sets it process-wide)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


class AtomicFile:
    """A file written under a temporary name and renamed to DST only by `commit()`.

    DST gets the permissions an ordinary new file gets under the umask (opened 0o666, unlike
    mkstemp's 0o600). Without `overwrite`, the final step is a hard link, so a DST that
    appeared meanwhile is never replaced.
    """

    def __init__(self, dst: Path, *, overwrite: bool):
        self.dst = dst
        self.tmp = partial_path(dst)
        self.overwrite = overwrite
        self.fd = -1
        self._created = False
        self._committed = False

    def __enter__(self) -> AtomicFile:
        try:
            self.tmp.unlink(missing_ok=True)
            # Ours to remove from here on: Python handles a signal as soon as os.open returns,
            # before its result is stored, and a `with` whose __enter__ raises never calls
            # __exit__; so an interrupted __enter__ cleans up itself.
            self._created = True
            self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except OSError as e:
            self.__exit__()
            raise output_error(self.dst, e) from e
        except BaseException:
            self.__exit__()
            raise
        return self

    def write(self, data: bytes | memoryview) -> None:
        """Write all of DATA at the file's position."""
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as e:
            raise output_error(self.dst, e) from e

    def fsync(self) -> None:
        """Flush the data to disk (before the rename that publishes it)."""
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise output_error(self.dst, e) from e

    def commit(self, *, sync: bool = True) -> None:
        """fsync, then publish the file as DST and fsync the folder."""
        if sync:
            self.fsync()
        fd, self.fd = self.fd, -1
        try:
            os.close(fd)
        except OSError as e:  # NFS and quotas may report a failed write only here
            raise output_error(self.dst, e) from e
        try:
            if self.overwrite:
                os.replace(self.tmp, self.dst)
            else:
                os.link(self.tmp, self.dst)
                self.tmp.unlink()
        except FileExistsError as e:
            raise OutputError(
                f"'{self.dst}' appeared while it was being written; pass --overwrite to replace it."
            ) from e
        except OSError as e:
            raise output_error(self.dst, e) from e
        self._committed = True
        fsync_dir(self.dst.parent)

    def __exit__(self, *exc: object) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        if self._created and not self._committed:
            # Best effort: an error here must not hide the one that brought us here.
            with contextlib.suppress(OSError):
                self.tmp.unlink(missing_ok=True)
