"""Crash-safe output: a temporary file beside DST, fsynced, renamed into place."""

from __future__ import annotations

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
    if e.errno == errno.ENOSPC:
        why = "the disk is full; free space or write elsewhere with -o"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "permission denied; choose a writable folder with -o"
    else:
        why = f"{e.strerror or e}; choose another path with -o"
    return OutputError(f"cannot write '{path}': {why}.")


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
        self._committed = False

    def __enter__(self) -> AtomicFile:
        try:
            self.tmp.unlink(missing_ok=True)
            self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise output_error(self.dst, e) from e
        return self

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
        os.close(self.fd)
        self.fd = -1
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
            os.close(self.fd)
            self.fd = -1
        if not self._committed:
            self.tmp.unlink(missing_ok=True)
