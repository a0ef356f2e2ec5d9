"""torch.distributed.checkpoint folders as SRC: written by torch's own DCP (no process group),
read tensor by tensor, compared with torch's `dcp_to_torch_save`; hostile and damaged folders."""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import models
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from convert.checkpoint import open_checkpoint
from convert.formats.dcp import as_protocol_2
from tests.test_hostile import _Payload

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # DCP: "assuming one process"


def _model_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in models.ParamMLP().state_dict().items()}


def save_dcp(folder: Path, state: dict) -> Path:
    """torch's own DCP save, in this one process (no process group)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=folder)
    return folder


def torchtitan_state(sd: dict[str, torch.Tensor]) -> dict:
    """What torchtitan saves: the model, optimizer state keyed by parameter names, the step."""
    return {"model": sd,
            "optimizer": {"state": {k: {"exp_avg": torch.zeros_like(v), "step": torch.tensor(3.)}
                                    for k, v in sd.items()},
                          "param_groups": [{"lr": 1e-3, "params": list(sd)}]},
            "step": 1000}


def save_ranks(folder: Path, tensors: dict[str, torch.Tensor], splits: dict[str, tuple[int, ...]],
               ranks: int = 2, prefix: str = "model") -> Path:
    """A DCP folder as RANKS processes of a sharded training run write it: each tensor cut into
    a grid (`splits[fqn]` parts per dim: (2,) is FSDP's Shard(0), (2, 2) adds tensor
    parallelism), chunk i written by rank i % RANKS through torch's own FileSystemWriter into
    `__R_0.distcp`, with the Metadata DCP's planner makes. No process group."""
    writer = FileSystemWriter(folder, sync_files=False)
    writer.set_up_storage_writer(True)
    pieces: dict[MetadataIndex, torch.Tensor] = {}
    items: list[list[WriteItem]] = [[] for _ in range(ranks)]
    md: dict = {}
    n = 0
    for key, t in tensors.items():
        fqn = f"{prefix}.{key}"
        grid = [(0, t)]
        for dim, parts in enumerate(splits.get(key, ())):
            grid = [(o, p) for o0, q in grid for o, p in _split(q, dim, parts, o0)]
        props = TensorProperties.create_from_tensor(t)
        chunks = []
        for offsets, part in grid:
            offsets = offsets if isinstance(offsets, tuple) else (0,) * t.dim()
            chunk = ChunkStorageMetadata(torch.Size(offsets), part.shape)
            index = MetadataIndex(fqn, offsets)
            pieces[index] = part.contiguous()
            items[n % ranks].append(WriteItem(index, WriteItemType.SHARD,
                                              tensor_data=TensorWriteData(chunk, props, t.shape)))
            chunks.append(chunk)
            n += 1
        md[fqn] = TensorStorageMetadata(props, t.shape, chunks)

    class Planner:
        def resolve_data(self, item: WriteItem) -> torch.Tensor:
            return pieces[item.index]

    plans = writer.prepare_global_plan([writer.prepare_local_plan(SavePlan(i)) for i in items])
    results = [writer.write_data(p, Planner()).wait() for p in plans]
    writer.finish(Metadata(md, planner_data={f"{prefix}.{k}": (prefix, k) for k in tensors}),
                  results)
    return folder


def _split(t: torch.Tensor, dim: int, parts: int, offsets: object):
    base = list(offsets) if isinstance(offsets, tuple) else [0] * t.dim()
    start = base[dim]
    for p in t.tensor_split(parts, dim):
        o = list(base)
        o[dim] = start
        start += p.shape[dim]
        yield tuple(o), p


def reference(folder: Path, tmp_path: Path) -> dict:
    """The folder as torch's own converter sees it."""
    dcp_to_torch_save(folder, tmp_path / "ref.pt")
    return torch.load(tmp_path / "ref.pt", weights_only=False)


# --- reading ----------------------------------------------------------------------------------

def test_nested_state_reads_like_dcp_to_torch_save(tmp_path: Path) -> None:
    sd = _model_sd()
    src = save_dcp(tmp_path / "step-1000", torchtitan_state(sd))
    ref = reference(src, tmp_path)["model"]
    with open_checkpoint(src) as ckpt:
        assert ckpt.format == "dcp"
        assert list(ckpt.specs) == list(sd)
        assert set(ckpt.extras) == {"optimizer", "step"}
        for k in sd:
            assert torch.equal(ckpt.tensor(k), ref[k])
            assert torch.equal(ckpt.tensor(k), sd[k])
        assert ckpt.files[0].name == ".metadata"
    with open_checkpoint(src / ".metadata") as ckpt:  # the .metadata file names the folder too
        assert list(ckpt.specs) == list(sd)


def test_metadata_path_as_src_writes_beside_the_folder(tmp_path: Path, runner) -> None:
    sd = _model_sd()
    src = save_dcp(tmp_path / "step-5", torchtitan_state(sd))
    r = runner("to-linear", src / ".metadata", "--dry-run")
    assert r.exit_code == 0 and "step-5.linear.safetensors" in r.stdout, r.stdout + r.stderr
    r = runner("to-linear", src / ".metadata")
    assert r.exit_code == 0, r.stderr
    assert "'optimizer'" in r.stderr and "not kept in safetensors" in r.stderr
    out = load_file(tmp_path / "step-5.linear.safetensors")
    assert torch.equal(out["fc2.weight"], sd["fc2.weight"].t())
    assert runner("to-linear", src).exit_code == 5  # exists: refused without --overwrite


def test_flat_state_and_state_dict_key(tmp_path: Path, runner) -> None:
    sd = _model_sd()
    flat = save_dcp(tmp_path / "flat", dict(sd))
    with open_checkpoint(flat) as ckpt:
        assert list(ckpt.specs) == list(sd) and ckpt.extras == []
    nested = save_dcp(tmp_path / "nested", {"train": {"ema": sd}, "step": 3})
    r = runner("inspect", nested)
    assert r.exit_code == 4 and "--state-dict-key" in r.stderr
    with open_checkpoint(nested, state_dict_key="train.ema") as ckpt:
        assert list(ckpt.specs) == list(sd) and ckpt.extras == ["step"]
    r = runner("inspect", nested, "--state-dict-key", "train.nope")
    assert r.exit_code == 2 and "train.nope" in r.stderr
    dst = tmp_path / "ema.safetensors"
    assert runner("to-linear", nested, "--state-dict-key", "train.ema", "-o", dst).exit_code == 0
    assert runner("verify", nested, dst, "--state-dict-key", "train.ema").exit_code == 0


def test_one_file_per_tensor(tmp_path: Path) -> None:
    sd = _model_sd()
    src = tmp_path / "ck"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": sd}, storage_writer=FileSystemWriter(src, single_file_per_rank=False))
    assert len(list(src.glob("*.distcp"))) == len(sd)
    with open_checkpoint(src) as ckpt:
        assert len(ckpt.files) == 1 + len(sd)
        for k, v in sd.items():
            assert torch.equal(ckpt.tensor(k), v)


def test_transposed_view_and_bfloat16_kept(tmp_path: Path, runner) -> None:
    w = torch.randn(6, 4)
    sd = {"fc.weight": w.t(), "fc.bias": torch.randn(6),  # a strided view: decoded by torch
          "bf.weight": torch.randn(4, 6).bfloat16(), "bf.bias": torch.randn(6).bfloat16()}
    src = save_dcp(tmp_path / "ck", {"model": sd})
    r = runner("to-linear", src, "-o", tmp_path / "out.safetensors")
    assert r.exit_code == 0, r.stderr
    out = load_file(tmp_path / "out.safetensors")
    assert out["bf.weight"].dtype == torch.bfloat16
    assert torch.equal(out["bf.weight"], sd["bf.weight"].t())
    assert torch.equal(out["fc.weight"], w)


def test_sharded_tensors_assembled_from_every_rank(tmp_path: Path) -> None:
    torch.manual_seed(1)
    tensors = {"fc1.weight": torch.randn(8, 6), "fc1.bias": torch.randn(6),
               "tp.weight": torch.randn(6, 10), "tp.bias": torch.randn(10),
               "experts.w": torch.randn(4, 3, 5), "scalar": torch.tensor(2.5)}
    splits = {"fc1.weight": (2,), "fc1.bias": (3,), "tp.weight": (2, 2), "experts.w": (2, 1, 2)}
    src = save_ranks(tmp_path / "ck", tensors, splits, ranks=2)
    assert sorted(p.name for p in src.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    ref = reference(src, tmp_path)["model"]
    with open_checkpoint(src) as ckpt:
        assert [f.name for f in ckpt.files] == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        for k, t in tensors.items():
            assert torch.equal(ckpt.tensor(k), ref[k]) and torch.equal(ckpt.tensor(k), t)
            got = ckpt.read_bytes(k, bytearray(0)).tobytes()  # scratch too small: its own buffer
            assert got == t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        assert ckpt.raw_range("fc1.weight") is None and ckpt.raw_range("scalar") is not None
        member = t = tensors["experts.w"]
        part = ckpt.read_part("experts.w", 15 * 4, 15 * 4, bytearray(60)).tobytes()
        assert part == member[1].contiguous().view(torch.uint8).numpy().tobytes()
        ckpt.release("experts.w")


def test_sharded_checkpoint_converts_both_ways_and_verifies(tmp_path: Path, runner) -> None:
    sd = _model_sd()
    src = save_ranks(tmp_path / "run", sd, {"fc1.weight": (2,), "fc2.weight": (2, 3),
                                            "fc1.bias": (2,)}, ranks=2)
    r = runner("to-linear", src)
    assert r.exit_code == 0, r.stderr
    linear = tmp_path / "run.linear.safetensors"  # read-only format: a file beside the folder
    out = load_file(linear)
    for k, v in sd.items():
        assert torch.equal(out[k], v.t() if v.dim() == 2 else v)
    assert runner("verify", src, linear).exit_code == 0
    model = models.LinearMLP()
    model.load_state_dict(out)  # loads strictly into the nn.Linear twin
    back = tmp_path / "back.safetensors"
    assert runner("to-param", linear, "-o", back).exit_code == 0
    for k, v in load_file(back).items():
        assert torch.equal(v, sd[k])


def test_linear_layout_run_to_param_and_export(tmp_path: Path, runner) -> None:
    torch.manual_seed(2)
    sd = {k: v.detach().clone() for k, v in models.LinearMLP().state_dict().items()}
    src = save_ranks(tmp_path / "run", sd, {"fc1.weight": (2,)}, ranks=2)
    r = runner("to-param", src)
    assert r.exit_code == 0, r.stderr
    out = load_file(tmp_path / "run.param.safetensors")
    for k, v in sd.items():
        assert torch.equal(out[k], v.t() if v.dim() == 2 else v)
    assert runner("export", src, "-o", tmp_path / "same.safetensors").exit_code == 0
    for k, v in load_file(tmp_path / "same.safetensors").items():
        assert torch.equal(v, sd[k])


def test_verify_fails_on_a_planted_fault(tmp_path: Path, runner) -> None:
    sd = _model_sd()
    src = save_dcp(tmp_path / "ck", torchtitan_state(sd))
    dst = tmp_path / "ck.linear.safetensors"
    assert runner("to-linear", src, "-o", dst).exit_code == 0
    out = load_file(dst)
    out["fc2.bias"] = out["fc2.bias"] + 1e-3
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file(out, bad)
    r = runner("verify", src, bad, "--layers", "*.weight")
    assert r.exit_code == 1 and "fc2.bias" in r.stdout + r.stderr


def test_inspect_lists_tensors_and_extras(tmp_path: Path, runner) -> None:
    src = save_dcp(tmp_path / "ck", torchtitan_state(_model_sd()))
    r = runner("inspect", src)
    assert r.exit_code == 0, r.stderr
    for k in ("fc1.weight", "fc2.bias", "optimizer", "step"):
        assert k in r.stdout


def test_pt_output_and_extras_noted(tmp_path: Path, runner) -> None:
    sd = _model_sd()
    src = save_dcp(tmp_path / "ck", torchtitan_state(sd))
    r = runner("to-linear", src, "--format", "pt", "--state-dict-key", "model")
    assert r.exit_code == 0, r.stderr
    assert "'optimizer'" in r.stderr and "not kept in .pt" in r.stderr
    out = torch.load(tmp_path / "ck.linear.pt", weights_only=True)
    assert list(out) == list(sd)
    assert torch.equal(out["fc1.weight"], sd["fc1.weight"].t())


def test_batch_takes_a_dcp_folder(tmp_path: Path, runner) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    save_dcp(runs / "step-10", torchtitan_state(_model_sd()))
    r = runner("batch", runs, "--direction", "to-linear", "--out-dir", tmp_path / "out")
    assert r.exit_code == 0, r.stdout + r.stderr
    assert (tmp_path / "out" / "step-10.linear.safetensors").is_file()
    again = runner("batch", runs, "--direction", "to-linear", "--out-dir", tmp_path / "out")
    assert again.exit_code == 0  # the journal: nothing to redo


# --- hostile and damaged folders ------------------------------------------------------------

class _Exec:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_Payload, _Exec])
@pytest.mark.parametrize("protocol", [2, 4])
def test_hostile_metadata_runs_nothing(tmp_path: Path, runner, payload, protocol) -> None:
    src = save_dcp(tmp_path / "ck", {"model": _model_sd()})
    marker = tmp_path / "PWNED"
    md = pickle.loads((src / ".metadata").read_bytes())
    md.planner_data = {"hook": payload(marker)}
    (src / ".metadata").write_bytes(pickle.dumps(md, protocol=protocol))
    for command in (("inspect", src), ("to-linear", src)):
        r = runner(*command)
        assert r.exit_code == 3, r.stderr
        assert ".metadata" in r.stderr and ("system" in r.stderr or "exec" in r.stderr)
        assert not marker.exists()
    pickle.loads((src / ".metadata").read_bytes())  # the control: plain pickle would run it
    assert marker.exists()


def _rewrite_metadata(src: Path, change) -> None:
    md = pickle.loads((src / ".metadata").read_bytes())  # our own file, trusted
    change(md)
    (src / ".metadata").write_bytes(pickle.dumps(md))


def _chunk_info(md: Metadata, fqn: str):
    return next(v for k, v in md.storage_data.items() if k.fqn == fqn)


def test_missing_shard_exit_4(tmp_path: Path, runner) -> None:
    src = save_ranks(tmp_path / "ck", _model_sd(), {"fc1.weight": (2,)}, ranks=2)
    (src / "__1_0.distcp").unlink()
    r = runner("to-linear", src)
    assert r.exit_code == 4
    assert "__1_0.distcp" in r.stderr and "missing" in r.stderr and "model." not in r.stderr
    assert not list(tmp_path.glob("ck.linear*"))


def test_truncated_distcp_exit_4(tmp_path: Path, runner) -> None:
    src = save_dcp(tmp_path / "ck", {"model": _model_sd()})
    shard = src / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-700])
    r = runner("to-linear", src)
    assert r.exit_code == 4 and "__0_0.distcp" in r.stderr and "truncated" in r.stderr
    assert "'fc2." in r.stderr


def test_damaged_chunk_exit_4(tmp_path: Path, runner) -> None:
    src = save_dcp(tmp_path / "ck", {"model": _model_sd()})
    md = pickle.loads((src / ".metadata").read_bytes())
    info = _chunk_info(md, "model.fc1.weight")
    shard = src / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[info.offset:info.offset + info.length] = b"\0" * info.length
    shard.write_bytes(bytes(data))
    r = runner("to-linear", src)
    assert r.exit_code == 4 and "__0_0.distcp" in r.stderr and "fc1.weight" in r.stderr
    assert not list(tmp_path.glob("ck.linear*"))


@pytest.mark.parametrize("content", [b"", b"garbage, not a pickle", None, "dict"])
def test_metadata_not_dcps_exit_4(tmp_path: Path, runner, content) -> None:
    src = save_dcp(tmp_path / "ck", {"model": _model_sd()})
    raw = (src / ".metadata").read_bytes()
    content = {None: raw[: len(raw) // 2], "dict": pickle.dumps({"a": 1})}.get(content, content)
    (src / ".metadata").write_bytes(content)
    r = runner("inspect", src)
    assert r.exit_code == 4, r.stderr
    assert ".metadata" in r.stderr and "Traceback" not in r.stderr


def test_metadata_with_a_non_string_key_exit_4(tmp_path: Path, runner) -> None:
    src = save_dcp(tmp_path / "ck", {"model": _model_sd()})
    _rewrite_metadata(src, lambda md: md.state_dict_metadata.update({7: None}))
    r = runner("inspect", src)
    assert r.exit_code == 4 and ".metadata" in r.stderr and "int" in r.stderr


def test_transform_descriptor_exit_4_naming_it(tmp_path: Path, runner) -> None:
    src = save_dcp(tmp_path / "ck", {"model": _model_sd()})
    _rewrite_metadata(src, lambda md: setattr(_chunk_info(md, "model.fc1.weight"),
                                              "transform_descriptors", ["stream.zstd/1"]))
    r = runner("to-linear", src)
    assert r.exit_code == 4 and "stream.zstd/1" in r.stderr and "fc1.weight" in r.stderr


def test_path_outside_the_folder_exit_3(tmp_path: Path, runner) -> None:
    src = save_dcp(tmp_path / "ck", {"model": _model_sd()})
    _rewrite_metadata(src, lambda md: setattr(_chunk_info(md, "model.fc1.bias"),
                                              "relative_path", "../elsewhere.distcp"))
    r = runner("inspect", src)
    assert r.exit_code == 3 and "fc1.bias" in r.stderr


@pytest.mark.parametrize("fault", ["overlap", "missing chunk"])
def test_chunks_that_do_not_tile_exit_4(tmp_path: Path, runner, fault) -> None:
    src = save_ranks(tmp_path / "ck", _model_sd(), {"fc1.weight": (2,)}, ranks=2)

    def change(md: Metadata) -> None:
        chunks = md.state_dict_metadata["model.fc1.weight"].chunks
        if fault == "overlap":
            chunks[1] = ChunkStorageMetadata(chunks[0].offsets, chunks[1].sizes)
        else:
            del chunks[1]

    _rewrite_metadata(src, change)
    r = runner("to-linear", src)
    assert r.exit_code == 4 and "fc1.weight" in r.stderr


def test_protocol_2_rewrite_keeps_the_value() -> None:
    from collections import OrderedDict

    value = {"a": [1, 2.5, "x" * 300, ("t", None, True)], "b": {"a": "a"}, "c": -2**70,
             "d": [torch.Size([2, 3]), torch.float32, torch.bfloat16, torch.Size([4]),
                   OrderedDict(x=1), OrderedDict(torch="float32")], "torch": "Size"}
    for protocol in (2, 3, 4, 5):
        plain = as_protocol_2(pickle.dumps(value, protocol=protocol))
        from torch._weights_only_unpickler import Unpickler

        assert Unpickler(io.BytesIO(plain), encoding="utf-8").load() == value
