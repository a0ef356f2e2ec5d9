"""Readers and writers at the byte level: safetensors headers, shard indexes, our writer."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from huggingface_hub import save_torch_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert
from convert.checkpoint import open_checkpoint
from convert.errors import CorruptInputError, UnsafeInputError
from convert.formats import safetensors as st


def _raw(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


@pytest.mark.parametrize(("blob", "needle"), [
    (b"", "fewer than the 8-byte"),
    (b"\x05\x00\x00", "fewer than the 8-byte"),
    (struct.pack("<Q", 200_000_000) + b"{}", "more than the 100000000"),
    (struct.pack("<Q", 50) + b"{}", "truncated"),
    (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
     "cover 8 bytes"),
    (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
     "span 4 bytes"),
    (_raw({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "unknown dtype"),
    (_raw({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "invalid shape"),
    (_raw({"a": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]},
           "b": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}, b"\0" * 3),
     "gap or overlap"),
    (_raw({"__metadata__": {"k": 1}}), "strings to strings"),
    (struct.pack("<Q", 4) + b"[1] ", "not a JSON object"),
    (struct.pack("<Q", 3) + b"{x}", "not valid JSON"),
    (struct.pack("<Q", 16) + b'{"a":1, "a":2}  ', "duplicate key"),
])
def test_malformed_headers_are_corrupt_input(tmp_path, blob, needle):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(CorruptInputError, match=needle) as e:
        st.read_header(path)
    assert e.value.exit_code == 4
    assert str(path) in str(e.value)


def test_header_with_huge_shape_is_refused_without_allocating(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(_raw({"a": {"dtype": "F32", "shape": [2**40, 2**40],
                                 "data_offsets": [0, 4]}}, b"\0" * 4))
    with pytest.raises(CorruptInputError, match="data_offsets span"):
        convert.inspect_checkpoint(path)


def test_writer_output_is_read_by_the_official_library(tmp_path):
    path = tmp_path / "w.safetensors"
    entries = [("b", "F16", (2, 3)), ("a", "I64", (2,)), ("z", "BOOL", (0,))]
    data = {"b": torch.randn(2, 3).half(), "a": torch.tensor([1, 2]),
            "z": torch.zeros(0, dtype=torch.bool)}
    with st.SafetensorsWriter(path, entries, {"format": "pt", "x": "y"}, overwrite=False) as w:
        for name, _, _ in entries:
            w.write(data[name].contiguous().view(torch.uint8).numpy().tobytes())
        w.finish({"format": "pt", "x": "z"})
        w.commit()
    got = load_file(path)
    assert list(st.read_header(path).tensors) == ["b", "a", "z"]  # our order is kept
    for k in data:
        assert torch.equal(got[k], data[k])
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"format": "pt", "x": "z"}
    assert (len(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])
            % 8 == 0)


def test_writer_leaves_nothing_when_it_fails(tmp_path):
    path = tmp_path / "w.safetensors"
    with pytest.raises(RuntimeError), \
            st.SafetensorsWriter(path, [("a", "F32", (2,))], {}, overwrite=False) as w:
        w.write(b"\0" * 4)  # half the planned bytes
        w.finish({})
    assert list(tmp_path.iterdir()) == []


def _hf_sharded(tmp_path, sd):
    folder = tmp_path / "hf"
    folder.mkdir()
    save_torch_state_dict(sd, folder, max_shard_size=200)
    return folder


def _state_dict():
    torch.manual_seed(0)
    return {f"layers.{i}.fc.weight": torch.randn(3, 5) for i in range(3)} | {
        f"layers.{i}.fc.bias": torch.randn(5) for i in range(3)}


def test_reads_huggingface_hub_sharded_checkpoint(tmp_path):
    sd = _state_dict()
    folder = _hf_sharded(tmp_path, sd)
    assert (folder / "model.safetensors.index.json").exists()
    with open_checkpoint(folder) as ckpt:
        assert ckpt.sharded and set(ckpt.specs) == set(sd)
        assert len(ckpt.files) >= 2


def test_sharded_folder_converts_to_a_folder_and_back(tmp_path):
    sd = _state_dict()
    folder = _hf_sharded(tmp_path, sd)
    (folder / "config.json").write_text("{}")
    report = convert.to_linear(folder, max_shard_size="100B")
    out = tmp_path / "hf.linear"
    assert report.destination == str(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and shards[0].startswith("model-00001-of-")
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in sd.values())
    assert (out / "config.json").exists()
    for name in shards:  # every shard carries provenance listing its own keys
        with safe_open(out / name, "pt") as f:
            prov = json.loads(f.metadata()["linconvert"])
            assert set(prov["keys"]) == set(f.keys())
    convert.to_param(out, tmp_path / "back.safetensors")
    back = load_file(tmp_path / "back.safetensors")
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def _index_folder(tmp_path, weight_map, total=None):
    folder = tmp_path / "idx"
    folder.mkdir(exist_ok=True)
    save_file({"a.weight": torch.randn(3, 5), "a.bias": torch.randn(5)},
              str(folder / "s1.safetensors"))
    meta = {"total_size": total} if total is not None else {}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": meta, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize(("weight_map", "total", "error", "needle"), [
    ({"a.weight": "s1.safetensors"}, None, CorruptInputError, "does not map there"),
    ({"a.weight": "s1.safetensors", "a.bias": "s1.safetensors", "c": "s1.safetensors"}, None,
     CorruptInputError, "which lacks it"),
    ({"a.weight": "s1.safetensors", "a.bias": "s2.safetensors"}, None, CorruptInputError,
     "missing"),
    ({"a.weight": "s1.safetensors", "a.bias": "s1.safetensors"}, 7, CorruptInputError,
     "total_size"),
    ({"a.weight": "../s1.safetensors"}, None, UnsafeInputError, "outside its folder"),
    ({"a.weight": "/etc/passwd"}, None, UnsafeInputError, "outside its folder"),
])
def test_inconsistent_index_is_refused(tmp_path, weight_map, total, error, needle):
    folder = _index_folder(tmp_path, weight_map, total)
    with pytest.raises(error, match=needle):
        open_checkpoint(folder)


def test_index_shard_symlink_escaping_the_folder_is_unsafe(tmp_path):
    outside = tmp_path / "outside.safetensors"
    save_file({"a.weight": torch.randn(3, 5)}, str(outside))
    folder = tmp_path / "idx"
    folder.mkdir()
    os.symlink(outside, folder / "s1.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a.weight": "s1.safetensors"}}))
    with pytest.raises(UnsafeInputError):
        open_checkpoint(folder)


def test_sharded_bin_index(tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save({"a.weight": torch.randn(3, 5), "a.bias": torch.randn(5)},
               folder / "pytorch_model-00001-of-00002.bin")
    torch.save({"b.weight": torch.randn(5, 3), "b.bias": torch.randn(5)},
               folder / "pytorch_model-00002-of-00002.bin")
    wm = {"a.weight": "pytorch_model-00001-of-00002.bin", "a.bias":
          "pytorch_model-00001-of-00002.bin", "b.weight": "pytorch_model-00002-of-00002.bin",
          "b.bias": "pytorch_model-00002-of-00002.bin"}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    report = convert.to_linear(folder, tmp_path / "o.safetensors")
    assert [a.source for a in report.plan.transposed] == ["a.weight"]
    b_weight = next(a for a in report.plan.actions if a.source == "b.weight")
    assert b_weight.reason.endswith("already linear")


def test_legacy_non_zip_torch_save_is_read(tmp_path):
    src = tmp_path / "legacy.pt"
    torch.save({"l.weight": torch.randn(3, 5), "l.bias": torch.randn(5)}, src,
               _use_new_zipfile_serialization=False)
    convert.to_linear(src, tmp_path / "o.safetensors")
    assert load_file(tmp_path / "o.safetensors")["l.weight"].shape == (5, 3)


def test_unknown_suffix_recognised_by_first_bytes(tmp_path):
    src = tmp_path / "weights.data"
    save_file({"l.weight": torch.randn(3, 5), "l.bias": torch.randn(5)}, str(src))
    report = convert.to_linear(src)
    assert report.destination == str(tmp_path / "weights.linear.safetensors")


def test_named_sharded_output_and_its_index(tmp_path):
    sd = _state_dict()
    save_file(sd, str(tmp_path / "src.safetensors"))
    convert.to_linear(tmp_path / "src.safetensors", tmp_path / "x.safetensors",
                      max_shard_size="100B")
    index = json.loads((tmp_path / "x.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files[0] == f"x-00001-of-{len(files):05d}.safetensors" and len(files) > 1
    assert sorted(index["weight_map"]) == sorted(sd)  # every key once
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in sd.values())
    assert not (tmp_path / "x.safetensors").exists()
    report = convert.to_param(tmp_path / "x.safetensors.index.json",
                              tmp_path / "back.safetensors")
    assert report.verification.equivalent
    back = load_file(tmp_path / "back.safetensors")
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # an existing sharded output is refused without --overwrite
    with pytest.raises(convert.OutputError):
        convert.to_linear(tmp_path / "src.safetensors", tmp_path / "x.safetensors",
                          max_shard_size="100B")


def test_overwriting_a_sharded_output_removes_its_leftover_shards(tmp_path):
    sd = _state_dict()
    save_file(sd, str(tmp_path / "src.safetensors"))
    convert.to_linear(tmp_path / "src.safetensors", tmp_path / "out", max_shard_size="50B")
    before = sorted(p.name for p in (tmp_path / "out").glob("model-*"))
    (tmp_path / "out" / "notes.txt").write_text("mine")
    convert.to_linear(tmp_path / "src.safetensors", tmp_path / "out", max_shard_size="1MB",
                      overwrite=True)
    after = sorted(p.name for p in (tmp_path / "out").glob("model-*"))
    assert len(before) > 1 and after == ["model-00001-of-00001.safetensors"]
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"  # other files left alone


def test_a_killed_sharded_writes_temporaries_are_removed_whatever_their_count(tmp_path):
    sd = _state_dict()
    save_file(sd, str(tmp_path / "src.safetensors"))
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / ".model-00002-of-00007.safetensors.partial",
             out / ".model-00001-of-00003.safetensors.partial"]
    for p in stale:
        p.write_bytes(b"left by a killed run")
    (out / ".notes.partial").write_text("not ours")
    convert.to_linear(tmp_path / "src.safetensors", out, max_shard_size="100B")
    assert not any(p.exists() for p in stale)
    assert (out / ".notes.partial").exists()
