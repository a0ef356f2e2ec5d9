"""Large outputs nothing reads back at once (`--no-verify`) are written with direct I/O
(convert.formats.direct): the bytes must be exactly those the page-cache path writes, at every
buffer boundary, in every file of a sharded set; where a file system refuses direct I/O the
same conversion goes through the page cache; a verified conversion does not use it.
"""

from __future__ import annotations

import errno
import os
import random
import resource
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert
from convert.formats import direct


@pytest.fixture
def small_stages(monkeypatch):
    """64 KiB buffers and direct I/O for every file, so small tests cross many boundaries."""
    monkeypatch.setattr(direct, "STAGE", 64 << 10)
    monkeypatch.setattr(direct, "DIRECT_MIN", 0)


def _source(tmp_path: Path, layers: int = 3) -> Path:
    g = torch.Generator().manual_seed(11)
    sd = {"emb.weight": torch.randn(1001, 37, generator=g)}
    for i in range(layers):
        sd[f"h.{i}.fc.weight"] = torch.randn(37, 301, generator=g)  # not 4 KiB multiples
        sd[f"h.{i}.fc.bias"] = torch.randn(301, generator=g)
        sd[f"h.{i}.proj.weight"] = torch.randn(301, 37, generator=g).to(torch.bfloat16)
        sd[f"h.{i}.empty.weight"] = torch.zeros(0, 5)
    path = tmp_path / "src.safetensors"
    save_file(sd, str(path))
    return path


def test_appender_writes_exactly_the_bytes_given_across_buffer_boundaries(tmp_path,
                                                                          small_stages):
    rng = random.Random(4)
    src = tmp_path / "src.bin"
    src.write_bytes(rng.randbytes(300_000))
    out = tmp_path / "out.bin"
    out.touch()
    app = direct.DirectAppender(out)
    want = bytearray()
    fd = os.open(src, os.O_RDONLY)
    try:
        for size in (1, 4095, 4096, 65536, 65535, 0, 131073, 7, 200_000):
            if rng.random() < 0.5:
                data = rng.randbytes(size)
                app.write(data)
                want += data
            else:
                at = rng.randrange(0, 300_000 - size + 1)
                app.copy_from(fd, at, size)
                want += src.read_bytes()[at:at + size]
            assert app.flushed <= len(want) and app.flushed % direct.ALIGN == 0
        app.end(len(want))
    finally:
        os.close(fd)
    assert app.flushed == len(want)
    assert out.read_bytes() == bytes(want)


def test_a_file_system_that_refuses_direct_writes_gets_them_through_the_page_cache(
        tmp_path, small_stages, monkeypatch):
    real = os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(direct.os, "pwrite", pwrite)
    out = tmp_path / "out.bin"
    out.touch()
    app = direct.DirectAppender(out)
    data = random.Random(1).randbytes(150_001)
    app.write(data)
    app.end(len(data))
    assert refused == [0] and not app.direct
    assert out.read_bytes() == data


def test_a_write_error_is_raised_and_nothing_is_left(tmp_path, small_stages, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct.os, "pwrite", full)
    src = _source(tmp_path)
    with pytest.raises(convert.OutputError, match="the disk is full"):
        convert.to_linear(src, tmp_path / "o.safetensors", layers=["*.fc.weight"],
                          verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.safetensors"]


@pytest.mark.parametrize("shards", [None, "60KB"])
def test_direct_output_is_byte_for_byte_the_page_cache_output(tmp_path, small_stages,
                                                              monkeypatch, shards):
    src = _source(tmp_path)
    a, b = tmp_path / "direct", tmp_path / "cached"
    if shards is None:
        a.mkdir()
        b.mkdir()
    kwargs = {"layers": ["*.fc.weight", "*.proj.weight"], "max_shard_size": shards,
              "verify": False}
    convert.to_linear(src, a / "o.safetensors" if shards is None else a, **kwargs)
    monkeypatch.setattr(direct, "DIRECT_MIN", 1 << 62)
    convert.to_linear(src, b / "o.safetensors" if shards is None else b, **kwargs)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert len(files) == (1 if shards is None else 7)  # six shards and their index
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    if shards is None:
        out = load_file(a / "o.safetensors")
        assert out["h.2.proj.weight"].shape == (37, 301)


def test_direct_output_verifies_and_a_verified_conversion_keeps_the_page_cache(
        tmp_path, small_stages, monkeypatch):
    src = _source(tmp_path)
    convert.to_param(src, tmp_path / "p.safetensors", layers=["*.proj.weight"], verify=False)
    assert convert.verify(src, tmp_path / "p.safetensors").equivalent
    opened = []
    real = direct.DirectAppender.__init__

    def seen(self, path):
        opened.append(path)
        real(self, path)

    monkeypatch.setattr(direct.DirectAppender, "__init__", seen)
    convert.to_param(src, tmp_path / "q.safetensors", layers=["*.proj.weight"])
    assert opened == []
    convert.to_param(src, tmp_path / "r.safetensors", layers=["*.proj.weight"], verify=False)
    assert len(opened) == 1


def test_a_file_system_without_direct_io_is_written_and_read_through_the_cache(tmp_path,
                                                                               small_stages):
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("needs a writable /dev/shm (a tmpfs, which refuses O_DIRECT)")
    folder = shm / f"linconvert-test-{os.getpid()}"
    folder.mkdir()
    try:
        src = _source(tmp_path)
        convert.to_linear(src, folder / "o.safetensors", layers=["*.fc.weight"], verify=False)
        assert convert.verify(src, folder / "o.safetensors").equivalent
        assert load_file(folder / "o.safetensors")["h.0.fc.weight"].shape == (301, 37)
    finally:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


def test_the_file_size_limit_is_exit_5_with_direct_writes(tmp_path, small_stages, runner):
    src = _source(tmp_path, layers=12)  # ~1.3 MB out
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    out = tmp_path / "out"
    out.mkdir()
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, hard))
    try:
        res = runner("to-linear", src, "-o", out / "o.safetensors", "--layers", "*.fc.weight",
                     "--no-verify")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert res.exit_code == 5 and "ulimit -f" in res.stderr, res.stderr
    assert list(out.iterdir()) == []
