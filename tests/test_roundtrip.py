"""End to end: convert real checkpoints, load them into the other layout's model, compare."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import convert
from convert import Layout, ParamLinear


def _trained_param_mlp(models):
    torch.manual_seed(1)
    model = models.ParamMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, models.IN), torch.randn(8, models.OUT)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model


def test_seed_mlp_to_linear_loads_strictly_and_matches(tmp_path, runner, tiny_models):
    """DESIGN's promise: CustomLinear checkpoint -> nn.Linear twin (renamed), same outputs."""
    model = _trained_param_mlp(tiny_models)
    src = tmp_path / "ckpt.pt"
    torch.save(model.state_dict(), src)
    before = src.read_bytes()
    out = tmp_path / "out.safetensors"

    res = runner("to-linear", src, "-o", out, "--rename", r"^fc1\.", "net.0.",
                 "--rename", r"^fc2\.", "net.2.")
    assert res.exit_code == 0, res.stderr
    assert res.stdout.strip() == str(out)
    assert src.read_bytes() == before  # never touch SRC

    twin = tiny_models.SequentialMLP()
    twin.load_state_dict(load_file(out), strict=True)
    x = torch.randn(16, tiny_models.IN)
    torch.testing.assert_close(twin(x), model(x))

    back = tmp_path / "back.pt"
    res = runner("to-param", out, "-o", back)
    assert res.exit_code == 0, res.stderr
    restored = torch.load(back, weights_only=True)
    original = model.state_dict()
    assert list(restored) == list(original)
    for k in original:
        assert torch.equal(restored[k], original[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_every_float_dtype_round_trips_bit_exact(tmp_path, dtype):
    torch.manual_seed(2)
    sd = {"a.weight": torch.randn(3, 5).to(dtype), "a.bias": torch.randn(5).to(dtype),
          "steps": torch.arange(4), "mask": torch.ones(2, 2, dtype=torch.bool)}
    src = tmp_path / "src.safetensors"
    save_file(sd, str(src))
    lin = convert.to_linear(src, tmp_path / "lin.safetensors")
    assert [a.source for a in lin.plan.transposed] == ["a.weight"]
    got = load_file(tmp_path / "lin.safetensors")
    assert got["a.weight"].dtype == dtype
    assert torch.equal(got["a.weight"].view(torch.uint8),
                       sd["a.weight"].t().contiguous().view(torch.uint8))
    convert.to_param(tmp_path / "lin.safetensors", tmp_path / "back.safetensors")
    back = load_file(tmp_path / "back.safetensors")
    for k in sd:
        assert torch.equal(back[k].view(torch.uint8), sd[k].view(torch.uint8)), k


def test_reverse_of_safetensors_output_is_byte_identical_in_content(tmp_path):
    src = tmp_path / "m.safetensors"
    torch.manual_seed(3)
    save_file({"x.weight": torch.randn(3, 5), "x.bias": torch.randn(5),
               "emb": torch.randn(7, 2)}, str(src))
    convert.to_linear(src)
    assert (tmp_path / "m.linear.safetensors").exists()
    convert.to_param(tmp_path / "m.linear.safetensors")  # no options: provenance decides
    back = tmp_path / "m.param.safetensors"
    a, b = load_file(src), load_file(back)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_pt_to_pt_keeps_training_extras(fixture_dir, tiny_models):
    src = fixture_dir / "training.pt"
    report = convert.to_linear(src, fixture_dir / "t.pt")
    assert report.keys_written == 4
    out = torch.load(fixture_dir / "t.pt", weights_only=True)
    orig = torch.load(src, weights_only=True)
    assert out["epoch"] == 3
    assert set(out) == {"model", "optimizer", "epoch"}
    assert torch.equal(out["model"]["fc1.weight"], orig["model"]["fc1.weight"].t())
    assert out["model"]["fc1.weight"].is_contiguous()
    twin = tiny_models.LinearMLP()
    twin.load_state_dict(out["model"], strict=True)


def test_optimizer_moments_follow_weights_with_param_names(tmp_path, tiny_models):
    torch.manual_seed(5)
    model = tiny_models.ParamMLP()
    opt = torch.optim.Adam(model.named_parameters(), lr=1e-2)
    model(torch.randn(2, tiny_models.IN)).sum().backward()
    opt.step()
    src = tmp_path / "train.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, src)
    report = convert.to_linear(src, tmp_path / "out.pt")
    assert not any("optimizer" in w for w in report.warnings)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    names = out["optimizer"]["param_groups"][0]["param_names"]
    state = out["optimizer"]["state"]
    i = names.index("fc1.weight")
    assert state[i]["exp_avg"].shape == out["model"]["fc1.weight"].shape
    assert torch.equal(state[i]["exp_avg"], opt.state_dict()["state"][i]["exp_avg"].t())


def test_optimizer_without_param_names_is_kept_with_a_warning(fixture_dir):
    report = convert.to_linear(fixture_dir / "training.pt", fixture_dir / "t.pt")
    assert any("optimizer" in w and "no longer match" in w for w in report.warnings)


def test_nested_checkpoint_with_state_dict_key(tmp_path):
    sd = {"l.weight": torch.randn(3, 5), "l.bias": torch.randn(5)}
    src = tmp_path / "n.pt"
    torch.save({"ema": {"inner": sd}, "step": 7}, src)
    with pytest.raises(convert.CorruptInputError, match="state_dict_key="):
        convert.to_linear(src, tmp_path / "a.pt")
    convert.to_linear(src, tmp_path / "a.pt", state_dict_key="ema.inner")
    out = torch.load(tmp_path / "a.pt", weights_only=True)
    assert out["step"] == 7
    assert torch.equal(out["ema"]["inner"]["l.weight"], sd["l.weight"].t())


def test_tied_weights_kept_as_one_tensor_in_pt_and_copied_in_safetensors(tmp_path):
    w = torch.randn(3, 5)
    src = tmp_path / "tied.pt"
    torch.save({"enc.weight": w, "dec.weight": w, "enc.bias": torch.randn(5)}, src)
    convert.to_linear(src, tmp_path / "o.pt", layers=["dec.weight", "enc.weight"])
    out = torch.load(tmp_path / "o.pt", weights_only=True)
    assert out["enc.weight"].data_ptr() == out["dec.weight"].data_ptr()
    assert torch.equal(out["dec.weight"], w.t())
    convert.to_linear(src, tmp_path / "o.safetensors", layers=["*.weight"])
    st = load_file(tmp_path / "o.safetensors")
    assert torch.equal(st["enc.weight"], st["dec.weight"])
    with safe_open(tmp_path / "o.safetensors", "pt") as f:
        assert '"tied":[["enc.weight","dec.weight"]]' in f.metadata()["linconvert"]


def test_tied_weights_needing_different_transposes_are_refused(tmp_path):
    w = torch.randn(3, 5)
    src = tmp_path / "tied.pt"
    torch.save({"enc.weight": w, "dec.weight": w, "enc.bias": torch.randn(5)}, src)
    with pytest.raises(convert.UsageError, match="tied"):
        convert.to_linear(src, tmp_path / "o.pt")  # bias evidence covers enc only
    assert not (tmp_path / "o.pt").exists()


def test_square_fixture_converts_with_layers_and_computes_the_same(fixture_dir, tiny_models):
    src = fixture_dir / "square_nobias.safetensors"
    with pytest.raises(convert.UsageError) as e:
        convert.to_linear(src)
    assert e.value.exit_code == 2 and "proj.weight" in str(e.value)
    convert.to_linear(src, layers=["*.weight"])
    sq = tiny_models.SquareParam()
    sq.load_state_dict(load_file(src))
    twin = tiny_models.SquareLinear()
    twin.load_state_dict(load_file(fixture_dir / "square_nobias.linear.safetensors"))
    x = torch.randn(5, tiny_models.SQUARE)
    torch.testing.assert_close(twin(x), sq(x))


def test_reference_model_decides_square_weights(fixture_dir, tiny_models):
    from tests.conftest import FIXTURES

    spec = f"{FIXTURES / 'models.py'}:build_square_linear"
    report = convert.to_linear(fixture_dir / "square_nobias.safetensors", model=spec)
    assert len(report.plan.transposed) == 2
    assert all("reference model" in a.reason for a in report.plan.transposed)


def test_param_linear_matches_nn_linear():
    torch.manual_seed(6)
    p = ParamLinear(3, 5)
    lin = nn.Linear(3, 5)
    with torch.no_grad():
        lin.weight.copy_(p.weight.t())
        lin.bias.copy_(p.bias)
    x = torch.randn(4, 3)
    torch.testing.assert_close(p(x), lin(x))
    assert Layout.PARAM.other is Layout.LINEAR




def test_non_contiguous_zero_size_and_scalar_tensors(tmp_path):
    torch.manual_seed(7)
    sd = {"a.weight": torch.randn(5, 3).t(), "a.bias": torch.randn(5),
          "z.weight": torch.zeros(0, 4), "z.bias": torch.zeros(4), "s": torch.tensor(3.0),
          "view": torch.randn(10, 10)[2:5, 1:6]}
    torch.save(sd, tmp_path / "x.pt")
    report = convert.to_linear(tmp_path / "x.pt", tmp_path / "o.safetensors", layers=["view"])
    assert {a.source for a in report.plan.transposed} == {"a.weight", "z.weight", "view"}
    out = load_file(tmp_path / "o.safetensors")
    assert torch.equal(out["a.weight"], sd["a.weight"].t())
    assert torch.equal(out["view"], sd["view"].t())
    assert out["z.weight"].shape == (4, 0)
    convert.to_param(tmp_path / "o.safetensors", tmp_path / "b.pt")
    back = torch.load(tmp_path / "b.pt", weights_only=True)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_optimizer_moments_follow_weights_with_a_matching_model(fixture_dir):
    """training.pt's Adam has no param_names; a --model whose parameters match the keys in
    order makes the index -> key mapping certain."""
    from tests.conftest import FIXTURES

    report = convert.to_linear(fixture_dir / "training.pt", fixture_dir / "t.pt",
                               model=f"{FIXTURES / 'models.py'}:build_linear_mlp")
    assert not any("optimizer" in w for w in report.warnings)
    src = torch.load(fixture_dir / "training.pt", weights_only=True)
    out = torch.load(fixture_dir / "t.pt", weights_only=True)
    # indices follow ParamMLP.parameters(): fc1.weight, fc1.bias, fc2.weight, fc2.bias
    assert torch.equal(out["optimizer"]["state"][0]["exp_avg"],
                       src["optimizer"]["state"][0]["exp_avg"].t())
    assert torch.equal(out["optimizer"]["state"][1]["exp_avg"],
                       src["optimizer"]["state"][1]["exp_avg"])
    assert out["optimizer"]["state"][2]["exp_avg_sq"].shape == out["model"]["fc2.weight"].shape
