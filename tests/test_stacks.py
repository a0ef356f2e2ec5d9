"""Stacked experts: a 3-D `[E, in, out]` / `[E, out, in]` tensor converts by swapping its last two
dims, each expert a layer pair of its own; made with transformers' Mixtral and a hand-written
bmm twin."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import convert

E, HID, INTER = 4, 16, 24


class BmmExperts(nn.Module):
    """The param-layout twin of transformers' MixtralExperts: stacks used as x @ W[e]
    (torch.bmm / grouped GEMMs), `gate_up_proj` [E, H, 2I], `down_proj` [E, I, H]."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(E, HID, 2 * INTER))
        self.down_proj = nn.Parameter(torch.empty(E, INTER, HID))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.gate_up_proj[e]).chunk(2, dim=-1)
        return (nn.functional.silu(gate) * up) @ self.down_proj[e]


def _mixtral():
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(vocab_size=64, hidden_size=HID, intermediate_size=INTER,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1, num_local_experts=E,
                                        num_experts_per_tok=2)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def test_mixtral_experts_to_param_and_back(tmp_path, runner):
    model = _mixtral()
    src = tmp_path / "mixtral.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    experts = "model.layers.0.mlp.experts"
    only = ["--layers", f"{experts}.*_proj", "--exclude", "*.self_attn.*"]
    res = runner("to-param", src, "-o", tmp_path / "p.safetensors", *only, "--dry-run")
    assert res.exit_code == 0, res.stderr
    assert f"{experts}.gate_up_proj" in res.stdout and "4 x 48x16 -> 4 x 16x48" in res.stdout
    res = runner("to-param", src, "-o", tmp_path / "p.safetensors", *only)
    assert res.exit_code == 0, res.stderr
    assert "verified equivalent (" in res.stderr
    out = load_file(tmp_path / "p.safetensors")
    assert out[f"{experts}.gate_up_proj"].shape == (E, HID, 2 * INTER)
    assert out[f"{experts}.down_proj"].shape == (E, INTER, HID)

    # The hand-written bmm twin, loaded strictly, computes what Mixtral's experts compute.
    twin = BmmExperts()
    twin.load_state_dict({"gate_up_proj": out[f"{experts}.gate_up_proj"],
                          "down_proj": out[f"{experts}.down_proj"]}, strict=True)
    mixtral = model.model.layers[0].mlp.experts
    x = torch.randn(5, HID)
    for e in range(E):
        gate, up = nn.functional.linear(x, mixtral.gate_up_proj[e]).chunk(2, dim=-1)
        want = nn.functional.linear(mixtral.act_fn(gate) * up, mixtral.down_proj[e])
        torch.testing.assert_close(twin.expert(e, x), want)

    # Back with no options (provenance), bit-exact; the reverse loads into Mixtral strictly.
    res = runner("to-linear", tmp_path / "p.safetensors", "-o", tmp_path / "back.safetensors")
    assert res.exit_code == 0, res.stderr
    back = load_file(tmp_path / "back.safetensors")
    for k, v in load_file(src).items():
        assert torch.equal(back[k], v), k
    model.load_state_dict(back, strict=True)


def test_each_expert_is_its_own_layer_pair_and_a_nudged_one_fails(tmp_path, runner):
    g = torch.Generator().manual_seed(1)
    src = tmp_path / "moe.safetensors"
    save_file({"moe.experts.w1": torch.randn(E, 6, 10, generator=g),
               "moe.experts.w2": torch.randn(E, 10, 6, generator=g)}, str(src))
    res = runner("to-linear", src, "-o", tmp_path / "l.safetensors", "--layers",
                 "moe.experts.*")
    assert res.exit_code == 0, res.stderr
    res = runner("verify", src, tmp_path / "l.safetensors")
    assert res.exit_code == 0, res.stdout
    assert all(f"moe.experts.w1[{e}]" in res.stdout for e in range(E))
    sd = load_file(tmp_path / "l.safetensors")
    sd["moe.experts.w1"][2, 0, 0] += 0.5  # one weight of expert 2
    save_file(sd, str(tmp_path / "bad.safetensors"), metadata=_metadata(tmp_path / "l.safetensors"))
    res = runner("verify", src, tmp_path / "bad.safetensors")
    assert res.exit_code == 1, res.stdout
    failed = [line.split()[2] for line in res.stdout.splitlines() if line.startswith("FAIL")]
    assert failed == ["moe.experts.w1[2]"]


def _metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_a_stack_with_an_expert_bias_is_decided_by_it(tmp_path):
    g = torch.Generator().manual_seed(2)
    sd = {"mlp.experts.weight": torch.randn(E, 6, 10, generator=g),  # [E, in, out]
          "mlp.experts.bias": torch.randn(E, 10, generator=g)}      # [E, out]: param layout
    save_file(sd, str(tmp_path / "b.safetensors"))
    report = convert.to_linear(tmp_path / "b.safetensors", tmp_path / "o.safetensors")
    (w,) = report.plan.transposed
    assert w.key == "mlp.experts.weight" and w.shape == (E, 10, 6)
    assert "bias evidence" in w.reason
    assert report.verification is not None and report.verification.equivalent
    assert len([r for r in report.verification.results if r.kind == "layer"]) == E


def test_a_square_stack_without_evidence_is_exit_2(tmp_path, runner):
    save_file({"experts.w": torch.randn(E, 8, 8)}, str(tmp_path / "sq.safetensors"))
    res = runner("to-linear", tmp_path / "sq.safetensors")
    assert res.exit_code == 2 and "'experts.w'" in res.stderr, res.stderr


def test_a_stack_selection_contradicting_its_bias_is_exit_2(tmp_path, runner):
    sd = {"experts.weight": torch.randn(E, 10, 6),  # [E, out, in]: linear, says the bias
          "experts.bias": torch.randn(E, 10)}
    save_file(sd, str(tmp_path / "c.safetensors"))
    res = runner("to-linear", tmp_path / "c.safetensors", "--layers", "experts.weight")
    assert res.exit_code == 2 and "double transpose" in res.stderr, res.stderr


def test_convolution_kernels_stay_out_of_it(tmp_path):
    sd = {"conv.weight": torch.randn(8, 3, 3, 3), "conv.bias": torch.randn(8),
          "fc.weight": torch.randn(5, 7), "fc.bias": torch.randn(7)}
    torch.save(sd, tmp_path / "cnn.pt")
    report = convert.to_linear(tmp_path / "cnn.pt", tmp_path / "o.safetensors")
    assert [e.key for e in report.plan.transposed] == ["fc.weight"]
    assert not any("conv.weight" in w for w in report.warnings)


def test_a_pt_stack_streams_expert_by_expert(tmp_path):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(E, 6, 10, generator=g)
    torch.save({"experts.w": w}, tmp_path / "s.pt")
    convert.to_linear(tmp_path / "s.pt", tmp_path / "o.safetensors", layers=["experts.w"])
    assert torch.equal(load_file(tmp_path / "o.safetensors")["experts.w"], w.transpose(1, 2))
    convert.to_linear(tmp_path / "s.pt", tmp_path / "o.pt", layers=["experts.w"])
    assert torch.equal(torch.load(tmp_path / "o.pt", weights_only=True)["experts.w"],
                       w.transpose(1, 2))


# --- stack and unstack ------------------------------------------------------------------------

W1 = ("layers.{l}.experts.{e}.w1.weight", "layers.{l}.experts.w1")
W2 = ("layers.{l}.experts.{e}.w2.weight", "layers.{l}.experts.w2")


def _per_expert(tmp_path, layers: int = 2):
    """The Hub's per-expert layout: E separate nn.Linear weights [I, H] and [H, I]."""
    g = torch.Generator().manual_seed(4)
    sd = {}
    for layer in range(layers):
        for e in range(E):
            sd[f"layers.{layer}.experts.{e}.w1.weight"] = torch.randn(INTER, HID, generator=g)
            sd[f"layers.{layer}.experts.{e}.w2.weight"] = torch.randn(HID, INTER, generator=g)
        sd[f"layers.{layer}.norm.weight"] = torch.ones(HID)
    src = tmp_path / "experts.safetensors"
    save_file(sd, str(src))
    return src, sd


def test_per_expert_weights_stack_into_grouped_experts_and_back(tmp_path, runner):
    src, sd = _per_expert(tmp_path)
    args = ["--stack", *W1, "--stack", *W2, "--layers", "layers.*.experts.*.weight"]
    res = runner("to-param", src, "-o", tmp_path / "g.safetensors", *args, "--dry-run")
    assert res.exit_code == 0, res.stderr
    line = next(x for x in res.stdout.splitlines() if " layers.0.experts.0.w1.weight " in x)
    assert "layers.0.experts.w1" in line and "stacked by --stack" in line
    res = runner("to-param", src, "-o", tmp_path / "g.safetensors", *args)
    assert res.exit_code == 0, res.stderr
    out = load_file(tmp_path / "g.safetensors")
    assert sorted(out) == ["layers.0.experts.w1", "layers.0.experts.w2", "layers.0.norm.weight",
                           "layers.1.experts.w1", "layers.1.experts.w2", "layers.1.norm.weight"]
    for layer in range(2):
        want = torch.stack([sd[f"layers.{layer}.experts.{e}.w1.weight"].t() for e in range(E)])
        assert torch.equal(out[f"layers.{layer}.experts.w1"], want)  # [E, H, I]: x @ W[e]
    # verify pairs each expert with its row of the stack; a nudged row fails, named
    res = runner("verify", src, tmp_path / "g.safetensors")
    assert res.exit_code == 0, res.stdout
    assert "layers.1.experts.w2[3]" in res.stdout
    # back with no options: provenance unstacks, bit-exact, the Hub's names again
    res = runner("to-linear", tmp_path / "g.safetensors", "-o", tmp_path / "back.safetensors")
    assert res.exit_code == 0, res.stderr
    back = load_file(tmp_path / "back.safetensors")
    assert sorted(back) == sorted(sd)
    assert all(torch.equal(back[k], v) for k, v in sd.items())


def test_a_nudged_expert_of_a_stack_fails_verification_named(tmp_path, runner):
    src, _ = _per_expert(tmp_path, layers=1)
    convert.to_param(src, tmp_path / "g.safetensors", stack=[W1, W2],
                     layers=["layers.*.experts.*.weight"])
    from safetensors import safe_open

    with safe_open(str(tmp_path / "g.safetensors"), "pt") as f:
        meta = f.metadata()
    out = load_file(tmp_path / "g.safetensors")
    out["layers.0.experts.w1"][1, 2, 3] += 1.0
    save_file(out, str(tmp_path / "bad.safetensors"), metadata=meta)
    res = runner("verify", src, tmp_path / "bad.safetensors")
    assert res.exit_code == 1
    failed = [line.split()[2] for line in res.stdout.splitlines() if line.startswith("FAIL")]
    assert failed == ["layers.0.experts.w1[1]"]


def test_grouped_experts_unstack_into_per_expert_linear_weights(tmp_path):
    g = torch.Generator().manual_seed(5)
    stacked = torch.randn(E, HID, INTER, generator=g)  # torchtitan: [E, H, I], x @ W[e]
    save_file({"layers.0.experts.w1": stacked}, str(tmp_path / "tt.safetensors"))
    report = convert.to_linear(tmp_path / "tt.safetensors", tmp_path / "hub.safetensors",
                               stack=[W1], layers=["layers.0.experts.w1"])
    out = load_file(tmp_path / "hub.safetensors")
    assert list(out) == [f"layers.0.experts.{e}.w1.weight" for e in range(E)]
    for e in range(E):
        assert torch.equal(out[f"layers.0.experts.{e}.w1.weight"], stacked[e].t())
        lin = nn.Linear(HID, INTER, bias=False)
        lin.load_state_dict({"weight": out[f"layers.0.experts.{e}.w1.weight"]})
        x = torch.randn(3, HID)
        torch.testing.assert_close(lin(x), x @ stacked[e])
    assert report.verification is not None and report.verification.equivalent
    back = convert.to_param(tmp_path / "hub.safetensors", tmp_path / "tt2.safetensors")
    assert back.plan.entries[0].key == "layers.0.experts.w1"
    assert torch.equal(load_file(tmp_path / "tt2.safetensors")["layers.0.experts.w1"], stacked)


def test_stack_rules_from_a_rules_file_and_to_pt(tmp_path):
    src, sd = _per_expert(tmp_path, layers=1)
    rules = tmp_path / "moe.toml"
    rules.write_text('layers = ["layers.*.experts.*.weight"]\n'
                     "[[stack]]\nfrom = 'layers.{l}.experts.{e}.w1.weight'\n"
                     "to = 'layers.{l}.experts.w1'\n")
    convert.to_param(src, tmp_path / "g.pt", rules=rules)
    out = torch.load(tmp_path / "g.pt", weights_only=True)
    want = torch.stack([sd[f"layers.0.experts.{e}.w1.weight"].t() for e in range(E)])
    assert torch.equal(out["layers.0.experts.w1"], want)
    assert out["layers.0.experts.0.w2.weight"].shape == (INTER, HID)  # not stacked: transposed


@pytest.mark.parametrize("case", ["missing member", "matches nothing", "bad placeholders",
                                  "mixed decisions"])
def test_bad_stack_rules_are_exit_2(tmp_path, runner, case):
    src, sd = _per_expert(tmp_path, layers=1)
    args = ["--stack", *W1, "--layers", "layers.*.experts.*.weight"]
    if case == "missing member":
        del sd["layers.0.experts.2.w1.weight"]
        save_file(sd, str(src))
    elif case == "matches nothing":
        args = ["--stack", "nope.{e}.weight", "nope", "--layers", "layers.*.experts.*.weight"]
    elif case == "bad placeholders":
        args = ["--stack", "layers.{l}.experts.w1.weight", "x", "--layers", "*"]
    else:
        args = ["--stack", *W1, "--layers", "layers.*.experts.[01].w1.weight", "--layers",
                "layers.*.experts.*.w2.weight", "--exclude", "layers.*.experts.[23].w1.weight"]
    for flags in ([], ["--dry-run"]):
        res = runner("to-param", src, "-o", tmp_path / "o.safetensors", *args, *flags)
        assert res.exit_code == 2, (case, res.stderr)
        assert res.stderr.count("\n") == 1 and "stack" in res.stderr, res.stderr
    assert not (tmp_path / "o.safetensors").exists()


# --- what review found ------------------------------------------------------------------------

def test_stacked_experts_with_biases_round_trip(tmp_path, runner):
    g = torch.Generator().manual_seed(8)
    sd = {}
    for e in range(E):
        sd[f"moe.experts.{e}.fc.weight"] = torch.randn(5, 3, generator=g)  # nn.Linear(3, 5)
        sd[f"moe.experts.{e}.fc.bias"] = torch.randn(5, generator=g)
    save_file(sd, str(tmp_path / "pe.safetensors"))
    rule = ("moe.experts.{e}.fc.{name}", "moe.experts.fc.{name}")
    convert.to_param(tmp_path / "pe.safetensors", tmp_path / "st.safetensors", stack=[rule])
    out = load_file(tmp_path / "st.safetensors")
    assert out["moe.experts.fc.weight"].shape == (E, 3, 5)
    assert out["moe.experts.fc.bias"].shape == (E, 5)
    res = runner("to-linear", tmp_path / "st.safetensors", "-o", tmp_path / "back.safetensors")
    assert res.exit_code == 0, res.stderr
    back = load_file(tmp_path / "back.safetensors")
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], v) for k, v in sd.items())


def test_unstacking_a_weight_beside_its_stacked_bias_verifies(tmp_path):
    g = torch.Generator().manual_seed(9)
    sd = {"experts.w.weight": torch.randn(E, 3, 5, generator=g),  # [E, in, out]
          "experts.w.bias": torch.randn(E, 5, generator=g)}       # [E, out]
    save_file(sd, str(tmp_path / "s.safetensors"))
    report = convert.to_linear(tmp_path / "s.safetensors", tmp_path / "u.safetensors",
                               stack=[("experts.{e}.w.weight", "experts.w.weight")])
    assert report.verification is not None and report.verification.equivalent
    out = load_file(tmp_path / "u.safetensors")
    assert out["experts.2.w.weight"].shape == (5, 3) and out["experts.w.bias"].shape == (E, 5)


def test_export_keeps_a_stack_made_by_a_rule(tmp_path):
    src, sd = _per_expert(tmp_path, layers=1)
    report = convert.export(src, tmp_path / "e.safetensors", layout="linear", stack=[W1],
                            layers=["layers.*.experts.*.weight"])
    out = load_file(tmp_path / "e.safetensors")
    want = torch.stack([sd[f"layers.0.experts.{e}.w1.weight"] for e in range(E)])
    assert torch.equal(out["layers.0.experts.w1"], want)  # stacked, layout kept
    assert report.verification is not None and report.verification.equivalent


def test_dropping_a_key_while_reversing_provenance(tmp_path):
    src, _ = _per_expert(tmp_path, layers=1)
    convert.to_param(src, tmp_path / "p.safetensors", layers=["layers.*.experts.*.weight"])
    sd = load_file(tmp_path / "p.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "p.safetensors"), "pt") as f:
        meta = f.metadata()
    sd["added.later"] = torch.zeros(2)  # a key the provenance does not list, dropped
    save_file(sd, str(tmp_path / "p2.safetensors"), metadata=meta)
    report = convert.to_linear(tmp_path / "p2.safetensors", tmp_path / "l.safetensors",
                               drop=["added.later"])
    assert "added.later" not in load_file(tmp_path / "l.safetensors")
    assert report.plan.from_provenance


def test_the_dry_run_names_each_member_once(tmp_path, runner):
    src, _ = _per_expert(tmp_path, layers=1)
    res = runner("to-param", src, "-o", tmp_path / "g.safetensors", "--stack", *W1, "--layers",
                 "layers.*.experts.*.weight", "--dry-run")
    assert res.exit_code == 0, res.stderr
    stack_lines = [x for x in res.stdout.splitlines() if "layers.0.experts.w1 " in x]
    assert len(stack_lines) == 1 and "(+3 more)" in stack_lines[0]


def test_qwen2_moe_experts_to_grouped_and_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=HID, intermediate_size=32,
                                         moe_intermediate_size=INTER, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         num_experts=E, num_experts_per_tok=2,
                                         shared_expert_intermediate_size=8)
    torch.manual_seed(2)
    model = transformers.Qwen2MoeForCausalLM(config).eval()
    src = tmp_path / "qwen.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(src))
    report = convert.to_param(src, tmp_path / "g.safetensors",
                              layers=["model.layers.*.mlp.experts.*_proj"],
                              exclude=["model.layers.*.self_attn.*", "*.shared_expert*"])
    assert report.verification is not None and report.verification.equivalent
    assert len([r for r in report.verification.results if r.kind == "layer"]) == 2 * E
    out = load_file(tmp_path / "g.safetensors")
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(3, HID)
    for e in range(E):
        gate, up = (x @ out["model.layers.0.mlp.experts.gate_up_proj"][e]).chunk(2, dim=-1)
        got = (experts.act_fn(gate) * up) @ out["model.layers.0.mlp.experts.down_proj"][e]
        gate, up = nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        want = nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])
        torch.testing.assert_close(got, want)
    convert.to_linear(tmp_path / "g.safetensors", tmp_path / "back.safetensors")
    model.load_state_dict(load_file(tmp_path / "back.safetensors"), strict=True)


def test_a_stack_alone_is_a_change_even_with_nothing_to_transpose(tmp_path):
    """The Hub's per-expert nn.Linear weights into transformers 5's stacked [E, out, in] (both
    linear layout): nothing transposes, the stack is the conversion."""
    src, sd = _per_expert(tmp_path, layers=1)
    report = convert.to_linear(src, tmp_path / "tf5.safetensors", stack=[W1, W2],
                               layers=["layers.*.experts.*.weight"], exclude=["*"])
    assert report.plan.transposed == ()
    out = load_file(tmp_path / "tf5.safetensors")
    want = torch.stack([sd[f"layers.0.experts.{e}.w1.weight"] for e in range(E)])
    assert torch.equal(out["layers.0.experts.w1"], want)
    assert report.verification is not None and report.verification.equivalent
