"""The streaming executor: same content as the naive way, official reader, every source kind."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst
from safetensors.torch import load_file, save_file

import convert
from convert.checkpoint import open_checkpoint
from convert.formats import safetensors as st_format

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _checkpoint(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"wte.weight": torch.randn(11, 4, generator=g)}
    for i, dtype in enumerate(DTYPES):
        sd[f"h.{i}.fc.weight"] = torch.randn(4, 7, generator=g).to(dtype)
        sd[f"h.{i}.fc.bias"] = torch.randn(7, generator=g).to(dtype)
        sd[f"h.{i}.step"] = torch.tensor([i])
    return sd


def _naive(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.t().contiguous() if k.endswith("fc.weight") else v) for k, v in sd.items()}


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_streamed_safetensors_equal_the_naive_conversion(tmp_path):
    sd = _checkpoint()
    save_file(sd, str(tmp_path / "a.safetensors"))
    convert.to_linear(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    want = load_file(tmp_path / "a.safetensors")  # the official reader's order
    _assert_same(load_file(tmp_path / "b.safetensors"), _naive(want))


def test_pt_source_streams_from_file_ranges(tmp_path):
    sd = _checkpoint()
    sd["view"] = torch.randn(10, 10)[3:5]  # a contiguous view with a storage offset
    torch.save(sd, tmp_path / "a.pt")
    with open_checkpoint(tmp_path / "a.pt") as ckpt:
        for k, t in sd.items():
            loc = ckpt.raw_range(k)
            assert loc is not None, k
            raw = bytearray(t.numel() * t.element_size())
            st_format.read_into(loc[0], loc[1], memoryview(raw))
            assert bytes(raw) == t.contiguous().view(-1).view(torch.uint8).numpy().tobytes(), k
    convert.to_linear(tmp_path / "a.pt", tmp_path / "b.safetensors", exclude=["view"])
    _assert_same(load_file(tmp_path / "b.safetensors"), _naive(sd))


def test_legacy_pt_has_no_file_ranges_and_still_converts(tmp_path):
    sd = _checkpoint()
    torch.save(sd, tmp_path / "a.pt", _use_new_zipfile_serialization=False)
    with open_checkpoint(tmp_path / "a.pt") as ckpt:
        assert ckpt.raw_range("wte.weight") is None
    convert.to_linear(tmp_path / "a.pt", tmp_path / "b.safetensors")
    _assert_same(load_file(tmp_path / "b.safetensors"), _naive(sd))


def test_copy_fallback_writes_the_same_bytes(tmp_path, monkeypatch):
    sd = _checkpoint()
    save_file(sd, str(tmp_path / "a.safetensors"))
    convert.to_linear(tmp_path / "a.safetensors", tmp_path / "fast.safetensors")
    monkeypatch.setattr(st_format, "USE_COPY_FILE_RANGE", False)
    convert.to_linear(tmp_path / "a.safetensors", tmp_path / "slow.safetensors")
    assert (tmp_path / "fast.safetensors").read_bytes() == \
        (tmp_path / "slow.safetensors").read_bytes()


def test_sharded_to_sharded_streams_shard_by_shard(tmp_path):
    sd = _checkpoint()
    save_file(_naive(sd), str(tmp_path / "lin.safetensors"))
    convert.to_param(tmp_path / "lin.safetensors", tmp_path / "param", max_shard_size="150B",
                     layers=["*.fc.weight"])
    index = json.loads((tmp_path / "param" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    convert.to_linear(tmp_path / "param", tmp_path / "again", max_shard_size="150B")
    back = open_checkpoint(tmp_path / "again")
    assert back.sharded
    got = {k: back.tensor(k) for k in back.specs}
    back.close()
    _assert_same(dict(sorted(got.items())), dict(sorted(_naive(sd).items())))


@settings(deadline=None, max_examples=20)
@given(
    layers=hst.lists(hst.tuples(hst.integers(1, 6), hst.integers(1, 6),
                                hst.sampled_from(DTYPES), hst.booleans()),
                     min_size=1, max_size=5),
    seed=hst.integers(0, 2**16),
)
def test_round_trip_property(tmp_path_factory, layers, seed):
    """to-param(to-linear(x)) == x bit for bit, and every conversion verifies equivalent."""
    folder = tmp_path_factory.mktemp("prop")
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (n_in, n_out, dtype, square) in enumerate(layers):
        n_out = n_in if square else n_out
        sd[f"l{i}.weight"] = torch.randn(n_in, n_out, generator=g).to(dtype)
        sd[f"l{i}.bias"] = torch.randn(n_out, generator=g).to(dtype)
    save_file(sd, str(folder / "p.safetensors"))
    selected = [f"l{i}.weight" for i, layer in enumerate(layers)
                if layer[3] or layer[0] == layer[1]]
    report = convert.to_linear(folder / "p.safetensors", folder / "l.safetensors",
                               layers=selected)
    assert report.verification.equivalent
    assert len(report.plan.transposed) == len(layers)
    back = convert.to_param(folder / "l.safetensors", folder / "b.safetensors")
    assert back.verification.equivalent
    _assert_same(load_file(folder / "b.safetensors"), load_file(folder / "p.safetensors"))


def test_two_runs_write_identical_bytes(tmp_path):
    sd = _checkpoint()
    save_file(sd, str(tmp_path / "a.safetensors"))
    convert.to_linear(tmp_path / "a.safetensors", tmp_path / "1.safetensors")
    convert.to_linear(tmp_path / "a.safetensors", tmp_path / "2.safetensors")
    assert (tmp_path / "1.safetensors").read_bytes() == (tmp_path / "2.safetensors").read_bytes()


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_source_is_never_modified(tmp_path, fmt):
    sd = _checkpoint()
    src = tmp_path / f"a.{fmt}"
    if fmt == "pt":
        torch.save(sd, src)
    else:
        save_file(sd, str(src))
    before = src.read_bytes()
    convert.to_linear(src, tmp_path / "b.safetensors")
    convert.to_linear(src, tmp_path / "b.pt")
    assert src.read_bytes() == before


def test_a_legacy_pt_source_keeps_a_tied_tensor_it_released(tmp_path, runner):
    """A non-zip torch.save file is read into memory torch allocated, not mapped: releasing a
    tensor's pages there would zero them, and its tie (written after it) would read zeros."""
    import torch
    from safetensors.torch import load_file

    torch.manual_seed(0)
    emb = torch.randn(2000, 1024)  # 8 MB: whole pages to release
    sd = {"wte.weight": emb, "fc.weight": torch.randn(8, 6), "fc.bias": torch.randn(6),
          "lm_head.weight": emb}
    src = tmp_path / "legacy.pt"
    torch.save(sd, src, _use_new_zipfile_serialization=False)
    res = runner("to-linear", src, "-o", tmp_path / "out.safetensors", "--no-verify")
    assert res.exit_code == 0, res.stderr
    out = load_file(tmp_path / "out.safetensors")
    assert torch.equal(out["wte.weight"], emb) and torch.equal(out["lm_head.weight"], emb)


def _sha256(path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_command_lines_early_hash_is_taken_only_for_the_same_file(tmp_path):
    """The command line hashes SRC as it starts; a conversion takes that hash only if it is
    of the file it opened: a file changed (or replaced) between gets a hash of its own."""
    import os

    from convert import digest

    a = tmp_path / "a.safetensors"
    save_file(_checkpoint(1), str(a))
    digest.start_early(a)
    early = digest._early[1]
    assert digest.hash_files((a,)) is early and early.result() == _sha256(a)
    digest.start_early(a)
    early = digest._early[1]
    save_file(_checkpoint(2), str(tmp_path / "b.safetensors"))
    os.replace(tmp_path / "b.safetensors", a)  # another file under the same name
    fresh = digest.hash_files((a,))
    assert fresh is not early and early._cancelled.is_set()
    assert fresh.result() == _sha256(a)
    digest.start_early(a)
    shards = (a, tmp_path / "c.bin")
    shards[1].write_bytes(b"x" * 100)
    both = digest.hash_files(shards)  # not the one file hashed early
    assert both.result() == _sha256_all(shards)


def _sha256_all(paths) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def test_no_early_hash_of_what_is_not_a_regular_file(tmp_path):
    """A FIFO (or a folder) named as SRC is not opened by the early hash (it would block)."""
    import os

    from convert import digest

    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    digest.start_early(fifo)
    digest.start_early(tmp_path)
    assert digest._early is None


def test_an_early_hash_nobody_takes_stops(tmp_path):
    import threading

    from convert import digest

    a = tmp_path / "a.safetensors"
    a.write_bytes(b"\0" * (3 * digest.CHUNK))
    stopped = threading.Event()
    stopped.set()
    assert digest.sha256_files((a,), stopped) == ""  # a stopped hash reads no further
    digest.start_early(a)
    hasher = digest._early[1]
    digest.stop_early()
    assert hasher._cancelled.is_set() and digest._early is None
    hasher.join(timeout=60)


def test_the_command_line_records_the_sources_sha256(tmp_path, runner):
    src = tmp_path / "m.safetensors"
    save_file(_checkpoint(3), str(src))
    dst = tmp_path / "o.safetensors"
    res = runner("to-linear", src, "-o", dst, "--layers", "*.fc.weight")
    assert res.exit_code == 0, res.stderr
    with open_checkpoint(dst) as d:
        assert d.provenance.source_sha256 == _sha256(src)
