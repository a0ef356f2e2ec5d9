"""`.pt` output streamed in torch.save's own zip format: byte for byte what torch.save writes for
the in-memory state dict, loadable with weights_only=True and mmap=True, extras and shared
storages kept, and nothing left behind when a write fails."""

from __future__ import annotations

import errno
import io
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import convert
from convert import execute
from convert.checkpoint import open_checkpoint
from convert.errors import OutputError
from convert.formats import pt_writer, torch_pt

ROOT = Path(__file__).resolve().parent.parent
IN, OUT = 3, 5
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn,
          torch.float8_e5m2, torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64,
          torch.bool, torch.uint16, torch.complex64]


def _normalized(data: bytes) -> bytes:
    """DATA with the serialization id's value and CRC zeroed: its first half hashes record
    names with the C++ library's string hash, the one thing linconvert does not reproduce."""
    out = bytearray(data)
    info = zipfile.ZipFile(io.BytesIO(data)).getinfo("archive/.data/serialization_id")
    o = info.header_offset
    name_len, extra_len = struct.unpack("<HH", out[o + 26:o + 30])
    start = o + 30 + name_len + extra_len
    out[start:start + 40] = b"0" * 40
    out[start + 44:start + 48] = bytes(4)  # the data descriptor's CRC
    central = out.rfind(b"PK\x01\x02", 0, out.rfind(b"archive/.data/serialization_id"))
    out[central + 16:central + 20] = bytes(4)
    return bytes(out)


def _torch_save_bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _in_memory(src: Path, **options) -> object:
    """What the in-memory path gave torch.save: the converted state dict (transposes made
    contiguous, the source's other tensors as loaded), in its checkpoint, with its extras."""
    plan = convert.to_linear(src, src.with_suffix(".unused.pt"), dry_run=True, **options).plan
    ckpt = open_checkpoint(src)
    sd = execute._convert_state_dict(plan, ckpt.tensor, ckpt)
    if isinstance(ckpt, torch_pt.TorchSource):
        sd.update({execute.plan_target(plan, k): v for k, v in ckpt.non_tensors.items()})
        if ckpt.key_paths[0]:
            root = torch_pt.replace_at(ckpt.roots[0], ckpt.key_paths[0], sd)
            return execute._convert_extras(plan, ckpt, root)[0]
    return sd


def _assert_same_file_as_torch_save(dst: Path, obj: object) -> None:
    assert _normalized(dst.read_bytes()) == _normalized(_torch_save_bytes(obj))


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8)


def _assert_equal(a: object, b: object) -> None:
    """Equal bit for bit: tensors by dtype, shape and bytes; containers recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(_bytes_of(a), _bytes_of(b))
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_equal(x, y)
    else:
        assert a == b


def _assert_loads(dst: Path) -> dict:
    """torch's own reader, both ways; every record's CRC and alignment checked by zipfile."""
    eager = torch.load(dst, weights_only=True)
    mapped = torch.load(dst, weights_only=True, mmap=True)
    _assert_equal(eager, mapped)
    with zipfile.ZipFile(dst) as z:
        assert z.testzip() is None  # every CRC-32 right
        raw = dst.read_bytes()
        for info in z.infolist():
            o = info.header_offset
            name_len, extra_len = struct.unpack("<HH", raw[o + 26:o + 30])
            assert (o + 30 + name_len + extra_len) % 64 == 0, info.filename
    return eager


def _convert_and_check(src: Path, dst: Path, **options) -> dict:
    """Convert SRC into DST (verified), check it is the in-memory result's file byte for byte,
    loads both ways, and holds the same tensors; the loaded checkpoint."""
    convert.to_linear(src, dst, **options)
    expected = _in_memory(src, **options)
    _assert_same_file_as_torch_save(dst, expected)
    loaded = _assert_loads(dst)
    _assert_equal(loaded, expected)
    return loaded


def _param_mlp(tmp_path: Path, dtype: torch.dtype = torch.float32, name: str = "m") -> Path:
    g = torch.Generator().manual_seed(0)
    sd = {"fc1.weight": torch.randn(IN, OUT, generator=g).to(dtype),
          "fc1.bias": torch.randn(OUT, generator=g).to(dtype),
          "fc2.weight": torch.randn(OUT, IN, generator=g).to(dtype),
          "fc2.bias": torch.randn(IN, generator=g).to(dtype),
          "norm.weight": torch.ones(IN, dtype=dtype), "steps": torch.tensor(7),
          "mask": torch.tensor([True, False, True]), "codes": torch.arange(6, dtype=torch.int8),
          "empty": torch.zeros(0, 4), "scale": torch.tensor(0.5)}
    path = tmp_path / f"{name}.safetensors"
    save_file(sd, str(path))
    return path


# --- the archive itself ------------------------------------------------------------------------

@pytest.mark.parametrize("stand_ins", [False, True], ids=["torch-names", "no-torch"])
def test_archive_of_tensor_refs_is_torch_saves_bytes(tmp_path, stand_ins):
    """Every dtype, 0-dim and empty tensors; pickled with torch's own objects, and with the
    stand-ins used where torch is not imported."""
    g = torch.Generator().manual_seed(1)
    sd = {f"t{i}": torch.randn(2, 3, generator=g).to(d) for i, d in enumerate(DTYPES)}
    sd |= {"scalar": torch.tensor(3.0), "rows0": torch.zeros(0, 3), "cols0": torch.zeros(3, 0),
           "f8scalar": torch.tensor(1.0).to(torch.float8_e4m3fn)}
    tree = {k: pt_writer.TensorRef(pt_writer.storage_for(str(v.dtype).removeprefix("torch."),
                                                         v.element_size(), tuple(v.shape), v),
                                   tuple(v.shape)) for k, v in sd.items()}
    data, records = pt_writer.pickle_checkpoint(tree, None if stand_ins else torch)
    dst = tmp_path / "o.pt"
    with pt_writer.PtWriter(dst, overwrite=False) as w:
        w.start(data)
        for r in records:
            w.begin(f"data/{r.key}", r.nbytes)
            t = r.storage.source
            if t.numel():
                w.write(t.reshape(-1).view(torch.uint8).numpy())
            w.end()
        w.finish()
        w.commit(sync=False)
    _assert_same_file_as_torch_save(dst, sd)
    _assert_equal(_assert_loads(dst), sd)
    ours = zipfile.ZipFile(dst).read("archive/.data/serialization_id")
    theirs = zipfile.ZipFile(io.BytesIO(_torch_save_bytes(sd))).read(
        "archive/.data/serialization_id")
    assert ours[20:] == theirs[20:]  # the combined CRC-32s, as torch computes them


def test_storage_classes_are_torchs():
    """The table that names storages without torch agrees with torch's own."""
    legacy = {str(d).removeprefix("torch."): name
              for d, name in torch.storage._dtype_to_storage_type_map().items()
              if not str(d).startswith(("torch.qint", "torch.quint"))}
    assert legacy == pt_writer._STORAGE_CLASS
    assert not {str(d).removeprefix("torch.") for d in torch.storage._new_dtypes()} & set(legacy)


def test_zip64_records_load(tmp_path, monkeypatch):
    """Past 4 GiB, sizes and offsets go in ZIP64 fields (tried here with the threshold
    lowered): torch, mapped or not, and zipfile read every record."""
    monkeypatch.setattr(pt_writer, "ZIP64_AT", 600)
    src = _param_mlp(tmp_path)
    dst = tmp_path / "o.pt"
    convert.to_linear(src, dst, verify=False)
    raw = dst.read_bytes()
    assert b"\x01\x00\x08\x00" in raw or b"\x01\x00\x10\x00" in raw  # ZIP64 extra fields
    loaded = _assert_loads(dst)
    assert torch.equal(loaded["fc1.weight"], _in_memory(src)["fc1.weight"])


# --- conversions --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16,
                                   torch.float8_e4m3fn])
def test_safetensors_to_pt_is_the_in_memory_result_byte_for_byte(tmp_path, dtype):
    loaded = _convert_and_check(_param_mlp(tmp_path, dtype), tmp_path / "o.pt")
    assert loaded["fc1.weight"].shape == (OUT, IN)


def _training_checkpoint(tmp_path: Path) -> Path:
    """Nested state dict, a tie, a view with an offset, a non-contiguous kept tensor, a
    non-tensor entry, epoch, optimizer state with param_names, an EMA copy."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(IN, OUT, generator=g)
    table = torch.randn(10, 4, generator=g)
    model = {"fc.weight": w, "fc.bias": torch.randn(OUT, generator=g), "head.weight": w,
             "emb.weight": table[2:5], "pos.weight": table[6:9], "rot": torch.randn(4, 6,
                                                                                 generator=g).t(),
             "version": 2}
    ema = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in model.items()}
    opt = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(IN, OUT, generator=g),
                         "exp_avg_sq": torch.rand(IN, OUT, generator=g)},
                     1: {"step": torch.tensor(3.0), "exp_avg": torch.randn(OUT, generator=g)}},
           "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "params": [0, 1],
                             "param_names": ["fc.weight", "fc.bias"]}]}
    path = tmp_path / "train.pt"
    torch.save({"epoch": 4, "optimizer": opt, "model": model, "ema": ema,
                "meta": {"note": "run 7", "tags": ["a", "b"]}}, path)
    return path


def test_pt_to_pt_keeps_extras_ties_and_views_byte_for_byte(tmp_path):
    loaded = _convert_and_check(_training_checkpoint(tmp_path), tmp_path / "o.pt",
                                layers=["fc.weight", "head.weight"])
    m = loaded["model"]
    assert m["fc.weight"].shape == (OUT, IN) and m["head.weight"] is m["fc.weight"]  # tied
    assert m["emb.weight"].untyped_storage().data_ptr() == \
        m["pos.weight"].untyped_storage().data_ptr()  # one storage, two views
    assert m["pos.weight"].storage_offset() == 24 and not m["rot"].is_contiguous()
    assert loaded["epoch"] == 4 and loaded["meta"] == {"note": "run 7", "tags": ["a", "b"]}
    assert loaded["optimizer"]["state"][0]["exp_avg"].shape == (OUT, IN)  # followed its weight
    assert loaded["ema"]["fc.weight"].shape == (OUT, IN)


def test_kept_storages_of_a_pt_source_are_copied_unread(tmp_path, monkeypatch):
    """A kept storage is a whole record of the source archive: copied by the kernel with the
    CRC-32 the source recorded (the byte-for-byte tests check both)."""
    copied = []
    real = pt_writer.PtWriter.copy_whole
    monkeypatch.setattr(pt_writer.PtWriter, "copy_whole",
                        lambda self, *a: (copied.append(a[2]), real(self, *a)))
    _convert_and_check(_training_checkpoint(tmp_path), tmp_path / "o.pt",
                       layers=["fc.weight", "head.weight"])
    assert 40 * 4 in copied  # the table the two views share, once


def test_legacy_pt_source_is_written_from_memory_byte_for_byte(tmp_path):
    """A pre-1.6 (non-zip) torch.save file cannot be mapped: its kept storages are written
    from memory, shared ones still once."""
    g = torch.Generator().manual_seed(5)
    table = torch.randn(8, 4, generator=g)
    sd = {"fc.weight": torch.randn(IN, OUT, generator=g), "fc.bias": torch.randn(OUT, generator=g),
          "a": table[:3], "b": table[5:]}
    src = tmp_path / "legacy.pt"
    torch.save(sd, src, _use_new_zipfile_serialization=False)
    loaded = _convert_and_check(src, tmp_path / "o.pt")
    assert loaded["a"].untyped_storage().data_ptr() == loaded["b"].untyped_storage().data_ptr()


def test_param_linear_param_round_trip_through_pt_is_bit_exact(tmp_path):
    src = _training_checkpoint(tmp_path)
    there, back = tmp_path / "linear.pt", tmp_path / "param.pt"
    convert.to_linear(src, there, layers=["fc.weight", "head.weight"])
    convert.to_param(there, back, layers=["fc.weight", "head.weight"])
    _assert_equal(torch.load(back, weights_only=True), torch.load(src, weights_only=True))


def test_stacks_and_splits_stream_into_pt(tmp_path):
    g = torch.Generator().manual_seed(3)
    sd = {f"layers.0.experts.{e}.w1.weight": torch.randn(OUT, IN, generator=g) for e in range(3)}
    sd |= {"attn.c_attn.weight": torch.randn(3 * IN, IN, generator=g),
           "attn.c_attn.bias": torch.randn(3 * IN, generator=g)}
    src = tmp_path / "moe.safetensors"
    save_file(sd, str(src))
    options = {"stack": [("layers.{l}.experts.{e}.w1.weight", "layers.{l}.experts.w1")],
               "split": [("attn.c_attn.weight", ["attn.q.weight", "attn.k.weight",
                                                 "attn.v.weight"])],
               "layers": ["layers.*.experts.*.weight"]}
    dst = tmp_path / "o.pt"
    convert.to_param(src, dst, **options)
    plan = convert.to_param(src, tmp_path / "x.pt", dry_run=True, **options).plan
    with open_checkpoint(src) as ckpt:
        expected = execute._convert_state_dict(plan, ckpt.tensor, ckpt)
    _assert_same_file_as_torch_save(dst, expected)
    _assert_equal(_assert_loads(dst), expected)


_DTYPE = st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.bool,
                          torch.int64, torch.float8_e5m2])
_SHAPE = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.dictionaries(st.from_regex(r"[a-z]{1,6}(\.[a-z]{1,4})?", fullmatch=True),
                             st.tuples(_SHAPE, _DTYPE), max_size=6),
       sizes=st.tuples(st.integers(1, 6), st.integers(1, 6)).filter(lambda s: s[0] != s[1]),
       seed=st.integers(0, 2**16))
def test_random_state_dicts_match_torch_save(tmp_path_factory, extra, sizes, seed):
    """Random keys, shapes (0-dim and empty too) and dtypes beside one linear layer: the
    streamed file is torch.save's, and torch.load reads the same tensors back."""
    folder = tmp_path_factory.mktemp("h")
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, (shape, dtype) in extra.items():
        if key.startswith("fc.") or (len(shape) >= 2 and dtype.is_floating_point):
            continue  # a matrix with no evidence would only be warned about; keep it simple
        sd[key] = (torch.rand(shape, generator=g) * 4).to(dtype)
    sd["fc.weight"] = torch.randn(*sizes, generator=g)
    sd["fc.bias"] = torch.randn(sizes[1], generator=g)
    src = folder / "r.safetensors"
    save_file(sd, str(src))
    _convert_and_check(src, folder / "r.pt", verify=False)


def test_safetensors_to_pt_does_not_import_torch(tmp_path):
    src = _param_mlp(tmp_path)
    code = ("import sys, convert; convert.to_linear(sys.argv[1], sys.argv[2], verify=False); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "o.pt")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    _assert_equal(_assert_loads(tmp_path / "o.pt"), _in_memory(src))


# --- failures leave nothing ---------------------------------------------------------------------

def _fd_is(fd: int, name: str) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").endswith(name)
    except OSError:
        return False


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left"),
                                     KeyboardInterrupt(), RuntimeError("a bug")],
                         ids=["disk-full", "ctrl-c", "bug"])
@pytest.mark.parametrize("kind", ["safetensors", "pt"])
def test_a_failed_write_leaves_no_dst_and_no_temporary_file(tmp_path, monkeypatch, failure,
                                                            kind):
    src = _param_mlp(tmp_path) if kind == "safetensors" else _training_checkpoint(tmp_path)
    options = {} if kind == "safetensors" else {"layers": ["fc.weight", "head.weight"]}
    dst = tmp_path / "o.pt"
    real_write = os.write
    writes = []

    def failing(fd, data):
        if _fd_is(fd, ".o.pt.partial"):
            writes.append(len(data))
            if len(writes) == 9:  # among the storages' records
                raise failure
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", failing)
    expected = OutputError if isinstance(failure, OSError) else type(failure)
    with pytest.raises(expected, match="the disk is full" if expected is OutputError else None):
        convert.to_linear(src, dst, **options)
    assert len(writes) == 9
    assert [p.name for p in tmp_path.iterdir()] == [src.name]  # no DST, no .o.pt.partial
