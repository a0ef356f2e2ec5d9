"""Verification: a correct conversion passes; every planted fault fails and is named."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert
from convert.verify import compare_outputs
from tests.conftest import FIXTURES

MODELS = FIXTURES / "models.py"


def _tamper(path, change):
    """Rewrite a safetensors file with CHANGE applied to its tensors, keeping its metadata."""
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


@pytest.fixture
def square_pair(fixture_dir):
    src = fixture_dir / "square_nobias.safetensors"
    dst = fixture_dir / "sq.linear.safetensors"
    convert.to_linear(src, dst, layers=["*.weight"])
    return src, dst


@pytest.fixture
def mlp_pair(fixture_dir):
    src = fixture_dir / "mlp_param.safetensors"
    dst = fixture_dir / "mlp.linear.safetensors"
    convert.to_linear(src, dst)
    return src, dst


@pytest.mark.parametrize(("name", "options"), [
    ("mlp_param.pt", {}), ("mlp_param.safetensors", {}), ("training.pt", {}),
    ("square_nobias.safetensors", {"layers": ["*.weight"]}),
    ("seed000_W.pt", {"layers": ["W"]}),
])
def test_every_fixture_converts_and_verifies(fixture_dir, runner, name, options):
    src = fixture_dir / name
    report = convert.to_linear(src, fixture_dir / "out.safetensors", **options)
    assert report.verification is not None and report.verification.equivalent
    res = runner("verify", src, fixture_dir / "out.safetensors")
    assert res.exit_code == 0, res.stdout + res.stderr
    assert res.stdout.rstrip().splitlines()[-1].startswith("equivalent")
    back = convert.to_param(fixture_dir / "out.safetensors", fixture_dir / "back.safetensors")
    assert back.verification.equivalent


def test_report_figures(mlp_pair):
    report = convert.verify(*mlp_pair)
    layers = [r for r in report.results if r.kind == "layer"]
    assert [r.name for r in layers] == ["fc1.weight", "fc2.weight"]
    for r in layers:
        assert r.bit_exact and r.passed
        assert r.max_abs_err is not None and r.max_abs_err < 1e-5
        assert r.rel_err is not None and r.atol_needed is not None
    assert all(r.bit_exact for r in report.results if r.kind == "tensor")


def test_square_weight_left_untransposed_fails(square_pair, runner):
    src, dst = square_pair
    orig = load_file(src)
    _tamper(dst, lambda t: t.__setitem__("out.weight", orig["out.weight"].clone()))
    res = runner("verify", src, dst)
    assert res.exit_code == 1
    assert "'out.weight'" in res.stderr and "proj.weight" not in res.stderr
    assert "FAIL    layer  out.weight" in res.stdout


def test_swapped_layers_fail(square_pair):
    src, dst = square_pair

    def swap(t):
        t["proj.weight"], t["out.weight"] = t["out.weight"], t["proj.weight"]

    _tamper(dst, swap)
    report = convert.verify(src, dst)
    assert {r.name for r in report.failures} == {"proj.weight", "out.weight"}


def test_nudged_bias_fails(mlp_pair, runner):
    src, dst = mlp_pair
    _tamper(dst, lambda t: t["fc1.bias"].add_(1e-3))
    res = runner("verify", src, dst)
    assert res.exit_code == 1 and "'fc1.bias'" in res.stderr
    assert "max abs difference 0.001" in res.stdout


def test_weight_downcast_to_float16_fails(mlp_pair):
    src, dst = mlp_pair
    _tamper(dst, lambda t: t.__setitem__("fc2.weight", t["fc2.weight"].half()))
    report = convert.verify(src, dst)
    assert [r.name for r in report.failures] == ["fc2.weight"]
    assert "F16" in report.failures[0].message


def test_extra_and_missing_keys_fail(mlp_pair):
    src, dst = mlp_pair

    def change(t):
        t["extra.bias"] = torch.zeros(2)
        del t["fc2.bias"]

    _tamper(dst, change)
    report = convert.verify(src, dst)
    failed = {(r.name, r.kind) for r in report.failures}
    assert ("extra.bias", "unexpected") in failed
    assert ("fc2.bias", "missing") in failed


def test_nan_compared_by_position(fixture_dir):
    w = torch.randn(3, 5)
    w[0, 1] = float("nan")
    src = fixture_dir / "nan.safetensors"
    save_file({"l.weight": w, "l.bias": torch.randn(5)}, str(src))
    report = convert.to_linear(src, fixture_dir / "nan.linear.safetensors")
    assert report.verification.equivalent  # NaN where NaN was: bit-exact, outputs NaN alike
    x = torch.tensor([1.0, float("nan"), float("inf")])
    assert compare_outputs(x, x.clone(), 1, 0.0, 0.0)[0]
    assert not compare_outputs(x, torch.tensor([1.0, 2.0, float("inf")]), 1, 0.0, 0.0)[0]
    assert not compare_outputs(x, torch.tensor([1.0, float("nan"), -float("inf")]), 1, 0, 0)[0]


def test_tolerance_scales_with_sqrt_in_and_reports_the_atol_needed():
    b = torch.zeros(4)
    a = b + 3e-5
    ok, max_abs, _, needed, msg = compare_outputs(a, b, 4, 0.0, 1e-5)
    assert not ok and max_abs == pytest.approx(3e-5) and needed == pytest.approx(1.5e-5)
    assert "would pass with atol" in msg
    assert compare_outputs(a, b, 9, 0.0, 1e-5)[0]  # 1e-5 * sqrt(9) >= 3e-5


def test_without_provenance_pairs_by_shape_and_refuses_squares(fixture_dir, runner):
    res = runner("verify", fixture_dir / "mlp_param.safetensors",
                 fixture_dir / "mlp_linear.safetensors")
    assert res.exit_code == 0, res.stdout + res.stderr
    assert "names and transposed shapes" in res.stdout
    sq = fixture_dir / "square_nobias.safetensors"
    twin = {k: v.t().contiguous() for k, v in load_file(sq).items()}
    save_file(twin, str(fixture_dir / "twin.safetensors"))
    res = runner("verify", sq, fixture_dir / "twin.safetensors")
    assert res.exit_code == 2 and "--layers" in res.stderr
    res = runner("verify", sq, fixture_dir / "twin.safetensors", "--layers", "*.weight")
    assert res.exit_code == 0, res.stdout + res.stderr
    res = runner("verify", sq, fixture_dir / "twin.safetensors", "--layers", "proj.weight",
                 "--exclude", "out.weight")
    assert res.exit_code == 1 and "out.weight" in res.stderr


def test_whole_model_mode(fixture_dir, runner):
    src, dst = fixture_dir / "mlp_param.pt", fixture_dir / "lin.safetensors"
    convert.to_linear(src, dst, rename=[(r"^fc1\.", "net.0."), (r"^fc2\.", "net.2.")])
    args = ["verify", src, dst, "--source-model", f"{MODELS}:build_param_mlp",
            "--target-model", f"{MODELS}:build_sequential_mlp", "--input-shape", "4,4"]
    res = runner(*args)
    assert res.exit_code == 0, res.stdout + res.stderr
    assert "the two models compute the same outputs" in res.stdout
    _tamper(dst, lambda t: t["net.2.weight"].mul_(1.01))
    res = runner(*args)
    assert res.exit_code == 1
    assert "output[0]" in res.stderr and "net.2.weight" in res.stderr


def test_whole_model_src_not_fitting_is_2_dst_not_fitting_is_1(fixture_dir, runner):
    src, dst = fixture_dir / "mlp_param.pt", fixture_dir / "lin.safetensors"
    convert.to_linear(src, dst)
    res = runner("verify", src, dst, "--source-model", f"{MODELS}:build_square_param",
                 "--target-model", f"{MODELS}:build_linear_mlp", "--input-shape", "2,4")
    assert res.exit_code == 2 and "does not fit" in res.stderr
    res = runner("verify", src, dst, "--source-model", f"{MODELS}:build_param_mlp",
                 "--target-model", f"{MODELS}:build_sequential_mlp", "--input-shape", "2,4")
    assert res.exit_code == 1 and "does not fit" in res.stderr


def test_report_and_junit(mlp_pair, tmp_path, runner):
    src, dst = mlp_pair
    _tamper(dst, lambda t: t["fc1.bias"].add_(1e-3))
    res = runner("verify", src, dst, "--report", tmp_path / "r.json",
                 "--junit", tmp_path / "r.xml")
    assert res.exit_code == 1
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["equivalent"] is False
    assert sorted(data["failures"]) == ["fc1.bias", "fc1.weight"]  # the bias, and its layer
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    assert suite.get("tests") == "4" and suite.get("failures") == "2"
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert sorted(failed) == ["fc1.bias", "fc1.weight"]


def test_cuda_unavailable_is_usage_error(mlp_pair, runner):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = runner("verify", *mlp_pair, "--device", "cuda")
    assert res.exit_code == 2 and "CUDA is not available" in res.stderr
    res = runner("to-linear", mlp_pair[0], "-o", mlp_pair[0].parent / "x.safetensors",
                 "--device", "cuda")
    assert res.exit_code == 2 and not (mlp_pair[0].parent / "x.safetensors").exists()


def test_failed_verify_after_convert_leaves_no_dst(fixture_dir, runner, monkeypatch):
    """A planted executor bug (square weights copied, not transposed) is caught before rename."""
    import convert.execute as ex

    real = ex.transpose_bytes

    def buggy(src, rows, cols, itemsize, out):
        if rows == cols:
            n = rows * cols * itemsize
            out[:n] = bytes(memoryview(src)[:n])
            return memoryview(out)[:n]
        return real(src, rows, cols, itemsize, out)

    monkeypatch.setattr(ex, "transpose_bytes", buggy)
    dst = fixture_dir / "o.safetensors"
    res = runner("to-linear", fixture_dir / "square_nobias.safetensors", "-o", dst,
                 "--layers", "*.weight")
    assert res.exit_code == 1
    assert "proj.weight" in res.stderr and "nothing was written" in res.stderr
    assert not dst.exists()
    assert not [p for p in fixture_dir.iterdir() if p.name.startswith(".")]
    res = runner("to-linear", fixture_dir / "square_nobias.safetensors", "-o", dst,
                 "--layers", "*.weight", "--no-verify")
    assert res.exit_code == 0 and "not verified" in res.stderr
    assert runner("verify", fixture_dir / "square_nobias.safetensors", dst).exit_code == 1


def test_pt_output_is_verified_from_disk(fixture_dir):
    report = convert.to_linear(fixture_dir / "training.pt", fixture_dir / "t.pt")
    assert report.verification.equivalent
    assert report.verification.destination == str(fixture_dir / "t.pt")


def test_verify_stays_the_api_function_beside_the_verify_package():
    """`convert.verify` is the API function, even once the package's submodules are loaded."""
    import convert.api
    from convert.verify import layers, models, onnx, pairing, report

    assert all(m.__name__.startswith("convert.verify.")
               for m in (layers, models, onnx, pairing, report))
    assert callable(convert.verify) and convert.verify.__module__ == "convert.api"
    assert convert.verify.__wrapped__ is convert.api.verify  # its errors in the API's words
    assert convert.verify is convert.verify
