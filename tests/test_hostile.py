"""Hostile and broken inputs through the real CLI handler: one sentence, the documented exit
code, no traceback, no code run, nothing written.

Every bad file is built here, in tmp_path. Cases already covered at the reader level live in
test_formats.py (header length, unknown dtype, size mismatch, non-string metadata, escaping
shard paths); these tests add what the CLI must guarantee around them.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import signal
import struct
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import convert
from convert.errors import CorruptInputError
from convert.formats import safetensors as st

# --- helpers ------------------------------------------------------------------------------


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def assert_refused(res, code: int, *needles: str) -> None:
    """Exit CODE, exactly one line on stderr naming NEEDLES, nothing on stdout, no traceback,
    no terminal colour codes and never the advice to load unsafely."""
    assert res.exit_code == code, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("linconvert: error: "), res.stderr
    assert lines[0].rstrip().endswith("."), res.stderr
    assert "Traceback" not in res.stderr
    assert "\x1b" not in res.stderr
    assert "weights_only=False" not in res.stderr and "weights_only` set to" not in res.stderr
    assert res.stdout == ""
    for needle in needles:
        assert needle in res.stderr, res.stderr


@pytest.fixture
def convert_refused(runner, tmp_path):
    """Run `to-linear SRC -o DST` and `inspect SRC`; both refused alike, nothing written."""

    def check(src: Path, code: int, *needles: str, extra: tuple = ()) -> None:
        """EXTRA: options for to-linear only."""
        folder = src.parent
        before = _listing(folder)
        dst = folder / "out.safetensors"
        assert_refused(runner("to-linear", src, "-o", dst, *extra), code, str(src), *needles)
        assert_refused(runner("inspect", src), code, *needles)
        assert _listing(folder) == before  # no DST, no temporary file, SRC untouched

    return check


@pytest.fixture
def torch_load_calls(monkeypatch):
    """Every torch.load call, by its keyword arguments."""
    calls: list[dict] = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


@contextlib.contextmanager
def deadline(seconds: float):
    """Turn a hang into a failure (SIGALRM interrupts pure-Python loops and blocking opens)."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"fc.weight": torch.randn(3, 5, generator=g), "fc.bias": torch.randn(5, generator=g)}


def _rezip(src: Path, dst: Path, change=lambda name, data: data,
           compression: int = zipfile.ZIP_STORED) -> None:
    """Copy a torch.save archive member by member, changing members on the way."""
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dst, "w", compression) as out:
        for info in z.infolist():
            data = change(info.filename, z.read(info.filename))
            if data is not None:
                out.writestr(info.filename, data)


def _central_entries(blob: bytes):
    """(offset, name) of each central directory entry of a zip archive."""
    pos = blob.find(b"PK\x01\x02")
    while pos >= 0:
        name_len = struct.unpack_from("<H", blob, pos + 28)[0]
        yield pos, blob[pos + 46:pos + 46 + name_len].decode()
        pos = blob.find(b"PK\x01\x02", pos + 46)


class _Payload:
    """Pickles as a call to os.system that creates MARKER."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _CallsPrint:
    def __reduce__(self):
        return (print, ("linconvert ran print",))


# --- pickles ------------------------------------------------------------------------------


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-pickle"])
def test_os_system_payload_never_runs(tmp_path, convert_refused, torch_load_calls, zip_format):
    marker = tmp_path / "PWNED"
    src = tmp_path / "evil.pt"
    torch.save({**_state_dict(), "hook": _Payload(marker)}, src,
               _use_new_zipfile_serialization=zip_format)
    convert_refused(src, 3, "'posix.system'", "never allowed")
    assert not marker.exists()
    assert torch_load_calls and all(c.get("weights_only") is True for c in torch_load_calls)
    assert len(torch_load_calls) == 2  # one attempt per command: no retry, never less safe


def test_payload_is_live(tmp_path):
    """The payload above does run code when loaded unsafely: the refusal is what stops it."""
    marker = tmp_path / "PWNED"
    torch.save({"hook": _Payload(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(("value", "names"), [
    (_CallsPrint(), ["'builtins.print'"]),
    (np.float32(1.5), ["'numpy._core.multiarray.scalar'", "'numpy.dtype'"]),
    (argparse.Namespace(lr=0.1), ["'argparse.Namespace'"]),
], ids=["print", "numpy-scalar", "argparse-namespace"])
def test_unlisted_harmless_global_is_named_with_the_escape(tmp_path, convert_refused, capfd,
                                                          torch_load_calls, value, names):
    src = tmp_path / "x.pt"
    torch.save({"model": _state_dict(), "extra": value}, src)
    convert_refused(src, 3, *names, "--allow-global")
    assert "linconvert ran print" not in capfd.readouterr().out
    assert all(c.get("weights_only") is True for c in torch_load_calls)


def test_allowing_the_named_globals_names_what_is_still_missing(tmp_path, runner):
    src = tmp_path / "x.pt"
    torch.save({"model": _state_dict(), "lr": np.float32(0.1)}, src)
    first = ["numpy._core.multiarray.scalar", "numpy.dtype"]
    res = runner("inspect", src, *[a for g in first for a in ("--allow-global", g)])
    assert_refused(res, 3, "'numpy.dtypes.Float32DType'", "--allow-global")
    assert not any(f"'{g}'" in res.stderr for g in first)  # what the user allowed is not asked
    every = [*first, "numpy.dtypes.Float32DType"]
    res = runner("inspect", src, *[a for g in every for a in ("--allow-global", g)])
    assert res.exit_code == 0, res.stderr


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_is_refused_before_loading(tmp_path, convert_refused,
                                                       torch_load_calls):
    src = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 5)), src)
    convert_refused(src, 3, "TorchScript")
    assert torch_load_calls == []


def test_whole_pickled_module_is_refused(tmp_path, convert_refused):
    src = tmp_path / "model.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 5)), src)
    convert_refused(src, 3, "'torch.nn.modules.linear.Linear'", "state_dict()")


def test_torch_older_than_2_10_never_unpickles(tmp_path, convert_refused, monkeypatch,
                                                torch_load_calls):
    from torch.torch_version import TorchVersion

    torch.save(_state_dict(), tmp_path / "fine.pt")
    monkeypatch.setattr(torch, "__version__", TorchVersion("2.9.1"))
    convert_refused(tmp_path / "fine.pt", 3, "torch 2.9.1", "upgrade torch")
    assert torch_load_calls == []


# --- zip archives: refused before torch reads them ------------------------------------------


def test_deflated_members_are_refused_before_loading(tmp_path, convert_refused,
                                                     torch_load_calls):
    torch.save(_state_dict(), tmp_path / "good.pt")
    src = tmp_path / "deflated.pt"
    _rezip(tmp_path / "good.pt", src, compression=zipfile.ZIP_DEFLATED)
    assert torch.load(src, weights_only=True)["fc.bias"].shape == (5,)  # torch would read it
    torch_load_calls.clear()
    convert_refused(src, 3, "compressed", "zip bomb")
    assert torch_load_calls == []


def test_zip_bomb_is_refused_without_inflating(tmp_path, convert_refused, torch_load_calls):
    torch.save(_state_dict(), tmp_path / "good.pt")
    src = tmp_path / "bomb.pt"
    with zipfile.ZipFile(tmp_path / "good.pt") as z, \
            zipfile.ZipFile(src, "w", zipfile.ZIP_STORED) as out:
        for info in z.infolist():
            out.writestr(info.filename, z.read(info.filename))
        out.writestr("good/data/9", b"\0" * (64 << 20), compress_type=zipfile.ZIP_DEFLATED)
    assert src.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        convert_refused(src, 3, "'good/data/9'", "zip bomb")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20
    assert torch_load_calls == []


def test_member_claiming_more_than_the_archive_is_refused(tmp_path, convert_refused,
                                                         torch_load_calls):
    torch.save(_state_dict(), tmp_path / "good.pt")
    blob = bytearray((tmp_path / "good.pt").read_bytes())
    for pos, name in _central_entries(bytes(blob)):
        if name.endswith("data.pkl"):
            struct.pack_into("<II", blob, pos + 20, 3 << 30, 3 << 30)
    src = tmp_path / "claims.pt"
    src.write_bytes(bytes(blob))
    convert_refused(src, 4, "data.pkl", "claims 3221225472 bytes")
    assert torch_load_calls == []


def test_local_header_contradicting_the_directory_is_refused(tmp_path, convert_refused):
    torch.save(_state_dict(), tmp_path / "good.pt")
    blob = bytearray((tmp_path / "good.pt").read_bytes())
    for pos, name in _central_entries(bytes(blob)):
        if name.endswith("data.pkl"):
            local = struct.unpack_from("<I", blob, pos + 42)[0]
            struct.pack_into("<H", blob, local + 8, zipfile.ZIP_DEFLATED)
    src = tmp_path / "local.pt"
    src.write_bytes(bytes(blob))
    convert_refused(src, 3, "data.pkl", "local header")


def test_member_named_twice_is_refused(tmp_path, convert_refused):
    torch.save(_state_dict(), tmp_path / "good.pt")
    src = tmp_path / "twice.pt"
    with zipfile.ZipFile(tmp_path / "good.pt") as z, zipfile.ZipFile(src, "w") as out:
        for info in z.infolist():
            out.writestr(info.filename, z.read(info.filename))
        with pytest.warns(UserWarning, match="Duplicate name"):
            out.writestr("good/data.pkl", pickle.dumps({}))
    convert_refused(src, 4, "'good/data.pkl' twice")


# --- broken .pt: exit 4 with a sentence ------------------------------------------------------


def _legacy_tar(path: Path) -> None:
    """The pre-0.4 torch.save layout: a tar of pickles."""
    with tarfile.open(path, "w") as tar:
        for name in ("sys_info", "pickle", "storages", "tensors"):
            data = pickle.dumps({})
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _zip_with_pickle(tmp_path: Path, change) -> Path:
    torch.save({"w.weight": torch.arange(6.0).reshape(2, 3), "w.bias": torch.zeros(3)},
               tmp_path / "good.pt")
    src = tmp_path / "crafted.pt"
    _rezip(tmp_path / "good.pt", src,
           lambda name, data: change(data) if name.endswith("data.pkl") else data)
    return src


@pytest.mark.parametrize(("build", "needles"), [
    (lambda p: p.write_bytes(b""), ["is empty"]),
    (lambda p: p.write_bytes(_good_bytes()[:100]), ["not a valid one"]),
    (lambda p: p.write_bytes(_good_bytes()[: len(_good_bytes()) // 2]), ["not a valid one"]),
    (lambda p: p.write_bytes(_good_bytes()[:-1]), ["not a valid one"]),
    (lambda p: p.write_bytes(_good_bytes(legacy=True)[:-7]), ["legacy torch.save pickle"]),
    (lambda p: p.write_bytes(_good_bytes(legacy=True)[:40]), ["legacy torch.save pickle"]),
    (lambda p: p.write_bytes(b"this is a text file, not weights\n"), ["neither a zip"]),
    (lambda p: p.write_bytes(b"\x80\x02\xc3\x9f" + bytes(range(60))),
     ["legacy torch.save pickle"]),
    (lambda p: p.write_bytes(b"PK\x03\x04" + b"\0" * 60), ["not a valid one"]),
    (_legacy_tar, ["legacy .tar format"]),
    (lambda p: save_file(_state_dict(), str(p)), ["looks like a safetensors file"]),
], ids=["empty", "truncated-100", "truncated-half", "truncated-1", "legacy-truncated",
        "legacy-head", "text", "random-pickle", "zip-magic-only", "legacy-tar",
        "safetensors-named-pt"])
def test_broken_pt_is_exit_4_with_a_sentence(tmp_path, convert_refused, build, needles):
    src = tmp_path / "broken.pt"
    build(src)
    convert_refused(src, 4, *needles)


def _good_bytes(legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    torch.save(_state_dict(), buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


@pytest.mark.parametrize(("change", "needle"), [
    # tensor size (2, 3) -> (20, 30) over a 6-element storage
    (lambda b: b.replace(b"K\x00K\x02K\x03\x86", b"K\x00K\x14K\x1e\x86"),
     "torch could not read it"),
    (lambda b: b[: len(b) // 2], "EOFError"),
    (lambda b: b.replace(b"collections\nOrderedDict", b"collections\nOrderedDicx"),
     "'collections.OrderedDicx'"),
], ids=["size-past-storage", "pickle-cut", "unknown-global"])
def test_crafted_pickle_inside_a_valid_zip(tmp_path, convert_refused, change, needle):
    src = _zip_with_pickle(tmp_path, change)
    code = 3 if needle.startswith("'") else 4
    convert_refused(src, code, needle)


def test_non_string_state_dict_keys_are_corrupt(tmp_path, convert_refused):
    src = tmp_path / "intkeys.pt"
    torch.save({0: torch.zeros(3, 5), 1: torch.zeros(5)}, src)
    convert_refused(src, 4, "key 0 is not a string")


def test_a_key_holding_a_storage_is_named_without_its_repr(tmp_path, convert_refused):
    """Found by the fuzzer: a mutated pickle made a tuple holding a TypedStorage a key, and
    printing its repr put torch's deprecation warning on stderr beside the error."""
    import warnings

    src = tmp_path / "storagekey.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        key = (torch.zeros(2).storage(),)
        torch.save({"fc.weight": torch.zeros(3, 5), key: torch.zeros(2)}, src)
        torch.save({"model": {"fc.weight": torch.zeros(3, 5)}, key: 1}, tmp_path / "t.pt")
    convert_refused(src, 4, "key <a tuple> is not a string")
    with pytest.raises(convert.UsageError, match="<a tuple>") as e:
        convert.to_linear(tmp_path / "t.pt", tmp_path / "o.pt", state_dict_key="nope")
    assert "Storage" not in str(e.value)


def test_torch_messages_lose_colour_codes_and_unsafe_advice(tmp_path, runner, monkeypatch):
    torch.save(_state_dict(), tmp_path / "x.pt")

    def fails(*args, **kwargs):
        raise RuntimeError("\x1b[1mPytorchStreamReader failed reading file data/0\x1b[0m: "
                           "invalid header.\nRe-running `torch.load` with `weights_only` set "
                           "to `False` will likely succeed")

    monkeypatch.setattr(torch, "load", fails)
    res = runner("inspect", tmp_path / "x.pt")
    assert_refused(res, 4, "PytorchStreamReader failed reading file data/0")
    # click strips colour codes on a pipe but not on a terminal, and the API has no click
    with pytest.raises(CorruptInputError) as e:
        convert.inspect_checkpoint(tmp_path / "x.pt")
    assert "\x1b" not in str(e.value) and "weights_only` set to" not in str(e.value)
    assert "PytorchStreamReader failed reading file data/0: invalid header" in str(e.value)


def test_library_warnings_during_a_load_stay_off_stderr(tmp_path, runner, monkeypatch,
                                                       recwarn):
    import warnings

    torch.save(_state_dict(), tmp_path / "x.pt")
    real = torch.load

    def warns(*args, **kwargs):
        warnings.warn("torch.load received a zip file that looks like ...", UserWarning,
                      stacklevel=2)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", warns)
    res = runner("inspect", tmp_path / "x.pt")
    assert res.exit_code == 0
    assert res.stderr == ""
    assert not [w for w in recwarn if "looks like" in str(w.message)]  # never even shown


def test_a_fifo_is_not_opened_for_reading(tmp_path, runner):
    for name in ("pipe.pt", "pipe.safetensors", "pipe.weights"):
        os.mkfifo(tmp_path / name)
        with deadline(5):
            res = runner("inspect", tmp_path / name)
        assert_refused(res, 4, "not a regular file")


# --- safetensors ----------------------------------------------------------------------------


def _raw(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _entry(dtype: str, shape: list, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


_DUPLICATE = (b'{"a.weight":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
              b'"a.weight":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}')


@pytest.mark.parametrize(("blob", "needle"), [
    (_raw({"a.weight": _entry("F32", [2, 3], 0, 24)}, b"\0" * 28), "trailing bytes"),
    (_raw({"a.weight": _entry("F32", [2, 3], 0, 24)}, b"\0" * 20), "truncated"),
    (_raw({"a": _entry("U8", [2], 0, 2), "b": _entry("U8", [2], 3, 5)}, b"\0" * 5),
     "gap or overlap"),
    (_raw({"a": _entry("U8", [2], 0, 2), "b": _entry("U8", [2], 1, 3)}, b"\0" * 3),
     "gap or overlap"),
    (struct.pack("<Q", len(_DUPLICATE)) + _DUPLICATE + b"\0\0", "duplicate key 'a.weight'"),
    (_raw({"a.weight": _entry("F32", [2**70, 0], 0, 0)}), "overflow a 64-bit"),
    (_raw({"a.weight": _entry("F32", [2**63, 0, 3], 0, 0)}), "overflow a 64-bit"),
    (_raw({"a.weight": _entry("F32", [10**300, 10**300], 0, 4)}, b"\0" * 4),
     "more than 2**63 elements"),
    (_raw({"a.weight": _entry("F32", [2, 3], 0, 24)}, b"\0" * 24)
     .replace(b'"F32"', b'"F33"'), "unknown dtype 'F33'"),
    (struct.pack("<Q", 200_000) + b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (struct.pack("<Q", 90_000_000) + b"{}", "claims 90000000 bytes"),
    (_raw({"__metadata__": {"format": ["pt"]}}), "strings to strings"),
], ids=["trailing", "truncated-data", "gap", "overlap", "duplicate-name", "zero-dim-overflow",
        "zero-dim-overflow-3d", "product-overflow", "unknown-dtype", "deep-json",
        "header-past-end", "non-string-metadata"])
def test_bad_safetensors_is_exit_4(tmp_path, convert_refused, blob, needle):
    src = tmp_path / "bad.safetensors"
    src.write_bytes(blob)
    convert_refused(src, 4, needle, extra=("--layers", "a.weight") if b"a.weight" in blob
                    else ())


def test_a_header_is_never_sized_by_its_own_claims(tmp_path):
    """A header length under the cap but past the end of a 20-byte file allocates nothing."""
    path = tmp_path / "liar.safetensors"
    path.write_bytes(struct.pack("<Q", 99_000_000) + b'{"a":1}    ')
    tracemalloc.start()
    try:
        with pytest.raises(CorruptInputError, match="truncated"):
            st.read_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_empty_matrix_with_a_huge_dimension_transposes_at_once(tmp_path, runner):
    src = tmp_path / "empty.safetensors"
    src.write_bytes(_raw({"a.weight": _entry("F32", [2**40, 0], 0, 0)}))
    with deadline(3):
        res = runner("to-linear", src, "-o", tmp_path / "o.safetensors", "--layers", "a.weight")
    assert res.exit_code == 0, res.stderr
    assert load_file(tmp_path / "o.safetensors")["a.weight"].shape == (0, 2**40)


# --- sharded indexes ------------------------------------------------------------------------


def _shards(folder: Path, weight_map: dict | None = None, total: int | None = None,
            raw_index: str | None = None) -> Path:
    """Two safetensors shards in FOLDER and an index (WEIGHT_MAP, or the true one)."""
    folder.mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(1)
    save_file({"a.weight": torch.randn(3, 5, generator=g), "a.bias": torch.randn(5, generator=g)},
              str(folder / "s1.safetensors"))
    save_file({"b.weight": torch.randn(3, 5, generator=g), "b.bias": torch.randn(5, generator=g)},
              str(folder / "s2.safetensors"))
    true_map = {"a.weight": "s1.safetensors", "a.bias": "s1.safetensors",
                "b.weight": "s2.safetensors", "b.bias": "s2.safetensors"}
    text = raw_index or json.dumps({"metadata": {"total_size": 160 if total is None else total},
                                    "weight_map": true_map if weight_map is None
                                    else weight_map})
    (folder / "model.safetensors.index.json").write_text(text)
    return folder


def test_the_honest_two_shard_index_converts(tmp_path, runner):
    folder = _shards(tmp_path / "m")
    res = runner("to-linear", folder, "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 0, res.stderr


@pytest.mark.parametrize("name", ["sub/../s1.safetensors", "../m/s1.safetensors",
                                  "{abs}/s1.safetensors", "link.safetensors"],
                         ids=["dotdot-inside", "dotdot-out-and-back", "absolute", "symlink-out"])
def test_shard_path_leaving_the_folder_is_exit_3(tmp_path, convert_refused, name):
    folder = tmp_path / "m"
    (folder / "sub").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    save_file({"a.weight": torch.randn(3, 5)}, str(outside / "s1.safetensors"))
    os.symlink(outside / "s1.safetensors", folder / "link.safetensors")
    wm = {"a.weight": name.format(abs=folder), "a.bias": "s1.safetensors",
          "b.weight": "s2.safetensors", "b.bias": "s2.safetensors"}
    _shards(folder, wm)
    convert_refused(folder / "model.safetensors.index.json", 3, "outside its folder", "a.weight")


@pytest.mark.parametrize(("weight_map", "total", "raw", "needles"), [
    ({"a.weight": "s1.safetensors", "a.bias": "s1.safetensors", "b.weight": "s3.safetensors",
      "b.bias": "s3.safetensors"}, None, None,
     ["'s3.safetensors'", "missing", "'b.bias', 'b.weight'"]),
    ({"a.weight": "s1.safetensors", "a.bias": "s1.safetensors", "b.weight": "s1.safetensors",
      "b.bias": "s2.safetensors"}, None, None,
     ["puts 'b.weight' in 's1.safetensors', which lacks it"]),
    ({"a.weight": "s1.safetensors", "a.bias": "s1.safetensors", "b.weight": "s2.safetensors",
      "b.bias": "s2.safetensors", "c.weight": "s2.safetensors", "d.bias": "s2.safetensors"},
     None, None, ["'c.weight', 'd.bias'", "which lacks them"]),
    ({"a.weight": "s1.safetensors", "a.bias": "s1.safetensors", "b.weight": "s2.safetensors",
      "b.bias": "s2.safetensors"}, 161, None, ["total_size 161", "160"]),
    (None, None, '{"weight_map": {"a.weight": "s1.safetensors", "a.bias": "s1.safetensors", '
     '"b.weight": "s2.safetensors", "b.bias": "s2.safetensors", "a.weight": "s2.safetensors"}}',
     ["names 'a.weight' twice"]),
], ids=["missing-shard", "key-missing-from-its-shard", "keys-missing", "wrong-total-size",
        "key-listed-twice"])
def test_inconsistent_index_is_exit_4_listing_the_keys(tmp_path, convert_refused, weight_map,
                                                       total, raw, needles):
    folder = _shards(tmp_path / "m", weight_map, total, raw)
    convert_refused(folder / "model.safetensors.index.json", 4, *needles)


def test_key_in_two_shards_is_exit_4(tmp_path, convert_refused):
    folder = _shards(tmp_path / "m")
    save_file({"b.weight": torch.randn(3, 5), "b.bias": torch.randn(5),
               "a.bias": torch.randn(5)}, str(folder / "s2.safetensors"))
    convert_refused(folder / "model.safetensors.index.json", 4, "'a.bias'",
                    "puts 'a.bias' in another shard")


def test_key_in_two_bin_shards_is_exit_4(tmp_path, convert_refused):
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save({"a.weight": torch.randn(3, 5), "a.bias": torch.randn(5)}, folder / "p1.bin")
    torch.save({"a.weight": torch.randn(3, 5)}, folder / "p2.bin")
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "p1.bin", "a.bias": "p1.bin", "b": "p2.bin"}}))
    convert_refused(folder / "pytorch_model.bin.index.json", 4, "'a.weight'")


# --- selection: refused before anything is written -------------------------------------------


@pytest.mark.parametrize(("key", "shape"), [("norm.weight", (5,)), ("step", ())],
                         ids=["1-D", "scalar"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_transpose_rule_hitting_a_non_matrix_is_exit_2(tmp_path, runner, key, shape, suffix):
    sd = {**_state_dict(), key: torch.randn(shape)}
    src = tmp_path / f"m{suffix}"
    if suffix == ".pt":
        torch.save(sd, src)
    else:
        save_file(sd, str(src))
    before = _listing(tmp_path)
    res = runner("to-linear", src, "-o", tmp_path / "o.safetensors", "--layers", key)
    assert_refused(res, 2, f"'{key}'")
    assert _listing(tmp_path) == before


def _tied_gpt(tmp_path: Path) -> Path:
    """A GPT-like .pt: lm_head.weight is the embedding table itself (one tensor, two names)."""
    g = torch.Generator().manual_seed(2)
    wte = torch.randn(11, 4, generator=g)
    sd = {"wte.weight": wte, "h.fc.weight": torch.randn(4, 6, generator=g),
          "h.fc.bias": torch.randn(6, generator=g), "lm_head.weight": wte}
    src = tmp_path / "gpt.pt"
    torch.save(sd, src)
    return src


def test_tied_embedding_and_lm_head_keep_both_names(tmp_path, runner):
    src = _tied_gpt(tmp_path)
    res = runner("to-linear", src, "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 0, res.stderr
    out = load_file(tmp_path / "o.safetensors")
    orig = torch.load(src, weights_only=True)
    assert torch.equal(out["wte.weight"], orig["wte.weight"])  # an embedding is not transposed
    assert torch.equal(out["lm_head.weight"], out["wte.weight"])
    with open(tmp_path / "o.safetensors", "rb") as f:
        header = f.read(8 + int.from_bytes(f.read(8), "little"))
    assert b'\\"tied\\":[[\\"wte.weight\\",\\"lm_head.weight\\"]]' in header
    res = runner("to-linear", src, "-o", tmp_path / "o.pt")
    assert res.exit_code == 0, res.stderr
    back = torch.load(tmp_path / "o.pt", weights_only=True)
    assert back["wte.weight"].data_ptr() == back["lm_head.weight"].data_ptr()


def test_transposing_one_name_of_a_tied_pair_is_exit_2(tmp_path, runner):
    src = _tied_gpt(tmp_path)
    before = _listing(tmp_path)
    res = runner("to-linear", src, "-o", tmp_path / "o.safetensors", "--layers",
                 "lm_head.weight")
    assert_refused(res, 2, "lm_head.weight", "wte.weight", "tied")
    assert _listing(tmp_path) == before


# --- NaN and Inf ----------------------------------------------------------------------------


def _special_values() -> dict[str, torch.Tensor]:
    w = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    w[0, 1] = float("nan")
    w[1, 2] = float("inf")
    w[2, 0] = -float("inf")
    w[2, 4] = -0.0
    bits = w.view(torch.int32)
    bits[1, 0] = 0x7FC01234  # a NaN with a payload: bits must survive, not just NaN-ness
    b = torch.tensor([float("nan"), 0.0, float("inf"), 1.0, -0.0])
    return {"l.weight": w, "l.bias": b}


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_nan_and_inf_convert_unchanged_and_verify(tmp_path, runner, suffix):
    sd = _special_values()
    src = tmp_path / f"nan{suffix}"
    if suffix == ".pt":
        torch.save(sd, src)
    else:
        save_file(sd, str(src))
    dst = tmp_path / f"lin{suffix}"
    res = runner("to-linear", src, "-o", dst)
    assert res.exit_code == 0, res.stderr
    assert "verified equivalent" in res.stderr
    out = torch.load(dst, weights_only=True) if suffix == ".pt" else load_file(dst)
    assert torch.equal(out["l.weight"].view(torch.int32),
                       sd["l.weight"].t().contiguous().view(torch.int32))
    assert torch.equal(out["l.bias"].view(torch.int32), sd["l.bias"].view(torch.int32))
    assert runner("verify", src, dst).exit_code == 0
    # a NaN moved to another position is a difference, not "NaN == NaN"
    moved = {k: v.clone() for k, v in out.items()}
    moved["l.weight"][0, 0], moved["l.weight"][1, 0] = moved["l.weight"][1, 0].clone(), 0.5
    save_file(moved, str(tmp_path / "moved.safetensors"))
    res = runner("verify", src, tmp_path / "moved.safetensors", "--layers", "l.weight")
    assert res.exit_code == 1, res.stdout + res.stderr
