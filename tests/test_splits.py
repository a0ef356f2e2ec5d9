"""Fused projections: one fused tensor <-> its parts along the output dim (GPT-2's c_attn made by
transformers, NeoX's per-head interleave, grouped-query sizes), both ways, bit-exact."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import convert

QKV = ("h.{l}.attn.c_attn.weight",
       "h.{l}.attn.q_proj.weight,h.{l}.attn.k_proj.weight,h.{l}.attn.v_proj.weight")


def _gpt2(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=8, n_head=2, n_layer=1, vocab_size=32, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2Model(config).eval()
    src = tmp_path / "gpt2.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()
               if not k.endswith(".attn.bias")}, str(src))
    return model, src


def test_gpt2_c_attn_splits_into_q_k_v_linear_layers_and_merges_back(tmp_path, runner):
    model, src = _gpt2(tmp_path)
    args = ["--preset", "gpt2", "--split", *QKV]
    res = runner("to-linear", src, "-o", tmp_path / "qkv.safetensors", *args)
    assert res.exit_code == 0, res.stderr
    out = load_file(tmp_path / "qkv.safetensors")
    assert "h.0.attn.c_attn.weight" not in out and "h.0.attn.c_attn.bias" not in out
    conv = model.h[0].attn.c_attn  # transformers' Conv1D: x @ W + b, W [d, 3d]
    x = torch.randn(3, 8)
    fused = conv(x)
    for i, name in enumerate(["q_proj", "k_proj", "v_proj"]):
        lin = nn.Linear(8, 8)
        lin.load_state_dict({"weight": out[f"h.0.attn.{name}.weight"],
                             "bias": out[f"h.0.attn.{name}.bias"]}, strict=True)
        torch.testing.assert_close(lin(x), fused[:, i * 8:(i + 1) * 8])
    res = runner("verify", src, tmp_path / "qkv.safetensors")
    assert res.exit_code == 0, res.stdout
    res = runner("to-param", tmp_path / "qkv.safetensors", "-o", tmp_path / "back.safetensors")
    assert res.exit_code == 0, res.stderr
    back = load_file(tmp_path / "back.safetensors")
    for k, v in load_file(src).items():
        assert torch.equal(back[k], v), k


def test_k_and_v_swapped_fails_verification_naming_them(tmp_path, runner):
    _, src = _gpt2(tmp_path)
    convert.to_linear(src, tmp_path / "qkv.safetensors", preset="gpt2", split=[QKV])
    with safe_open(str(tmp_path / "qkv.safetensors"), "pt") as f:
        meta = f.metadata()
    out = load_file(tmp_path / "qkv.safetensors")
    out["h.0.attn.k_proj.weight"], out["h.0.attn.v_proj.weight"] = (
        out["h.0.attn.v_proj.weight"].clone(), out["h.0.attn.k_proj.weight"].clone())
    save_file(out, str(tmp_path / "bad.safetensors"), metadata=meta)
    res = runner("verify", src, tmp_path / "bad.safetensors")
    assert res.exit_code == 1, res.stdout
    failed = sorted(line.split()[2] for line in res.stdout.splitlines() if line.startswith("FAIL"))
    assert failed == ["h.0.attn.k_proj.weight", "h.0.attn.v_proj.weight"]


def _neox(tmp_path, heads=2, hd=3, d=5):
    g = torch.Generator().manual_seed(6)
    qkv = torch.randn(heads * 3 * hd, d, generator=g)  # nn.Linear: [heads x (q, k, v) x hd, d]
    bias = torch.randn(heads * 3 * hd, generator=g)
    src = tmp_path / "neox.safetensors"
    save_file({"l.0.attention.query_key_value.weight": qkv,
               "l.0.attention.query_key_value.bias": bias}, str(src))
    return src, qkv, bias


NEOX = ["--split", "l.{n}.attention.query_key_value.weight",
        "l.{n}.attention.q.weight,l.{n}.attention.k.weight,l.{n}.attention.v.weight"]


def test_neox_heads_interleave_is_undone(tmp_path, runner):
    src, qkv, bias = _neox(tmp_path)
    rules = tmp_path / "neox.toml"
    rules.write_text("[[split]]\nfrom = 'l.{n}.attention.query_key_value.weight'\n"
                     "to = ['l.{n}.attention.q.weight', 'l.{n}.attention.k.weight', "
                     "'l.{n}.attention.v.weight']\nheads = 2\n")
    # the layout is linear (the bias has the rows' length); to-linear would change nothing
    res = runner("to-param", src, "-o", tmp_path / "p.safetensors", "--rules", rules)
    assert res.exit_code == 0, res.stderr
    out = load_file(tmp_path / "p.safetensors")
    per_head = qkv.view(2, 3, 3, 5)
    bias_head = bias.view(2, 3, 3)
    for i, name in enumerate("qkv"):
        want = per_head[:, i].reshape(6, 5)  # [heads x hd, d], then param layout [d, heads x hd]
        assert torch.equal(out[f"l.0.attention.{name}.weight"], want.t())
        assert torch.equal(out[f"l.0.attention.{name}.bias"], bias_head[:, i].reshape(6))
    back = convert.to_linear(tmp_path / "p.safetensors", tmp_path / "back.safetensors")
    assert sorted(e.key for e in back.plan.entries) == [
        "l.0.attention.query_key_value.bias", "l.0.attention.query_key_value.weight"]
    got = load_file(tmp_path / "back.safetensors")
    assert torch.equal(got["l.0.attention.query_key_value.weight"], qkv)
    assert torch.equal(got["l.0.attention.query_key_value.bias"], bias)


def test_a_neox_split_without_heads_fails_against_the_interleaved_truth(tmp_path, runner):
    src, qkv, _ = _neox(tmp_path)
    convert.to_param(src, tmp_path / "flat.safetensors", split=[NEOX[1:]])
    flat = load_file(tmp_path / "flat.safetensors")["l.0.attention.q.weight"]
    truth = qkv.view(2, 3, 3, 5)[:, 0].reshape(6, 5).t()
    assert not torch.equal(flat, truth)  # without heads it is the first rows, not the q heads


def test_grouped_query_sizes_and_merge(tmp_path):
    g = torch.Generator().manual_seed(7)
    parts = {"a.q.weight": torch.randn(8, 4, generator=g),
             "a.k.weight": torch.randn(2, 4, generator=g),
             "a.v.weight": torch.randn(2, 4, generator=g), "a.q.bias": torch.randn(8, generator=g),
             "a.k.bias": torch.randn(2, generator=g), "a.v.bias": torch.randn(2, generator=g)}
    save_file(parts, str(tmp_path / "parts.safetensors"))
    rule = ("a.qkv.weight", "a.q.weight,a.k.weight,a.v.weight")
    report = convert.to_param(tmp_path / "parts.safetensors", tmp_path / "fused.safetensors",
                              split=[rule])
    fused = load_file(tmp_path / "fused.safetensors")
    want = torch.cat([parts["a.q.weight"], parts["a.k.weight"], parts["a.v.weight"]]).t()
    assert torch.equal(fused["a.qkv.weight"], want) and fused["a.qkv.bias"].shape == (12,)
    assert report.verification is not None and report.verification.equivalent
    back = convert.to_linear(tmp_path / "fused.safetensors", tmp_path / "again.safetensors")
    again = load_file(tmp_path / "again.safetensors")
    assert sorted(again) == sorted(parts)
    assert all(torch.equal(again[k], v) for k, v in parts.items())
    assert back.verification is not None and back.verification.equivalent


@pytest.mark.parametrize("case", ["sizes do not add up", "heads do not divide", "no layout",
                                  "missing part", "matches nothing"])
def test_bad_split_rules_are_exit_2(tmp_path, runner, case):
    src, _, _ = _neox(tmp_path)
    fused = "l.{n}.attention.query_key_value.weight"
    parts = "l.{n}.attention.q.weight,l.{n}.attention.k.weight,l.{n}.attention.v.weight"
    rules = tmp_path / "r.toml"
    extra = {"sizes do not add up": "sizes = [6, 6, 7]", "heads do not divide": "heads = 4"}
    rules.write_text(f"[[split]]\nfrom = '{fused}'\nto = {parts.split(',')!r}\n"
                     + extra.get(case, "") + "\n")
    args = ["--rules", rules]
    if case == "no layout":
        save_file({"l.0.attention.query_key_value.weight": torch.randn(18, 18)},
                  str(src))
        args += ["--exclude", "*"]
    elif case == "missing part":
        save_file({"l.0.attention.q.weight": torch.randn(6, 5),
                   "l.0.attention.k.weight": torch.randn(6, 5)}, str(src))
        args += ["--layers", "*"]
    elif case == "matches nothing":
        args = ["--split", "x.{n}.w", "x.{n}.a,x.{n}.b"]
    for flags in ([], ["--dry-run"]):
        res = runner("to-param", src, "-o", tmp_path / "o.safetensors", *args, *flags)
        assert res.exit_code == 2, (case, res.stderr)
        assert res.stderr.count("\n") == 1, res.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_the_gpt2_qkv_preset_splits_and_merges(tmp_path):
    model, src = _gpt2(tmp_path)
    convert.to_linear(src, tmp_path / "qkv.safetensors", preset="gpt2-qkv")
    out = load_file(tmp_path / "qkv.safetensors")
    assert out["h.0.attn.q_proj.weight"].shape == (8, 8) and "h.0.attn.c_attn.weight" not in out
    assert out["h.0.mlp.c_fc.weight"].shape == (32, 8)  # the other Conv1D layers transposed
    convert.to_param(tmp_path / "qkv.safetensors", tmp_path / "back.safetensors")
    back = load_file(tmp_path / "back.safetensors")
    assert all(torch.equal(back[k], v) for k, v in load_file(src).items())


def test_gpt_neox_query_key_value_splits_per_head_as_transformers_reads_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(vocab_size=32, hidden_size=12, num_attention_heads=3,
                                        num_hidden_layers=1, intermediate_size=16)
    torch.manual_seed(1)
    model = transformers.GPTNeoXModel(config).eval()
    src = tmp_path / "neox.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    rules = tmp_path / "neox.toml"
    rules.write_text(
        "[[split]]\nfrom = 'layers.{l}.attention.query_key_value.weight'\n"
        "to = ['layers.{l}.attention.q.weight', 'layers.{l}.attention.k.weight', "
        "'layers.{l}.attention.v.weight']\nheads = 3\n")
    report = convert.to_param(src, tmp_path / "p.safetensors", rules=rules,
                              layers=["layers.*.attention.query_key_value.weight"],
                              exclude=["layers.*.attention.dense.weight", "layers.*.mlp.*",
                                       "embed_in.weight"])
    assert report.verification is not None and report.verification.equivalent
    out = load_file(tmp_path / "p.safetensors")
    attn = model.layers[0].attention
    x = torch.randn(2, 5, 12)
    with torch.no_grad():  # what GPTNeoXAttention.forward does with query_key_value
        qkv = attn.query_key_value(x).view(2, 5, -1, 3 * attn.head_size)
        want_q, want_k, want_v = qkv.chunk(3, dim=-1)
        for name, want in zip("qkv", (want_q, want_k, want_v)):
            w, b = out[f"layers.0.attention.{name}.weight"], out[f"layers.0.attention.{name}.bias"]
            got = (x @ w + b).view(2, 5, 3, attn.head_size)  # the param layout: x @ W + b
            torch.testing.assert_close(got, want)
    back = convert.to_linear(tmp_path / "p.safetensors", tmp_path / "back.safetensors")
    assert back.verification is not None and back.verification.equivalent
    model.load_state_dict(load_file(tmp_path / "back.safetensors"), strict=True)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_split_reads_its_rows_from_either_source_format(tmp_path, suffix):
    src, qkv, bias = _neox(tmp_path)
    if suffix == ".pt":
        torch.save(load_file(src), tmp_path / "neox.pt")
        src = tmp_path / "neox.pt"
    # the same layout on both sides: the rows of a linear-layout weight, read where they lie
    convert.to_linear(src, tmp_path / "o.safetensors", split=[NEOX[1:]])
    out = load_file(tmp_path / "o.safetensors")
    for i, name in enumerate("qkv"):
        assert torch.equal(out[f"l.0.attention.{name}.weight"], qkv[i * 6:(i + 1) * 6])
        assert torch.equal(out[f"l.0.attention.{name}.bias"], bias[i * 6:(i + 1) * 6])


def test_a_merge_of_parts_of_different_widths_is_exit_2_when_planning(tmp_path, runner):
    """Parts must agree in every dim but the one they are joined along: refused by the plan
    (a dry run says so too), never a failure halfway through writing."""
    from safetensors.torch import save_file

    save_file({"a.weight": torch.randn(8, 6), "a.bias": torch.randn(8),
               "b.weight": torch.randn(8, 5), "b.bias": torch.randn(8)},
              str(tmp_path / "parts.safetensors"))
    for extra in (["--dry-run"], []):
        res = runner("to-param", tmp_path / "parts.safetensors", "-o", tmp_path / "o.safetensors",
                     "--split", "ab.weight", "a.weight,b.weight", *extra)
        assert res.exit_code == 2, res.stderr
        assert "differ beyond the dim they are joined along" in res.stderr, res.stderr
