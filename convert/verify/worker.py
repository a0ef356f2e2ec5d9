"""Verify-after-convert in a second process, overlapped with the conversion.

The command line's conversions verify here: a child Python is started before planning and
imports torch (1.4 s on the reference machine) on the other core while this process, which
needs no torch to stream safetensors, plans and writes. A thread in this process could not do
that import without slowing the streaming loop: the import holds the GIL for most of its time
(measured: the 12-layer benchmark's stream went from 1.2 s to 3.4 s).

The command line starts the child as it starts (`convert.cli`), before it imports what plans
the conversion. For safetensors output the child is told the temporary files' names as soon as
their headers are written, and how far each file is written after every write; it checks each
pair as soon as the bytes it reads are in the file (read back from the file, through the file
system, not from this process's buffers), so checks overlap the stream. Those byte checks run
in a process the child forks before it imports torch (`_Prover`): in one process the import
and the checks took turns at one GIL. After the files are finished and
fsynced it reads every final header again and fails the verification if a tensor's dtype,
shape or offsets differ from what it checked. For `.pt` output (a zip whose directory comes
last) it verifies once the file is finished. Its report comes back here; a failure is exit 1
as before and DST is not published.

Protocol: length-prefixed pickles on the child's stdin and stdout, parent to child `("job",
dict)`, `("written", file, size)`, `("done",)`; child to parent `("report", VerifyReport)`,
`("error", class name, message)` or `("crash", traceback)`. What comes back is unpickled with
an allow-list of the report's own classes. If the child cannot be started or dies, the caller
verifies in its own process (`WorkerGone`).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import ConvertError, CorruptInputError, OutputError, UnsafeInputError, UsageError

_LENGTH = 8
_ERRORS = {c.__name__: c for c in (ConvertError, UsageError, UnsafeInputError,
                                   CorruptInputError, OutputError)}


class WorkerGone(Exception):  # noqa: N818 - a condition, not a user-facing error
    """The verifying process could not be started, or ended without a report."""


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(_LENGTH, "little") + data


def _send(stream: BinaryIO, message: tuple[Any, ...]) -> None:
    stream.write(_frame(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)))
    stream.flush()


def _receive(stream: BinaryIO) -> bytes | None:
    """One frame's bytes, or None at the end of the stream."""
    head = stream.read(_LENGTH)
    if len(head) < _LENGTH:
        return None
    n = int.from_bytes(head, "little")
    data = stream.read(n)
    return data if len(data) == n else None


class _ReportUnpickler(pickle.Unpickler):
    """Only what a VerifyReport is made of: its own dataclasses, named exactly (no dotted
    names, which protocol 4 would follow to any attribute)."""

    ALLOWED = {("convert.verify.report", name)
               for name in ("VerifyReport", "CheckResult", "Figures", "Distance")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the verifying process sent {module}.{name}")


# --- this process's side --------------------------------------------------------------------

class VerifyProcess:
    """The child verifier, seen from the converting process (a `Watcher` for apply_plan).

    `VerifyProcess()` starts it (it imports torch at once); `job` is set to what
    `verify_checkpoints` needs once the plan is known; `begin` and `written` follow a
    safetensors output as it is written; `result` waits for the report. `close` always.
    """

    # The folder linconvert runs in (a downloaded model's, say) is not put on sys.path, so no
    # numpy.py or torch/ there is imported in our place: `python -c` puts it there as '' and
    # the first line takes it off (what -P does, on Pythons before 3.11 too)
    COMMAND = (sys.executable, "-c", "import sys\n"
               "if sys.path and sys.path[0] == '':\n"
               "    del sys.path[0]\n"
               "from convert.verify.worker import main\n"
               "main()\n")

    def __init__(self) -> None:
        import convert

        root = str(Path(convert.__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
        self.job: dict[str, Any] = {}
        self._sent_job = False
        self._gone: str | None = None
        try:
            self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                list(self.COMMAND), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, env=env, close_fds=True)
        except OSError as e:
            self.proc, self._gone = None, f"it could not be started ({e.strerror or e})"

    def _post(self, message: tuple[Any, ...]) -> None:
        if self._gone is not None or self.proc is None or self.proc.stdin is None:
            return
        try:
            _send(self.proc.stdin, message)
        except (OSError, ValueError):
            self._gone = self._ended()

    def _ended(self) -> str:
        code = None if self.proc is None else self.proc.poll()
        return ("it ended early" if code is None else f"it ended early (exit status {code})")

    def begin(self, paths: list[Path]) -> None:
        self._post(("job", {**self.job, "paths": [str(p) for p in paths], "growing": True}))
        self._sent_job = True

    def written(self, file: int, size: int) -> None:
        self._post(("written", file, size))

    def result(self, paths: list[Path]) -> Any:
        """The VerifyReport of the finished, fsynced files PATHS.

        Raises:
            WorkerGone: no report came (verify in this process instead).
            ConvertError: the child's own refusal (a source it cannot read, say), as raised.
        """
        if not self._sent_job:
            self._post(("job", {**self.job, "paths": [str(p) for p in paths],
                                "growing": False}))
            self._sent_job = True
        self._post(("done",))
        if self._gone is not None or self.proc is None or self.proc.stdout is None:
            raise WorkerGone(self._gone or "it was not started")
        data = _receive(self.proc.stdout)
        if data is None:
            self.proc.wait()
            raise WorkerGone(self._ended())
        try:
            reply = _ReportUnpickler(io.BytesIO(data)).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as e:
            raise WorkerGone(f"its reply could not be read ({e})") from e
        kind = reply[0]
        if kind == "report":
            return reply[1]
        if kind == "error":
            raise _ERRORS.get(reply[1], ConvertError)(reply[2])
        raise WorkerGone(f"it failed: {reply[1]}")

    def close(self, *, kill: bool = False) -> None:
        """End the child: it ends itself once its pipe closes; KILL (the conversion failed,
        the child may still be importing torch) does not wait for that."""
        proc = self.proc
        if proc is None:
            return
        if kill and proc.poll() is None:
            proc.kill()
        for stream in (proc.stdin, proc.stdout):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the child's side -----------------------------------------------------------------------

class _ParentGone(Exception):  # noqa: N818
    """The converting process closed the pipe: nothing to report to."""


class _Progress:
    """What the parent has said: the job, each file's written size, whether it is done."""

    def __init__(self, prover: _Prover | None = None,
                 report: Callable[[tuple[Any, ...]], None] | None = None) -> None:
        """PROVER: the process that makes the byte checks (none are made here then): it hears
        each frame from the parent, and that they have ended; REPORT: hears the results of the
        byte checks made here (for the process that waits on them)."""
        self.cond = threading.Condition()
        self.job: dict[str, Any] | None = None
        self.sizes: dict[int, int] = {}
        self.done = False
        self.closed = False
        self.proofs = None if prover is None else _Proofs.made_elsewhere(prover.results)
        self._prover = prover
        self._report = report

    def listen(self, stream: BinaryIO) -> None:
        try:
            self._listen(stream)
        except Exception:  # noqa: BLE001, S110 - a frame we cannot read: the parent is broken
            pass
        finally:  # whatever ended it, nobody waits for more from the parent
            with self.cond:
                self.closed = True
                self.cond.notify_all()
            if self._prover is not None:
                self._prover.close()

    def _listen(self, stream: BinaryIO) -> None:
        while (data := _receive(stream)) is not None:
            if self._prover is not None:
                self._prover.send(data)
            message = pickle.loads(data)  # from the parent that started us
            with self.cond:
                if message[0] == "job":
                    self.job = message[1]
                    if self.job["growing"] and self._prover is None:  # the checks start now
                        self.proofs = _Proofs(self.job, self, self._report)
                        self.proofs.start()
                elif message[0] == "written":
                    self.sizes[message[1]] = message[2]
                elif message[0] == "done":
                    self.done = True
                self.cond.notify_all()

    def wait_job(self) -> dict[str, Any]:
        with self.cond:
            while self.job is None and not self.closed:
                self.cond.wait()
            if self.job is None:
                raise _ParentGone
            return self.job

    def wait_size(self, file: int, size: int) -> None:
        with self.cond:
            while self.sizes.get(file, 0) < size and not self.done and not self.closed:
                self.cond.wait()
            if not self.done and self.sizes.get(file, 0) < size:
                raise _ParentGone

    def wait_done(self) -> None:
        with self.cond:
            while not self.done and not self.closed:
                self.cond.wait()
            if not self.done:
                raise _ParentGone


def _growing_source(display: Path, paths: list[Path], progress: _Progress) -> Any:
    """The temporary safetensors files while they are written: every read of a tensor waits
    until the parent has written all of its bytes."""
    from ..formats import safetensors as st

    class Growing(st.SafetensorsSource):
        def _wait(self, key: str) -> None:
            i, rec = self._records[key]
            progress.wait_size(i, rec.end)

        def raw_range(self, key: str) -> tuple[int, int]:
            self._wait(key)
            return super().raw_range(key)

        def read_bytes(self, key: str, scratch: bytearray) -> Any:
            self._wait(key)
            return super().read_bytes(key, scratch)

        def read_part(self, key: str, start: int, length: int, scratch: bytearray) -> Any:
            self._wait(key)
            return super().read_part(key, start, length, scratch)

        def tensor(self, key: str) -> Any:
            self._wait(key)
            return super().tensor(key)

    headers = []
    for i, p in enumerate(paths):
        # the parent says when each file's header is in it (before the data)
        progress.wait_size(i, 8)
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
        progress.wait_size(i, 8 + min(n, st.MAX_HEADER_BYTES))
        headers.append(st.read_header(p, growing=True))
    return Growing(display, headers)


class _Proofs(threading.Thread):
    """The byte checks of whole-tensor pairs (a bit-exact transpose, or equal bytes), made with
    numpy as each pair's bytes are written, while the main thread still imports torch; the
    layer checks then take their results (`verify_checkpoints(proven=...)`) and run only the
    forward passes. Anything it cannot do is left to them: its errors are not reported."""

    def __init__(self, job: dict[str, Any] | None, progress: _Progress | None,
                 report: Callable[[tuple[Any, ...]], None] | None = None):
        super().__init__(daemon=True, name="linconvert-proofs")
        self.job, self.progress = job, progress
        self.results: dict[tuple[str, str], bool] = {}
        self._cond = threading.Condition()
        self._wanted: set[tuple[str, str]] | None = None  # None: not known yet
        self._over = False
        self._report = report or (lambda message: None)

    @classmethod
    def made_elsewhere(cls, stream: BinaryIO) -> _Proofs:
        """The results another process's byte checks send on STREAM, as they come (what
        REPORT was told there); when the stream ends, nothing more will be made."""
        mirror = cls(None, None)

        def follow() -> None:
            try:
                while (data := _receive(stream)) is not None:
                    message = _PlainUnpickler(io.BytesIO(data)).load()
                    if message[0] == "wanted":
                        mirror._want(set(message[1]))
                    elif message[0] == "made":
                        mirror._made(message[1], message[2])
                    elif message[0] == "over":
                        break
            except Exception:  # noqa: BLE001, S110 - a broken process: the layer checks decide
                pass
            finally:
                mirror._end()

        threading.Thread(target=follow, daemon=True, name="linconvert-proofs-in").start()
        return mirror

    def run(self) -> None:
        try:
            with contextlib.suppress(Exception):  # the layer checks make what is left
                self._prove()
        finally:
            self._end()

    def get(self, key: tuple[str, str]) -> bool | None:
        """The result for KEY once it is made (None: it will not be), so that the forward
        passes start while later pairs are still being proven."""
        with self._cond:
            while not self._over and (self._wanted is None or (key in self._wanted
                                                               and key not in self.results)):
                self._cond.wait()
            return self.results.get(key)

    def _want(self, keys: set[tuple[str, str]]) -> None:
        with self._cond:
            self._wanted = keys
            self._cond.notify_all()
        self._report(("wanted", sorted(keys)))

    def _made(self, key: tuple[str, str], ok: bool) -> None:
        with self._cond:
            self.results[key] = ok
            self._cond.notify_all()
        self._report(("made", key, ok))

    def _end(self) -> None:
        with self._cond:
            self._over = True
            self._cond.notify_all()
        self._report(("over",))

    def _prove(self) -> None:
        from ..checkpoint import open_checkpoint, source_kind
        from ..dtypes import DTYPES
        from ..formats.safetensors import COPY_CHUNK
        from .layers import transposed_bytes_equal

        job = self.job
        assert job is not None and self.progress is not None
        if source_kind(Path(job["src"])) != "safetensors":
            # a .pt or DCP source's bytes would come through the same file ranges the writer
            # read; the layer checks compare torch's own tensors instead
            return
        with open_checkpoint(job["src"], state_dict_key=job["state_dict_key"],
                             allow_globals=job["allow_globals"]) as src, \
                _growing_source(Path(job["display"]), [Path(p) for p in job["paths"]],
                                self.progress) as dst:
            wanted = []
            for p in job["pairs"]:
                s, d = src.specs.get(p.source), dst.specs.get(p.target)
                if (s is None or d is None or p.parts or p.source_index is not None
                        or p.target_index is not None or s.dtype != d.dtype
                        or DTYPES.get(s.dtype) is None
                        or DTYPES[s.dtype].itemsize not in (1, 2, 4, 8)):
                    continue
                if (p.transposed and len(s.shape) == 2 and d.shape == s.shape[::-1]) or (
                        not p.transposed and d.shape == s.shape):
                    wanted.append((p, s))
            self._want({(p.source, p.target) for p, _ in wanted})
            largest = max((s.nbytes for p, s in wanted if p.transposed), default=0)
            buf_a, buf_b = bytearray(largest), bytearray(largest)
            chunk_a, chunk_b = bytearray(COPY_CHUNK), bytearray(COPY_CHUNK)
            for p, s in wanted:
                if p.transposed:
                    a = src.read_bytes(p.source, buf_a)
                    b = dst.read_bytes(p.target, buf_b)
                    ok = transposed_bytes_equal(a, b, *s.shape, DTYPES[s.dtype].itemsize)
                else:
                    ok = _equal_bytes(src, p.source, dst, p.target, s.nbytes, chunk_a, chunk_b)
                self._made((p.source, p.target), ok)
                src.release(p.source)


def _equal_bytes(src: Any, a_key: str, dst: Any, b_key: str, nbytes: int, buf_a: bytearray,
                 buf_b: bytearray) -> bool:
    """Whether two tensors' bytes are equal, read chunk by chunk."""
    import numpy as np

    done = 0
    while done < nbytes:
        n = min(len(buf_a), nbytes - done)
        a = src.read_part(a_key, done, n, buf_a)
        b = dst.read_part(b_key, done, n, buf_b)
        if not np.array_equal(np.frombuffer(a, np.uint8, n), np.frombuffer(b, np.uint8, n)):
            return False
        done += n
    return True


class _PlainUnpickler(pickle.Unpickler):
    """Tuples, lists, strings and booleans only: what the byte checks' process sends."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"the byte checks' process sent {module}.{name}")


class _Prover:
    """The byte checks (`_Proofs`) in a process of their own, forked from the verifying one
    before it imports torch, so that the checks and the import do not take turns at one GIL
    (in one process the import held it: on the 12-layer benchmark the checks ended 1.7 s
    after the last byte was written). It hears every frame the parent sends (`send`) and
    sends back what it proves (`results`, read by `_Proofs.made_elsewhere`). None of the
    verdict depends on it: a pair it did not prove is checked by the layer checks."""

    def __init__(self, pid: int, inbox: int, results: BinaryIO):
        self.pid, self._inbox, self.results = pid, inbox, results
        self._reaped = False
        self._lock = threading.Lock()

    @classmethod
    def fork(cls) -> _Prover | None:
        """The forked process, or None where there is no fork or no pipe (the checks then
        run on a thread of the verifying process)."""
        if not hasattr(os, "fork"):
            return None
        fds: list[int] = []
        try:
            fds.extend(os.pipe())
            fds.extend(os.pipe())
            me = os.getpid()
            pid = os.fork()
        except OSError:
            for fd in fds:
                os.close(fd)
            return None
        to_r, to_w, from_r, from_w = fds
        if pid == 0:
            os.close(to_w)
            os.close(from_r)
            _prove_for_sibling(me, to_r, from_w)  # never returns
        os.close(to_r)
        os.close(from_w)
        return cls(pid, to_w, os.fdopen(from_r, "rb"))

    def end(self) -> None:
        """Stop it (its results are all in, or no longer wanted) and reap it (once)."""
        import signal

        self.close()
        if self._reaped:
            return
        self._reaped = True
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)

    def send(self, data: bytes) -> None:
        """Pass on one frame from the parent (dropped once the process has gone)."""
        with self._lock:
            if self._inbox < 0:
                return
            frame = memoryview(_frame(data))
            try:
                while frame:
                    frame = frame[os.write(self._inbox, frame):]
            except OSError:
                os.close(self._inbox)
                self._inbox = -1

    def close(self) -> None:
        """No more frames: the process sees its input end (the parent's did)."""
        with self._lock:
            if self._inbox >= 0:
                os.close(self._inbox)
                self._inbox = -1


def _prove_for_sibling(verifier: int, inbox: int, outbox: int) -> None:
    """The forked byte checks' process: hear the parent's frames on INBOX, prove what the job
    asks, report each result on OUTBOX; end with os._exit, whatever happens, and with the
    process VERIFIER that forked it."""
    try:
        # nothing of the verifying process's pipes: the parent must see its stdout end
        # when that process ends, and its frames are read there
        os.dup2(2, 1)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        from ..children import die_with

        die_with(verifier)
        out = os.fdopen(outbox, "wb")
        lock = threading.Lock()

        def report(message: tuple[Any, ...]) -> None:
            with lock, contextlib.suppress(OSError, ValueError):
                _send(out, message)

        progress = _Progress(report=report)
        threading.Thread(target=progress.listen, args=(os.fdopen(inbox, "rb"),),
                         daemon=True).start()
        progress.wait_job()
        if progress.proofs is not None:
            progress.proofs.join()
        else:  # nothing to prove here (a .pt output is verified once finished)
            report(("over",))
    except BaseException:  # noqa: BLE001, S110 - the verifying process decides without us
        pass
    os._exit(0)


def _final_headers_match(dst: Any, paths: list[Path]) -> list[Any]:
    """Failures for every tensor whose final header entry is not the one that was checked."""
    from ..formats import safetensors as st
    from .report import CheckResult

    checked = {name: (i, rec.dtype, rec.shape, rec.begin, rec.end)
               for name, (i, rec) in dst._records.items()}
    final = {}
    for i, p in enumerate(paths):
        for name, rec in st.read_header(p).tensors.items():
            final[name] = (i, rec.dtype, rec.shape, rec.begin, rec.end)
    return [CheckResult(name, name, "tensor", False,
                        message="its final header entry differs from the one verified")
            for name in sorted(set(checked) | set(final)) if checked.get(name) != final.get(name)]


def _run(job: dict[str, Any], progress: _Progress) -> Any:
    from ..checkpoint import open_checkpoint, open_written
    from . import verify_checkpoints

    paths = [Path(p) for p in job["paths"]]
    display = Path(job["display"])
    with open_checkpoint(job["src"], state_dict_key=job["state_dict_key"],
                         allow_globals=job["allow_globals"]) as src:
        if job["growing"]:
            dst = _growing_source(display, paths, progress)
        else:
            progress.wait_done()
            dst = open_written(paths, job["format"], display, state_dict_key=job["dst_key"],
                               allow_globals=job["allow_globals"])
        # the byte checks run only beside a growing file (a .pt output is checked finished)
        proven: Any = progress.proofs if job["growing"] and progress.proofs is not None else {}
        with dst:
            report = verify_checkpoints(src, dst, pairs=job["pairs"], dropped=job["dropped"],
                                        dst_layout=job["dst_layout"], pairing=job["pairing"],
                                        device=job["device"],
                                        companion_rules=job["companion_rules"], proven=proven)
            if job["growing"]:
                progress.wait_done()
                report.results.extend(_final_headers_match(dst, paths))
    return report


def main() -> None:
    """The child: import torch now, then verify the job the parent sends. Whatever happens it
    ends with os._exit: the listening thread may be inside a read of stdin (the interpreter's
    shutdown would then abort), and tearing torch down takes time nobody waits for."""
    import signal
    import traceback

    code = 0
    prover = None
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C, closes us
        parent = os.getppid()
        prover = _Prover.fork()  # before any thread is started: a fork copies only this one
        from ..children import die_with

        die_with(parent)  # a SIGKILLed parent takes us with it
        out = os.fdopen(os.dup(1), "wb")
        os.dup2(2, 1)  # a stray print must not corrupt the replies
        progress = _Progress(prover)
        threading.Thread(target=progress.listen, args=(sys.stdin.buffer,), daemon=True).start()
        try:
            import torch  # noqa: F401 - why this process exists: imported while the parent streams

            job = progress.wait_job()
            reply: tuple[Any, ...] = ("report", _run(job, progress))
        except ConvertError as e:
            reply = ("error", type(e).__name__, str(e))
        except _ParentGone:
            raise
        except Exception as e:  # noqa: BLE001 - a bug or a broken install: the parent verifies
            last = traceback.format_exception_only(e)[-1].strip()
            reply = ("crash", last)
        _send(out, reply)
        out.close()
    except (_ParentGone, OSError):  # the parent has gone (it reports its own error)
        pass
    except BaseException:  # noqa: BLE001 - nothing may reach the user's terminal from here
        code = 70
    finally:
        if prover is not None:
            prover.end()
    os._exit(code)


if __name__ == "__main__":
    main()
