"""The output plan: a dry run refuses exactly what the real run refuses, with the same exit
code, and names every file the real run writes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import convert
from convert.layout import Layout
from convert.plan import Output, build_plan, plan_output
from convert.plan.output import SourceFacts

IN, OUT = 3, 5


def _param_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"fc.weight": torch.randn(IN, OUT), "fc.bias": torch.randn(OUT),
            "head.weight": torch.randn(OUT, IN), "head.bias": torch.randn(IN)}


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


# Each case: (name, setup(tmp) -> args after the command, expected exit code). The setup makes
# the source (and whatever the case needs) inside tmp; args name SRC first.

def _pt_src(tmp: Path, sd: dict | None = None) -> Path:
    src = tmp / "src.pt"
    torch.save(sd if sd is not None else _param_sd(), src)
    return src


def _st_src(tmp: Path) -> Path:
    src = tmp / "src.safetensors"
    save_file(_param_sd(), str(src))
    return src


def case_non_tensor_to_safetensors(tmp: Path) -> list:
    return [_pt_src(tmp, {**_param_sd(), "step": 3}), "-o", tmp / "out.safetensors"]


def case_non_tensor_to_sharded(tmp: Path) -> list:
    return [_pt_src(tmp, {**_param_sd(), "step": 3}), "-o", tmp / "out/"]


def case_dst_exists(tmp: Path) -> list:
    (tmp / "out.safetensors").write_bytes(b"old")
    return [_st_src(tmp), "-o", tmp / "out.safetensors"]


def case_dst_exists_pt(tmp: Path) -> list:
    (tmp / "out.pt").write_bytes(b"old")
    return [_st_src(tmp), "-o", tmp / "out.pt"]


def case_shard_exists(tmp: Path) -> list:
    (tmp / "out").mkdir()
    (tmp / "out" / "model-00001-of-00002.safetensors").write_bytes(b"old")
    return [_st_src(tmp), "-o", tmp / "out/"]


def case_onnx_data_exists(tmp: Path) -> list:
    (tmp / "out.onnx.data").write_bytes(b"old")
    return [_st_src(tmp), "-o", tmp / "out.onnx"]


def case_dst_is_src(tmp: Path) -> list:
    src = _st_src(tmp)
    return [src, "-o", src, "--overwrite"]


def case_dst_is_src_by_link(tmp: Path) -> list:
    src = _st_src(tmp)
    (tmp / "link.safetensors").symlink_to(src)
    return [src, "-o", tmp / "link.safetensors", "--overwrite"]


def case_unknown_suffix(tmp: Path) -> list:
    return [_st_src(tmp), "-o", tmp / "out.npz"]


def case_contradicting_suffix(tmp: Path) -> list:
    return [_st_src(tmp), "-o", tmp / "out.safetensors", "--format", "pt"]


def case_colliding_names(tmp: Path) -> list:
    return [_st_src(tmp), "-o", tmp / "out.safetensors", "--rename", r"^(fc|head)\.", "x."]


def case_tied_needing_different_transposes(tmp: Path) -> list:
    w = torch.randn(4, 4)
    sd = {"a.weight": w, "b.weight": w, **_param_sd()}
    return [_pt_src(tmp, sd), "-o", tmp / "out.pt", "--layers", "a.weight"]


def case_dtype_safetensors_lacks(tmp: Path) -> list:
    sd = {**_param_sd(), "z": torch.zeros(2, dtype=torch.complex128)}
    return [_pt_src(tmp, sd), "-o", tmp / "out.safetensors"]


def case_dtype_onnx_lacks(tmp: Path) -> list:
    sd = {"fc.weight": torch.randn(IN, OUT).to(torch.float8_e4m3fn),
          "fc.bias": torch.randn(OUT)}
    return [_pt_src(tmp, sd), "-o", tmp / "out.onnx"]


def case_folder_holds_another_index(tmp: Path) -> list:
    (tmp / "out").mkdir()
    (tmp / "out" / "pytorch_model.bin.index.json").write_text('{"weight_map": {}}')
    return [_st_src(tmp), "-o", tmp / "out/", "--overwrite"]


def case_missing_folder(tmp: Path) -> list:
    return [_st_src(tmp), "-o", tmp / "no" / "such" / "out.safetensors"]


def case_onnx_option_without_onnx(tmp: Path) -> list:
    return [_st_src(tmp), "-o", tmp / "out.safetensors", "--opset", "17"]


def case_shard_size_for_pt(tmp: Path) -> list:
    return [_st_src(tmp), "-o", tmp / "out.pt", "--max-shard-size", "1KB"]


def case_ambiguous_square(tmp: Path) -> list:
    src = tmp / "sq.safetensors"
    save_file({"w": torch.randn(4, 4)}, str(src))
    return [src, "-o", tmp / "out.safetensors"]


REFUSALS: list[tuple[Callable[[Path], list], int]] = [
    (case_non_tensor_to_safetensors, 2),
    (case_non_tensor_to_sharded, 2),
    (case_dst_exists, 5),
    (case_dst_exists_pt, 5),
    (case_shard_exists, 5),
    (case_onnx_data_exists, 5),
    (case_dst_is_src, 2),
    (case_dst_is_src_by_link, 2),
    (case_unknown_suffix, 2),
    (case_contradicting_suffix, 2),
    (case_colliding_names, 2),
    (case_tied_needing_different_transposes, 2),
    (case_dtype_safetensors_lacks, 2),
    (case_dtype_onnx_lacks, 2),
    (case_folder_holds_another_index, 5),
    (case_missing_folder, 5),
    (case_onnx_option_without_onnx, 2),
    (case_shard_size_for_pt, 2),
    (case_ambiguous_square, 2),
]


@pytest.mark.parametrize(("setup", "code"), REFUSALS, ids=[f.__name__[5:] for f, _ in REFUSALS])
def test_dry_run_refuses_what_the_real_run_refuses(tmp_path, runner, setup, code):
    codes = {}
    for mode in ("dry", "real"):
        tmp = tmp_path / mode
        tmp.mkdir()
        args = setup(tmp)
        before = {p: p.read_bytes() for p in tmp.rglob("*") if p.is_file()}
        flags = ["--dry-run"] if mode == "dry" else []
        res = runner("to-linear", *args, *flags)
        codes[mode] = res.exit_code
        assert res.stdout == "", (mode, res.stdout)
        assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
        after = {p: p.read_bytes() for p in tmp.rglob("*") if p.is_file()}
        assert after == before, f"{mode} run changed files"
    assert codes == {"dry": code, "real": code}


def _shard_args(tmp: Path) -> tuple[Path, list]:
    torch.manual_seed(1)
    sd = {f"h.{i}.fc.weight": torch.randn(64, 96) for i in range(4)}
    sd |= {f"h.{i}.fc.bias": torch.randn(96) for i in range(4)}
    src = tmp / "src.safetensors"
    save_file(sd, str(src))
    return src, ["--max-shard-size", "30KB"]


@pytest.mark.parametrize("dst", ["out/", "out.safetensors"])
def test_dry_run_names_every_file_a_sharded_run_writes(tmp_path, runner, dst):
    src, shard = _shard_args(tmp_path)
    report = tmp_path / "plan.json"
    res = runner("to-linear", src, "-o", tmp_path / dst, *shard, "--dry-run", "--report", report)
    assert res.exit_code == 0, res.stderr
    plan = json.loads(report.read_text())
    planned = {Path(f["path"]).name for f in plan["plan"]["output"]["files"]}
    assert planned == {Path(f).name for f in plan["files"]}
    assert len(planned) == 5  # four shards of at most 30 KB and the index
    assert "output: safetensors" in res.stdout and "index" in res.stdout
    before = _files(tmp_path)
    res = runner("to-linear", src, "-o", tmp_path / dst, *shard, "--report", report)
    assert res.exit_code == 0, res.stderr
    written = {Path(p).name for p in _files(tmp_path) - before}
    assert written == planned
    real = json.loads(report.read_text())
    assert real["plan"]["output"] == plan["plan"]["output"]
    assert real["plan"]["entries"] == plan["plan"]["entries"]
    assert {Path(f).name for f in real["files"]} == planned


def test_sharded_file_reports_its_index(tmp_path):
    src, _ = _shard_args(tmp_path)
    rep = convert.to_linear(src, tmp_path / "y.safetensors", max_shard_size="30KB")
    assert rep.destination == str(tmp_path / "y.safetensors.index.json")
    assert Path(rep.destination).is_file()


def test_dry_run_names_the_onnx_external_data_file(tmp_path, runner):
    src = _st_src(tmp_path)
    dst = tmp_path / "m.onnx"
    dry = convert.to_linear(src, dst, external_data=True, dry_run=True)
    assert [Path(f).name for f in dry.files] == ["m.onnx.data", "m.onnx"]
    assert not dst.exists()
    real = convert.to_linear(src, dst, external_data=True)
    assert sorted(Path(f).name for f in real.files) == sorted(Path(f).name for f in dry.files)
    assert {p.name for p in tmp_path.iterdir() if "onnx" in p.name} == {"m.onnx", "m.onnx.data"}


def test_dry_run_names_the_copied_side_files(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    save_file(_param_sd(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    dry = convert.to_linear(folder, tmp_path / "out/", dry_run=True)
    assert dry.plan.output is not None
    assert [p.name for _, p in dry.plan.output.side_files] == ["config.json"]
    convert.to_linear(folder, tmp_path / "out/")
    planned = {Path(f).name for f in dry.files} | {"config.json"}
    assert {p.name for p in (tmp_path / "out").iterdir()} == planned


def test_the_real_run_carries_the_plan_of_the_dry_run(tmp_path):
    src = _st_src(tmp_path)
    dry = convert.to_linear(src, tmp_path / "o.safetensors", dry_run=True)
    real = convert.to_linear(src, tmp_path / "o.safetensors")
    assert real.plan == dry.plan


# --- the planner alone: sizes in, files out, no tensors -------------------------------------

def _facts(tmp: Path, specs: dict) -> SourceFacts:
    return SourceFacts(tmp / "src.safetensors", (), specs)


class Spec:
    def __init__(self, shape: tuple[int, ...], dtype: str = "F32"):
        self.shape, self.dtype = shape, dtype


def test_shards_are_assigned_in_order_and_a_big_tensor_gets_its_own(tmp_path):
    specs = {"a.weight": Spec((10, 20)), "a.bias": Spec((20,)), "big": Spec((100, 50)),
             "c": Spec((5,))}
    plan = build_plan({k: (s.shape, s.dtype) for k, s in specs.items()}, Layout.LINEAR)
    out = Output(tmp_path / "o", "safetensors", max_shard_size=1000, folder=True)
    planned = plan_output(plan, _facts(tmp_path, specs), out).output
    assert planned is not None
    shards = [(f.path.name, f.keys) for f in planned.tensor_files]
    assert shards == [("model-00001-of-00003.safetensors", ("a.weight", "a.bias")),
                      ("model-00002-of-00003.safetensors", ("big",)),
                      ("model-00003-of-00003.safetensors", ("c",))]
    assert planned.index == tmp_path / "o" / "model.safetensors.index.json"
    assert planned.files[-1].role == "index"
    assert not (tmp_path / "o").exists()  # planning creates nothing
