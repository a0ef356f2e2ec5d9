"""Output safety: a full disk, a read-only folder, SIGKILL, Ctrl-C and SIGTERM leave no DST
(or the old one), never a partial one, and no temporary file once the next run has passed."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
OLD = b"the previous DST, which must survive"


def _cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "convert", *map(str, args)]


def _partials(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.name.endswith(".partial"))


@pytest.fixture(scope="module")
def big_src(tmp_path_factory) -> Path:
    """A 12 MB param-layout checkpoint: slow enough to be caught while it is written."""
    folder = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(3):
        sd[f"h.{i}.fc.weight"] = torch.randn(1024, 1000, generator=g)
        sd[f"h.{i}.fc.bias"] = torch.randn(1000, generator=g)
    save_file(sd, str(folder / "big.safetensors"))
    return folder / "big.safetensors"


@pytest.fixture(scope="module")
def small_src(tmp_path_factory) -> Path:
    """About 1 MB: more than the tiny file systems and file size limits below allow."""
    folder = tmp_path_factory.mktemp("small")
    g = torch.Generator().manual_seed(1)
    save_file({"fc.weight": torch.randn(512, 500, generator=g),
               "fc.bias": torch.randn(500, generator=g)}, str(folder / "small.safetensors"))
    return folder / "small.safetensors"


@contextlib.contextmanager
def _mounted(where: Path, options: str):
    """A tmpfs at WHERE (root only); skips the test where mounting is not allowed."""
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _assert_one_error(res, code: int, *needles: str) -> None:
    assert res.exit_code == code, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("linconvert: error: "), res.stderr
    for needle in needles:
        assert needle in res.stderr, res.stderr


# --- a full disk, a file size limit, a read-only folder --------------------------------------

@pytest.mark.parametrize("name", ["o.safetensors", "o.pt",
                                  "o-folder/"])
def test_disk_full_mid_write_is_exit_5_and_leaves_nothing(tmp_path, runner, small_src, name):
    with _mounted(tmp_path / "fs", "size=256k") as fs:
        shards = ["--max-shard-size", "100KB"] if name.endswith("/") else []
        res = runner("to-linear", small_src, "-o", fs / name, *shards)
        _assert_one_error(res, 5, "the disk is full")
        assert [p for p in fs.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("name", ["o.safetensors", "o.pt"])
def test_file_size_limit_is_exit_5_and_leaves_nothing(tmp_path, small_src, name):
    """RLIMIT_FSIZE stands in for a full disk where no tmpfs can be mounted."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, 256 << 10))

    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run(_cli("to-linear", small_src, "-o", out / name), cwd=ROOT,
                          preexec_fn=limit, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 5, proc.stderr
    assert "ulimit -f" in proc.stderr and "Traceback" not in proc.stderr
    assert list(out.iterdir()) == []


def test_read_only_folder_is_exit_5(tmp_path, runner, small_src):
    if os.geteuid() == 0:
        ctx = _mounted(tmp_path / "ro", "ro,size=64k")
        needle = "read-only"
    else:
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o555)
        ctx = contextlib.nullcontext(tmp_path / "ro")
        needle = "permission denied"
    with ctx as folder:
        for name in ("o.safetensors", "o.pt"):
            res = runner("to-linear", small_src, "-o", folder / name)
            _assert_one_error(res, 5, needle, str(folder / name))
        assert list(folder.iterdir()) == []


# --- killed, interrupted, terminated ---------------------------------------------------------


def _start_and_wait_for_partial(args: list[str], folder: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        found = _partials(folder)
        if found:
            return proc, found[0]
        if proc.poll() is not None:
            pytest.fail(f"the conversion ended before its temporary file was seen: "
                        f"{proc.stderr.read()}")
        time.sleep(0.0005)
    proc.kill()
    pytest.fail("no temporary file appeared within 90 s")


@pytest.mark.parametrize("name", ["o.safetensors", "o.pt", "o-folder/"])
def test_sigkill_while_writing_leaves_the_old_dst(tmp_path, runner, big_src, name):
    dst = tmp_path / name
    old = dst / "model.safetensors.index.json" if name.endswith("/") else dst
    old.parent.mkdir(exist_ok=True)
    old.write_bytes(OLD)
    shard = ["--max-shard-size", "5MB"] if name.endswith("/") else []
    proc, partial = _start_and_wait_for_partial(
        _cli("to-linear", big_src, "-o", dst, "--overwrite", *shard), tmp_path)
    proc.kill()
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert old.read_bytes() == OLD  # the old DST, whole
    assert partial.exists()  # what the killed run left ...
    res = runner("to-linear", big_src, "-o", dst, "--overwrite", "--no-verify", *shard)
    assert res.exit_code == 0, res.stderr
    assert _partials(tmp_path) == []  # ... the next run removed
    assert old.read_bytes() != OLD


@pytest.mark.parametrize(("sig", "code", "word"), [(signal.SIGINT, 130, "interrupted"),
                                                   (signal.SIGTERM, 143, "terminated")])
@pytest.mark.parametrize("name", ["o.safetensors", "o.pt", "o-folder/"])
def test_interrupt_while_writing_cleans_up(tmp_path, big_src, name, sig, code, word):
    """The signal lands the moment the temporary file appears (inside AtomicFile.__enter__,
    right after os.open returns, as often as not): still nothing left behind."""
    dst = tmp_path / name
    old = dst / "model.safetensors.index.json" if name.endswith("/") else dst
    old.parent.mkdir(exist_ok=True)
    old.write_bytes(OLD)
    shard = ["--max-shard-size", "5MB"] if name.endswith("/") else []
    proc, _ = _start_and_wait_for_partial(
        _cli("to-linear", big_src, "-o", dst, "--overwrite", *shard), tmp_path)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    assert stderr.strip() == f"linconvert: {word}.", stderr
    assert old.read_bytes() == OLD
    assert _partials(tmp_path) == []


def _fd_is(fd: int, name: str) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").endswith(name)
    except OSError:
        return False


@pytest.mark.parametrize("name", ["o.pt", "o.safetensors", "o-folder/"])
def test_interrupt_as_the_temporary_file_is_created(tmp_path, runner, monkeypatch, small_src,
                                                    name):
    """Python handles a pending signal as soon as os.open returns, before its result is
    stored: the temporary file exists and nobody holds it yet."""
    dst = tmp_path / name
    real_open = os.open

    def interrupted(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if str(path).endswith(".partial"):
            raise KeyboardInterrupt
        return fd

    monkeypatch.setattr(os, "open", interrupted)
    shard = ["--max-shard-size", "300KB"] if name.endswith("/") else []
    res = runner("to-linear", small_src, "-o", dst, *shard)
    assert res.exit_code == 130, res.stderr
    assert _partials(tmp_path) == []
    assert not dst.is_file() and not (dst / "model.safetensors.index.json").exists()


def test_ctrl_c_after_the_pt_is_written_cleans_up(tmp_path, runner, monkeypatch, small_src):
    """Deterministic Ctrl-C for .pt output: at the fsync that follows torch.save."""
    dst = tmp_path / "o.pt"
    dst.write_bytes(OLD)
    real_fsync = os.fsync

    def interrupted(fd):
        if _fd_is(fd, ".o.pt.partial"):
            raise KeyboardInterrupt
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", interrupted)
    res = runner("to-linear", small_src, "-o", dst, "--overwrite")
    assert res.exit_code == 130, res.stderr
    assert res.stderr.strip() == "linconvert: interrupted."
    assert dst.read_bytes() == OLD
    assert _partials(tmp_path) == []


def test_ctrl_c_inside_a_pt_write_is_exit_130(tmp_path, runner, monkeypatch, small_src):
    dst = tmp_path / "o.pt"
    dst.write_bytes(OLD)
    real_write = os.write
    writes = []

    def interrupted(fd, data):
        if _fd_is(fd, ".o.pt.partial"):
            writes.append(len(data))
            if len(writes) == 3:
                raise KeyboardInterrupt
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", interrupted)
    res = runner("to-linear", small_src, "-o", dst, "--overwrite")
    assert res.exit_code == 130, res.stderr
    assert dst.read_bytes() == OLD
    assert _partials(tmp_path) == []


def test_interrupted_sharded_write_with_an_old_index_is_caught_on_read(tmp_path, runner,
                                                                       monkeypatch):
    """Killed after the first new shard was renamed into place: the folder mixes two
    conversions under the old index, and every later read says so (exit 4)."""
    from convert.formats.safetensors import SafetensorsWriter

    g = torch.Generator().manual_seed(4)

    def source(name: str) -> Path:
        sd = {f"h.{i}.fc.weight": torch.randn(40, 30, generator=g) for i in range(3)}
        sd |= {f"h.{i}.fc.bias": torch.randn(30, generator=g) for i in range(3)}
        save_file(sd, str(tmp_path / name))
        return tmp_path / name

    first, second = source("v1.safetensors"), source("v2.safetensors")
    out = tmp_path / "out"
    assert runner("to-linear", first, "-o", f"{out}/", "--max-shard-size", "6KB").exit_code == 0
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2
    old_first_shard = shards[0].read_bytes()

    real_commit = SafetensorsWriter.commit
    commits = []

    def killed_after_one(self):
        if commits:
            raise KeyboardInterrupt
        commits.append(self.dst)
        real_commit(self)

    monkeypatch.setattr(SafetensorsWriter, "commit", killed_after_one)
    res = runner("to-linear", second, "-o", f"{out}/", "--max-shard-size", "6KB", "--overwrite")
    assert res.exit_code == 130
    assert commits == [shards[0]]
    assert shards[0].read_bytes() != old_first_shard  # one new shard among old ones ...
    monkeypatch.undo()
    res = runner("inspect", out)  # ... under the old index: refused, never used silently
    _assert_one_error(res, 4, "different conversions")
    assert _partials(tmp_path) == []


def test_dst_appearing_during_the_write_is_not_replaced(tmp_path, runner, monkeypatch,
                                                       small_src):
    """Without --overwrite the final step is a hard link: a DST created meanwhile survives."""
    import convert.formats.atomic as atomic

    dst = tmp_path / "o.safetensors"
    real_commit = atomic.AtomicFile.commit

    def racing_commit(self, *args, **kwargs):
        if self.dst == dst:
            dst.write_bytes(OLD)
        return real_commit(self, *args, **kwargs)

    monkeypatch.setattr(atomic.AtomicFile, "commit", racing_commit)
    res = runner("to-linear", small_src, "-o", dst)
    _assert_one_error(res, 5, "appeared while it was being written", "--overwrite")
    assert dst.read_bytes() == OLD
    assert _partials(tmp_path) == []


def test_output_is_whole_after_a_normal_run(tmp_path, runner, small_src):
    """The control: the same conversion, undisturbed, publishes a complete DST."""
    res = runner("to-linear", small_src, "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 0, res.stderr
    assert load_file(tmp_path / "o.safetensors")["fc.weight"].shape == (500, 512)
    assert _partials(tmp_path) == []
