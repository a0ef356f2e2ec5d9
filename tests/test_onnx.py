"""ONNX export: the layer graph and the whole model, run in onnxruntime against torch."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

import convert
from tests.conftest import FIXTURES

MODELS = FIXTURES / "models.py"


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_layer_graph_shows_the_linear_layout_and_matches_torch(fixture_dir, tiny_models):
    dst = fixture_dir / "m.onnx"
    report = convert.to_linear(fixture_dir / "mlp_param.pt", dst)
    assert report.verification.equivalent
    model = onnx.load(dst)
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Gemm"]
    assert all(a.i == 1 for n in model.graph.node for a in n.attribute if a.name == "transB")
    assert {i.name for i in model.graph.initializer} == {"fc1.weight", "fc1.bias",
                                                          "fc2.weight", "fc2.bias"}
    assert [i.name for i in model.graph.input] == ["fc1.input", "fc2.input"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    sd = torch.load(fixture_dir / "mlp_param.pt", weights_only=True)
    for batch in (1, 7):  # dynamic batch axis
        x = torch.randn(batch, tiny_models.IN)
        h = torch.randn(batch, tiny_models.HIDDEN)
        y1, y2 = _session(dst).run(None, {"fc1.input": x.numpy(), "fc2.input": h.numpy()})
        torch.testing.assert_close(torch.from_numpy(y1), x @ sd["fc1.weight"] + sd["fc1.bias"])
        torch.testing.assert_close(torch.from_numpy(y2), h @ sd["fc2.weight"] + sd["fc2.bias"])


def test_layer_graph_of_the_param_layout_uses_matmul_add(fixture_dir):
    dst = fixture_dir / "p.onnx"
    report = convert.to_param(fixture_dir / "mlp_linear.safetensors", dst)
    assert report.verification.equivalent
    assert [n.op_type for n in onnx.load(dst).graph.node] == ["MatMul", "Add"] * 2


def test_other_tensors_are_left_out_with_a_warning(tmp_path):
    save_file({"emb": torch.randn(10, 3), "l.weight": torch.randn(3, 5),
               "l.bias": torch.randn(5)}, str(tmp_path / "a.safetensors"))
    report = convert.to_linear(tmp_path / "a.safetensors", tmp_path / "a.onnx")
    assert any("'emb'" in w and "layer graph" in w for w in report.warnings)
    assert {i.name for i in onnx.load(tmp_path / "a.onnx").graph.initializer} == \
        {"l.weight", "l.bias"}


def test_planted_wrong_initializer_fails_verification(fixture_dir, runner):
    dst = fixture_dir / "m.onnx"
    convert.to_linear(fixture_dir / "mlp_param.pt", dst)
    model = onnx.load(dst)
    init = next(i for i in model.graph.initializer if i.name == "fc2.weight")
    arr = onnx.numpy_helper.to_array(init).copy()
    arr[0, 0] += 0.5
    init.CopyFrom(onnx.numpy_helper.from_array(arr, "fc2.weight"))
    onnx.save(model, dst)
    res = runner("verify", fixture_dir / "mlp_param.pt", dst)
    assert res.exit_code == 1
    assert "fc2.weight" in res.stderr and "fc1.weight" not in res.stderr
    assert "differs from its source" in res.stdout


def test_whole_model_export_runs_with_any_batch(fixture_dir, tiny_models):
    dst = fixture_dir / "w.onnx"
    src = fixture_dir / "mlp_param.pt"
    report = convert.to_linear(src, dst, rename=[(r"^fc1\.", "net.0."), (r"^fc2\.", "net.2.")],
                               model=f"{MODELS}:build_sequential_mlp", input_shape=[(4, 4)])
    assert report.verification.equivalent and report.verification.proven == "equivalence"
    torch.manual_seed(0)
    ref = tiny_models.ParamMLP()
    ref.load_state_dict(torch.load(src, weights_only=True))
    session = _session(dst)
    for batch in (1, 9):
        x = torch.randn(batch, tiny_models.IN)
        (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        torch.testing.assert_close(torch.from_numpy(y), ref(x).detach())


def test_external_data_loads_from_another_directory(fixture_dir, tmp_path):
    dst = fixture_dir / "e.onnx"
    convert.to_linear(fixture_dir / "mlp_param.pt", dst, external_data=True)
    data = fixture_dir / "e.onnx.data"
    assert data.exists()
    locations = {e.value for i in onnx.load(dst, load_external_data=False).graph.initializer
                 for e in i.external_data if e.key == "location"}
    assert locations == {"e.onnx.data"}  # relative, one file, beside DST
    size = data.stat().st_size
    convert.to_linear(fixture_dir / "mlp_param.pt", dst, external_data=True, overwrite=True)
    assert data.stat().st_size == size  # written fresh, never appended to
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)
    try:
        session = _session(dst)
        out = session.run(None, {"fc1.input": np.ones((2, 4), np.float32),
                                 "fc2.input": np.ones((2, 6), np.float32)})
    finally:
        os.chdir(cwd)
    assert out[0].shape == (2, 6)


def test_whole_model_external_data(fixture_dir):
    dst = fixture_dir / "we.onnx"
    convert.to_linear(fixture_dir / "mlp_param.pt", dst, model=f"{MODELS}:build_linear_mlp",
                      input_shape=[(2, 4)], external_data=True)
    assert (fixture_dir / "we.onnx.data").exists()
    assert not [p for p in fixture_dir.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(("dtype", "ran"), [(torch.float16, True), (torch.float64, True),
                                            (torch.bfloat16, False)])
def test_dtypes(tmp_path, dtype, ran):
    torch.manual_seed(0)
    save_file({"l.weight": torch.randn(3, 5).to(dtype), "l.bias": torch.randn(5).to(dtype)},
              str(tmp_path / "a.safetensors"))
    report = convert.to_linear(tmp_path / "a.safetensors", tmp_path / "a.onnx")
    (res,) = report.verification.results
    assert res.passed and res.bit_exact
    assert (res.max_abs_err is not None) is ran
    if not ran:
        assert "initializer bytes checked" in res.message


def test_float8_is_refused(tmp_path, runner):
    save_file({"l.weight": torch.randn(3, 5).to(torch.float8_e4m3fn),
               "l.bias": torch.randn(5).to(torch.float8_e4m3fn)}, str(tmp_path / "a.safetensors"))
    res = runner("to-linear", tmp_path / "a.safetensors", "-o", tmp_path / "a.onnx")
    assert res.exit_code == 2 and "F8_E4M3" in res.stderr
    assert not (tmp_path / "a.onnx").exists()


def test_existing_onnx_or_data_is_exit_5(fixture_dir, runner):
    (fixture_dir / "x.onnx.data").write_bytes(b"old")
    res = runner("to-linear", fixture_dir / "mlp_param.pt", "-o", fixture_dir / "x.onnx")
    assert res.exit_code == 5 and "x.onnx.data" in res.stderr
    assert (fixture_dir / "x.onnx.data").read_bytes() == b"old"


def test_failed_onnx_verification_leaves_nothing(fixture_dir, runner, monkeypatch):
    import convert.onnx_export as ox

    real = ox.written_bytes

    def corrupt(plan, ckpt, keys):
        for action, data in real(plan, ckpt, keys):
            yield action, (bytes(len(data)) if action.target == "fc1.weight" else data)

    monkeypatch.setattr(ox, "written_bytes", corrupt)
    res = runner("to-linear", fixture_dir / "mlp_param.pt", "-o", fixture_dir / "m.onnx",
                 "--external-data")
    assert res.exit_code == 1 and "fc1.weight" in res.stderr
    assert sorted(p.name for p in fixture_dir.iterdir() if "onnx" in p.name) == []


def test_opset_is_recorded(fixture_dir):
    convert.to_linear(fixture_dir / "mlp_param.pt", fixture_dir / "o.onnx", opset=17)
    assert onnx.load(fixture_dir / "o.onnx").opset_import[0].version == 17
