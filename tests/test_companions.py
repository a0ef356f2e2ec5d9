"""Companion tensors follow their weight: FP8 block-scale grids (transformers' fine-grained FP8),
per-channel int8 scales, prune's mask, weight norm's g. Each converts both ways bit-exact, a twin
in the other layout that rebuilds its weight the same way computes what the original does, and
a scale left as it was fails verification, naming it."""

from __future__ import annotations

import types

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrizations, prune

from convert.modules import ParamLinear

finegrained_fp8 = pytest.importorskip("transformers.integrations.finegrained_fp8")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(_bits(a[k]),
                                                                              _bits(b[k]))
        for k in a)


def _fp8_quantize(w: torch.Tensor, block: int = 128, fmt: str = "float") -> dict:
    """transformers' own Fp8Quantize where the shape tiles; the same rule for ragged edges."""
    config = types.SimpleNamespace(weight_block_size=(block, block), scale_fmt=fmt)
    quantizer = finegrained_fp8.Fp8Quantize(types.SimpleNamespace(quantization_config=config))
    if w.shape[0] % block == 0 and w.shape[1] % block == 0:
        return quantizer.convert({"x.weight": w})
    rows, cols = w.shape
    r, c = -(-rows // block), -(-cols // block)
    padded = torch.zeros(r * block, c * block)
    padded[:rows, :cols] = w
    tiles = padded.reshape(r, block, c, block).abs().amax(dim=(1, 3)).clamp(min=1e-12)
    inv = tiles / torch.finfo(torch.float8_e4m3fn).max
    scale = inv.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return {"x.weight": (w / scale).to(torch.float8_e4m3fn), "x.weight_scale_inv": inv}


def _fp8_checkpoint(path, shapes, fmt="float"):
    torch.manual_seed(0)
    sd = {}
    for i, (out_f, in_f) in enumerate(shapes):
        q = _fp8_quantize(torch.randn(out_f, in_f), fmt=fmt)
        sd[f"layers.{i}.proj.weight"] = q["x.weight"]
        sd[f"layers.{i}.proj.weight_scale_inv"] = q["x.weight_scale_inv"]
        sd[f"layers.{i}.proj.bias"] = torch.randn(out_f)
    save_file(sd, str(path))
    return sd


def _dequant(w, s, param):
    """transformers' own FP8 dequantization of a weight in the layout it is stored in."""
    return finegrained_fp8._dequantize_fp8_weight(w, s, [128, 128], torch.float32).double()


@pytest.mark.parametrize("shapes", [[(256, 384), (128, 128)], [(300, 200), (130, 129)]],
                         ids=["multiples-of-128", "ragged"])
def test_fp8_block_scaled_to_param_and_back(tmp_path, runner, shapes):
    src = tmp_path / "fp8.safetensors"
    orig = _fp8_checkpoint(src, shapes)
    res = runner("to-param", src, "-o", tmp_path / "p.safetensors", "--layers", "*.proj.weight",
                 "--dry-run")
    assert res.exit_code == 0, res.stderr
    assert "follows its weight: block-scale grid (128x128 blocks) of 'layers.0.proj.weight'" \
        in res.stdout
    res = runner("to-param", src, "-o", tmp_path / "p.safetensors", "--layers", "*.proj.weight")
    assert res.exit_code == 0, res.stderr
    assert "verified equivalent" in res.stderr
    out = load_file(tmp_path / "p.safetensors")
    for i, (out_f, in_f) in enumerate(shapes):
        w, s = out[f"layers.{i}.proj.weight"], out[f"layers.{i}.proj.weight_scale_inv"]
        assert w.dtype == torch.float8_e4m3fn and w.shape == (in_f, out_f)
        assert s.shape == (-(-in_f // 128), -(-out_f // 128))
        # the param-layout twin rebuilds its weight the same way and computes the same function
        x = torch.randn(5, in_f, dtype=torch.float64)
        b = orig[f"layers.{i}.proj.bias"].double()
        want = nn.functional.linear(x, _dequant(orig[f"layers.{i}.proj.weight"],
                                                orig[f"layers.{i}.proj.weight_scale_inv"], False),
                                    b)
        got = x @ _dequant(w, s, True) + b
        torch.testing.assert_close(got, want)
    res = runner("to-linear", tmp_path / "p.safetensors", "-o", tmp_path / "back.safetensors")
    assert res.exit_code == 0, res.stderr
    assert _same(load_file(tmp_path / "back.safetensors"), orig)


def test_fp8_e8m0_grid_and_e5m2_move_as_bytes(tmp_path, runner):
    torch.manual_seed(0)
    q = _fp8_quantize(torch.randn(256, 128), fmt="ue8m0")
    assert q["x.weight_scale_inv"].dtype == torch.float8_e8m0fnu
    sd = {"a.weight": q["x.weight"], "a.weight_scale_inv": q["x.weight_scale_inv"],
          "b.weight": torch.randn(6, 4).to(torch.float8_e5m2), "b.weight_scale": torch.rand(6, 1)}
    save_file(sd, str(tmp_path / "s.safetensors"))
    res = runner("to-param", tmp_path / "s.safetensors", "-o", tmp_path / "p.safetensors",
                 "--layers", "a.weight")
    assert res.exit_code == 0, res.stderr
    out = load_file(tmp_path / "p.safetensors")
    assert out["a.weight_scale_inv"].shape == (1, 2)
    assert out["a.weight_scale_inv"].dtype == torch.float8_e8m0fnu
    assert out["b.weight_scale"].shape == (1, 6)  # per channel: [out, 1] -> [1, out]
    res = runner("to-linear", tmp_path / "p.safetensors", "-o", tmp_path / "b.safetensors")
    assert res.exit_code == 0, res.stderr
    assert _same(load_file(tmp_path / "b.safetensors"), sd)


def _int8_layer(out_f, in_f, zero_point=False):
    """Per-channel int8 as compressed-tensors writes it: weight int8 [out, in], weight_scale
    [out, 1], weight_zero_point [out, 1] (asymmetric), a scalar input_scale."""
    w = torch.randn(out_f, in_f)
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    zp = torch.randint(-3, 4, (out_f, 1), dtype=torch.int8) if zero_point else None
    q = (w / scale).round() + (zp if zp is not None else 0)
    layer = {"weight": q.clamp(-128, 127).to(torch.int8), "weight_scale": scale.to(torch.bfloat16),
             "input_scale": torch.tensor([0.02])}
    if zp is not None:
        layer["weight_zero_point"] = zp
    return layer


def _int8_dequant(layer, param):
    s, w = layer["weight_scale"].float(), layer["weight"].float()
    zp = layer.get("weight_zero_point")
    return (w - (zp.float() if zp is not None else 0)) * s


def test_int8_per_channel_square_weights_decided_by_their_scales(tmp_path, runner):
    torch.manual_seed(0)
    sd = {}
    for name, zp in (("q_proj", False), ("o_proj", True)):
        for k, v in _int8_layer(8, 8, zp).items():
            sd[f"attn.{name}.{k}"] = v
    save_file(sd, str(tmp_path / "int8.safetensors"))
    # square int8 weights: their [out, 1] scales say out x in, no --layers needed
    res = runner("to-param", tmp_path / "int8.safetensors", "-o", tmp_path / "p.safetensors")
    assert res.exit_code == 0, res.stderr
    out = load_file(tmp_path / "p.safetensors")
    x = torch.randn(3, 8)
    for name in ("q_proj", "o_proj"):
        layer = {k.rpartition(".")[2]: v for k, v in out.items() if f".{name}." in k}
        assert layer["weight_scale"].shape == (1, 8) and layer["input_scale"].shape == (1,)
        before = {k.rpartition(".")[2]: v for k, v in sd.items() if f".{name}." in k}
        torch.testing.assert_close(x @ _int8_dequant(layer, True),
                                   x @ _int8_dequant(before, False).T)
    res = runner("to-linear", tmp_path / "p.safetensors", "-o", tmp_path / "b.safetensors")
    assert res.exit_code == 0, res.stderr
    assert _same(load_file(tmp_path / "b.safetensors"), sd)


def test_pruned_model_with_torch_prune(tmp_path, runner):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    for m in (model[0], model[2]):
        prune.l1_unstructured(m, "weight", amount=0.5)
    torch.save(model.state_dict(), tmp_path / "pruned.pt")
    assert "0.weight_mask" in model.state_dict()
    res = runner("to-param", tmp_path / "pruned.pt", "-o", tmp_path / "p.pt")
    assert res.exit_code == 0, res.stderr
    assert "verified equivalent" in res.stderr
    twin = nn.Sequential(ParamLinear(4, 6), nn.ReLU(), ParamLinear(6, 3))
    for m in (twin[0], twin[2]):
        prune.identity(m, "weight")
    twin.load_state_dict(torch.load(tmp_path / "p.pt", weights_only=True), strict=True)
    x = torch.randn(5, 4)
    torch.testing.assert_close(twin(x), model(x))
    res = runner("to-linear", tmp_path / "p.pt", "-o", tmp_path / "back.pt")
    assert res.exit_code == 0, res.stderr
    assert _same(torch.load(tmp_path / "back.pt", weights_only=True), model.state_dict())


@pytest.mark.parametrize("kind", ["parametrizations", "legacy"])
def test_weight_norm_with_torch_utilities(tmp_path, runner, kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    twin = nn.Sequential(ParamLinear(4, 6), nn.Tanh(), ParamLinear(6, 3))
    for i in (0, 2):
        if kind == "legacy":
            with pytest.warns(FutureWarning):
                nn.utils.weight_norm(model[i], dim=0)
                nn.utils.weight_norm(twin[i], dim=1)
        else:
            parametrizations.weight_norm(model[i], dim=0)
            parametrizations.weight_norm(twin[i], dim=1)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp_path / "wn.safetensors"))
    res = runner("to-param", tmp_path / "wn.safetensors", "-o", tmp_path / "p.safetensors",
                 "--dry-run")
    assert res.exit_code == 0, res.stderr
    g = "0.weight_g" if kind == "legacy" else "0.parametrizations.weight.original0"
    assert g in res.stdout and "6x1 -> 1x6" in res.stdout
    res = runner("to-param", tmp_path / "wn.safetensors", "-o", tmp_path / "p.safetensors")
    assert res.exit_code == 0, res.stderr
    twin.load_state_dict(load_file(tmp_path / "p.safetensors"), strict=True)
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))
    res = runner("to-linear", tmp_path / "p.safetensors", "-o", tmp_path / "b.safetensors")
    assert res.exit_code == 0, res.stderr
    assert _same(load_file(tmp_path / "b.safetensors"), sd)


def _tamper(path, key, value):
    """Rewrite one tensor of a safetensors file, keeping its metadata (provenance)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    sd[key] = value
    save_file(sd, str(path), metadata=meta)


@pytest.mark.parametrize("d", [256, 640], ids=["whole-layer", "sampled-outputs"])
def test_planted_fault_scale_left_as_it_was_fails_naming_the_scale(tmp_path, runner, d):
    src = tmp_path / "fp8.safetensors"
    orig = _fp8_checkpoint(src, [(d, d)])
    dst = tmp_path / "p.safetensors"
    res = runner("to-param", src, "-o", dst, "--layers", "*.proj.weight")
    assert res.exit_code == 0, res.stderr
    assert runner("verify", src, dst).exit_code == 0
    grid = "layers.0.proj.weight_scale_inv"
    _tamper(dst, grid, orig[grid].clone())  # the weight transposed, its square grid not
    assert not torch.equal(orig[grid], orig[grid].T)
    res = runner("verify", src, dst)
    assert res.exit_code == 1, res.stdout + res.stderr
    failed = [line for line in res.stdout.splitlines() if line.startswith("FAIL")]
    assert any(grid in line and "companion" in line for line in failed), res.stdout
    assert any("layers.0.proj.weight " in line and grid in line for line in failed), res.stdout


def test_planted_fault_mask_left_as_it_was_fails(tmp_path, runner):
    torch.manual_seed(0)
    lin = nn.Linear(5, 5)
    prune.random_unstructured(lin, "weight", amount=0.4)
    sd = {k: v.detach().clone() for k, v in lin.state_dict().items()}
    save_file(sd, str(tmp_path / "m.safetensors"))
    dst = tmp_path / "p.safetensors"
    assert runner("to-param", tmp_path / "m.safetensors", "-o", dst, "--layers",
                  "weight_orig").exit_code == 0
    _tamper(dst, "weight_mask", sd["weight_mask"])
    res = runner("verify", tmp_path / "m.safetensors", dst)
    assert res.exit_code == 1
    assert any(line.startswith("FAIL") and "weight_mask" in line
               for line in res.stdout.splitlines()), res.stdout


def _save(tmp_path, sd, name="bad.safetensors"):
    save_file(sd, str(tmp_path / name))
    return tmp_path / name


@pytest.mark.parametrize("extra, words", [
    ({"p.weight_scale_inv": torch.ones(5, 4)}, "does not tile its weight 'p.weight'"),
    ({"p.weight_scale": torch.ones(7)}, "a vector of 7"),
])
def test_a_scale_that_contradicts_its_weight_is_exit_2(tmp_path, runner, extra, words):
    src = _save(tmp_path, {"p.weight": torch.randn(6, 4), "p.bias": torch.randn(6), **extra})
    res = runner("to-param", src, "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 2 and words in res.stderr, res.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_a_mask_of_the_wrong_shape_is_exit_2(tmp_path, runner):
    src = _save(tmp_path, {"p.weight_orig": torch.randn(6, 4), "p.bias": torch.randn(6),
                           "p.weight_mask": torch.ones(4, 6)})
    res = runner("to-param", src, "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 2 and "'p.weight_mask' is 4x6" in res.stderr, res.stderr


def test_an_unknown_sibling_sharing_a_dim_is_exit_2_until_a_rule_says_its_role(tmp_path,
                                                                               runner):
    src = _save(tmp_path, {"p.weight": torch.randn(6, 4), "p.bias": torch.randn(6),
                           "p.weight_absmax": torch.rand(6, 4)})
    res = runner("to-param", src, "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 2, res.stderr
    assert "'p.weight_absmax'" in res.stderr and "[[companion]]" in res.stderr
    rules = tmp_path / "rules.toml"
    rules.write_text("[[companion]]\nkey = '*.weight_absmax'\nrole = 'same-shape'\n")
    res = runner("to-param", src, "-o", tmp_path / "o.safetensors", "--rules", rules)
    assert res.exit_code == 0, res.stderr
    assert load_file(tmp_path / "o.safetensors")["p.weight_absmax"].shape == (4, 6)
    res = runner("to-param", src, "-o", tmp_path / "x.safetensors", "--exclude",
                 "p.weight_absmax")
    assert res.exit_code == 0, res.stderr
    assert load_file(tmp_path / "x.safetensors")["p.weight_absmax"].shape == (6, 4)


def test_a_companion_rule_gives_a_grid_its_block(tmp_path, runner):
    src = _save(tmp_path, {"p.weight": torch.randn(300, 200), "p.bias": torch.randn(300),
                           "p.weight_scale_inv": torch.rand(3, 2)})
    rules = tmp_path / "rules.toml"
    rules.write_text("[[companion]]\nkey = '*.weight_scale_inv'\nrole = 'grid'\n"
                     "block = [100, 100]\n")
    res = runner("to-param", src, "-o", tmp_path / "o.safetensors", "--rules", rules,
                 "--dry-run")
    assert res.exit_code == 0 and "(100x100 blocks)" in res.stdout, res.stderr
    rules.write_text("[[companion]]\nkey = '*.weight_scale_inv'\nrole = 'grid'\n"
                     "block = [64, 64]\n")
    res = runner("to-param", src, "-o", tmp_path / "o.safetensors", "--rules", rules)
    assert res.exit_code == 2 and "with the block 64x64 its rule gives" in res.stderr
    rules.write_text("[[companion]]\nkey = '*.nothing'\nrole = 'grid'\n")
    res = runner("to-param", src, "-o", tmp_path / "o.safetensors", "--rules", rules)
    assert res.exit_code == 2 and "'*.nothing' matches no sibling" in res.stderr


def test_excluding_the_scale_of_a_transposed_weight_is_exit_2(tmp_path, runner):
    src = _save(tmp_path, {"p.weight": torch.randn(6, 4), "p.bias": torch.randn(6),
                           "p.weight_scale": torch.rand(6, 1)})
    res = runner("to-param", src, "-o", tmp_path / "o.safetensors", "--exclude",
                 "p.weight_scale")
    assert res.exit_code == 2 and "excludes 'p.weight_scale'" in res.stderr, res.stderr


def test_a_packed_4bit_weight_is_refused_by_name(tmp_path, runner):
    src = _save(tmp_path, {"q.weight_packed": torch.zeros(6, 1, dtype=torch.int32),
                           "q.weight_scale": torch.rand(6, 1),
                           "q.weight_shape": torch.tensor([6, 8]),
                           "p.weight": torch.randn(6, 4), "p.bias": torch.randn(6)})
    res = runner("to-param", src, "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 2, res.stderr
    assert "'q.weight_packed' holds 4-bit values packed" in res.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_stacked_fp8_experts_grids_follow_per_expert(tmp_path, runner):
    torch.manual_seed(0)
    w = torch.randn(3, 256, 128)
    q = [_fp8_quantize(w[e]) for e in range(3)]
    sd = {"experts.weight": torch.stack([x["x.weight"] for x in q]),
          "experts.weight_scale_inv": torch.stack([x["x.weight_scale_inv"] for x in q]),
          "experts.bias": torch.randn(3, 256)}
    src = _save(tmp_path, sd)
    res = runner("to-param", src, "-o", tmp_path / "p.safetensors")
    assert res.exit_code == 0, res.stderr
    out = load_file(tmp_path / "p.safetensors")
    assert out["experts.weight_scale_inv"].shape == (3, 1, 2)
    for e in range(3):
        torch.testing.assert_close(
            _dequant(out["experts.weight"][e], out["experts.weight_scale_inv"][e], True),
            _dequant(sd["experts.weight"][e], sd["experts.weight_scale_inv"][e], False).T)


def test_without_provenance_a_grid_left_as_it_was_fails_naming_it(tmp_path, runner):
    """A naive converter's output (no provenance): the weight transposed, its grid not."""
    src = tmp_path / "fp8.safetensors"
    orig = _fp8_checkpoint(src, [(256, 384)])
    good = {k: (v.T.contiguous() if k.endswith(("weight", "weight_scale_inv")) else v)
            for k, v in orig.items()}
    save_file(good, str(tmp_path / "good.safetensors"))
    res = runner("verify", src, tmp_path / "good.safetensors")
    assert res.exit_code == 0, res.stdout + res.stderr
    assert "names and transposed shapes" in res.stdout
    grid = "layers.0.proj.weight_scale_inv"
    save_file({**good, grid: orig[grid]}, str(tmp_path / "naive.safetensors"))
    res = runner("verify", src, tmp_path / "naive.safetensors")
    assert res.exit_code == 1, res.stdout + res.stderr
    assert any(line.startswith("FAIL") and grid in line and "is not the transpose" in line
               for line in res.stdout.splitlines()), res.stdout


def test_spectral_norm_vectors_are_kept_and_its_layer_verifies(tmp_path, runner):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    twin = nn.Sequential(ParamLinear(4, 6), nn.ReLU(), ParamLinear(6, 3))
    for i in (0, 2):
        nn.utils.spectral_norm(model[i])
        nn.utils.spectral_norm(twin[i], dim=1)  # ParamLinear's output dim
    model(torch.randn(3, 4))  # one power iteration: u and v as a trained model has them
    model.eval()
    torch.save(model.state_dict(), tmp_path / "sn.pt")
    res = runner("to-param", tmp_path / "sn.pt", "-o", tmp_path / "p.pt")
    assert res.exit_code == 0, res.stderr
    assert "verified equivalent" in res.stderr
    out = torch.load(tmp_path / "p.pt", weights_only=True)
    assert out["0.weight_orig"].shape == (4, 6) and out["0.weight_u"].shape == (6,)
    twin.load_state_dict(out, strict=True)
    twin.eval()
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x))
    res = runner("to-linear", tmp_path / "p.pt", "-o", tmp_path / "back.pt")
    assert res.exit_code == 0, res.stderr
    assert _same(torch.load(tmp_path / "back.pt", weights_only=True), model.state_dict())


def test_excluding_a_1d_stranger_is_the_fix_its_message_gives(tmp_path, runner):
    src = _save(tmp_path, {"p.weight": torch.randn(6, 4), "p.bias": torch.randn(6),
                           "p.weight_absmax": torch.rand(4)})
    res = runner("to-param", src, "-o", tmp_path / "o.safetensors")
    assert res.exit_code == 2 and "'p.weight_absmax'" in res.stderr, res.stderr
    res = runner("to-param", src, "-o", tmp_path / "o.safetensors", "--exclude",
                 "p.weight_absmax")
    assert res.exit_code == 0, res.stderr


def test_a_rule_that_would_split_or_stack_a_quantized_weight_is_exit_2(tmp_path, runner):
    """A scale grid left whole beside split (or stacked) weights fits none of them."""
    torch.manual_seed(0)
    q = _fp8_quantize(torch.randn(384, 128))
    src = _save(tmp_path, {"attn.qkv.weight": q["x.weight"],
                           "attn.qkv.weight_scale_inv": q["x.weight_scale_inv"],
                           "attn.qkv.bias": torch.randn(384)})
    res = runner("to-param", src, "-o", tmp_path / "o.safetensors",
                 "--split", "attn.qkv.weight", "attn.q.weight,attn.k.weight,attn.v.weight")
    assert res.exit_code == 2, res.stderr
    assert "whose companion 'attn.qkv.weight_scale_inv' it cannot split" in res.stderr
    sd = {}
    for e in range(2):
        q = _fp8_quantize(torch.randn(128, 128))
        sd[f"experts.{e}.w1.weight"] = q["x.weight"]
        sd[f"experts.{e}.w1.weight_scale_inv"] = q["x.weight_scale_inv"]
    src = _save(tmp_path, sd, "experts.safetensors")
    res = runner("to-param", src, "-o", tmp_path / "o.safetensors", "--layers",
                 "experts.*.w1.weight", "--stack", "experts.{e}.w1.weight", "experts.w1")
    assert res.exit_code == 2 and "it cannot stack with it" in res.stderr, res.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_a_weight_normed_layer_with_many_outputs_verifies_whole(tmp_path, runner):
    """g normalizes across output channels where dim is None: the layer is checked on all of
    them, not a sample (a sample cannot know the norm)."""
    torch.manual_seed(0)
    for dim in (None, 0):
        model = nn.Sequential(nn.Linear(8, 300))
        parametrizations.weight_norm(model[0], dim=dim)
        save_file({k: v.detach() for k, v in model.state_dict().items()},
                  str(tmp_path / "wn.safetensors"))
        res = runner("to-param", tmp_path / "wn.safetensors", "-o", tmp_path / "p.safetensors",
                     "--overwrite")
        assert res.exit_code == 0, res.stderr


def test_zero_points_are_subtracted_before_scaling(tmp_path):
    """(W - z) * s, as compressed-tensors dequantizes: the verifier's effective weight."""
    from convert.companions import Role
    from convert.verify.layers import effective_weight

    w = torch.tensor([[20, 40], [60, 80]], dtype=torch.int8)
    s, z = torch.tensor([[1.0], [0.5]]), torch.tensor([[2], [4]], dtype=torch.int8)
    got = effective_weight(w, [("p.weight_scale", Role.SCALE, s, None),
                               ("p.weight_zero_point", Role.SCALE, z, None)], param=False)
    assert torch.equal(got, (w.float() - z.float()) * s)


def test_a_companion_rules_block_is_what_verification_dequantizes_with(tmp_path, runner):
    """A grid whose block the rule gives (100, not the 128 that would also tile it)."""
    torch.manual_seed(0)
    w = torch.randn(300, 200)
    grid = torch.rand(3, 2) + 0.5
    src = _save(tmp_path, {"p.weight": w.to(torch.float8_e4m3fn), "p.bias": torch.randn(300),
                           "p.weight_scale_inv": grid})
    rules = tmp_path / "rules.toml"
    rules.write_text("[[companion]]\nkey = '*.weight_scale_inv'\nrole = 'grid'\n"
                     "block = [100, 100]\n")
    res = runner("to-param", src, "-o", tmp_path / "p.safetensors", "--rules", rules,
                 "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.stderr
    import json

    checks = json.loads((tmp_path / "r.json").read_text())["verification"]["results"]
    assert [c["kind"] for c in checks if c["name"] == "p.weight_scale_inv"] == ["companion"]


def test_the_verifiers_spectral_norm_weight_is_torchs(tmp_path):
    """effective_weight's W / (u . W v) against the weight torch's spectral_norm computes, in
    both layouts: a wrong formula (or u and v swapped) fails here."""
    from convert.companions import Role
    from convert.verify.layers import effective_weight

    torch.manual_seed(0)
    lin = nn.utils.spectral_norm(nn.Linear(5, 7))
    lin(torch.randn(2, 5))
    lin.eval()
    with torch.no_grad():
        want = lin.weight.detach().clone()  # [out, in], as the hook computed it
    sd = lin.state_dict()
    comps = [("p.weight_u", Role.SCALE, sd["weight_u"], None),
             ("p.weight_v", Role.SCALE, sd["weight_v"], None)]
    torch.testing.assert_close(effective_weight(sd["weight_orig"], comps, param=False), want)
    torch.testing.assert_close(effective_weight(sd["weight_orig"].T, comps, param=True), want.T)
    swapped = [(k, r, c, b) for (k, r, _, b), (_, _, c, _) in zip(comps, comps[::-1])]
    with pytest.raises((RuntimeError, AssertionError)):
        torch.testing.assert_close(effective_weight(sd["weight_orig"], swapped, param=False),
                                   want)
