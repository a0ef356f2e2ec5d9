"""The MoE presets, against the real thing: transformers 5 saves Mixtral, Qwen2-MoE and OLMoE with
per-expert nn.Linear weights (save_pretrained, the Hub's layout) and holds them stacked in
`model.state_dict()` (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]). A stack rule followed by
a split rule's merge goes from one to the other; the split then the unstack comes back."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert

transformers = pytest.importorskip("transformers")

E = 4


def _mixtral():
    return transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_local_experts=E,
        num_experts_per_tok=2))


def _olmoe():
    return transformers.OlmoeForCausalLM(transformers.OlmoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, num_experts=E, num_experts_per_tok=2))


def _qwen2_moe():
    return transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, num_experts=E,
        num_experts_per_tok=2, shared_expert_intermediate_size=8))


FAMILIES = {"mixtral": (_mixtral, "mixtral", "mixtral-hub"),
            "olmoe": (_olmoe, "qwen-moe", "qwen-moe"),
            "qwen2-moe": (_qwen2_moe, "qwen-moe", "qwen-moe")}


def _both_layouts(tmp_path, make):
    torch.manual_seed(0)
    model = make().eval()
    model.save_pretrained(tmp_path / "hub")
    hub = tmp_path / "hub" / "model.safetensors"
    stacked = tmp_path / "tf5.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(stacked))
    return model, hub, stacked


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", FAMILIES)
def test_hub_per_expert_to_transformers_stacked_and_back(tmp_path, family):
    make, to_stacked, to_hub = FAMILIES[family]
    model, hub, stacked = _both_layouts(tmp_path, make)
    out = tmp_path / "converted.safetensors"
    report = convert.to_linear(hub, out, preset=to_stacked)
    assert report.verification is not None and report.verification.equivalent
    assert _equal(load_file(out), load_file(stacked))
    twin = make().eval()
    twin.load_state_dict(load_file(out), strict=True)
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, model(ids).logits)
    # back with no options (provenance), and from the stacked file with the preset
    convert.to_param(out, tmp_path / "back.safetensors")
    assert _equal(load_file(tmp_path / "back.safetensors"), load_file(hub))
    convert.to_linear(stacked, tmp_path / "hub-again.safetensors", preset=to_hub)
    assert _equal(load_file(tmp_path / "hub-again.safetensors"), load_file(hub))


def test_a_nudged_expert_in_the_merged_tensor_fails_naming_it(tmp_path, runner):
    _, hub, _ = _both_layouts(tmp_path, _mixtral)
    out = tmp_path / "converted.safetensors"
    assert runner("to-linear", hub, "-o", out, "--preset", "mixtral").exit_code == 0
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    key = "model.layers.1.mlp.experts.gate_up_proj"
    sd[key][2, 30, 5] += 1e-3  # expert 2's up_proj
    save_file(sd, str(out), metadata=meta)
    res = runner("verify", hub, out)
    assert res.exit_code == 1
    assert any(line.startswith("FAIL") and f"{key}[2]" in line and "in member 2" in line
               for line in res.stdout.splitlines()), res.stdout


def test_a_merge_missing_a_stack_is_exit_2(tmp_path, runner):
    _, hub, _ = _both_layouts(tmp_path, _mixtral)
    sd = {k: v for k, v in load_file(hub).items() if ".w3." not in k}
    save_file(sd, str(tmp_path / "no-w3.safetensors"))
    res = runner("to-linear", tmp_path / "no-w3.safetensors", "-o", tmp_path / "o.safetensors",
                 "--preset", "mixtral")
    assert res.exit_code == 2
    assert "experts.w3' is missing, so its parts cannot be merged" in res.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_a_pt_output_merges_the_same(tmp_path):
    _, hub, stacked = _both_layouts(tmp_path, _qwen2_moe)
    convert.to_linear(hub, tmp_path / "tf5.pt", preset="qwen-moe")
    assert _equal(torch.load(tmp_path / "tf5.pt", weights_only=True), load_file(stacked))


def test_gpt_neox_preset_splits_per_head_with_heads_from_config_json(tmp_path, runner):
    config = transformers.GPTNeoXConfig(vocab_size=32, hidden_size=12, num_attention_heads=3,
                                        num_hidden_layers=2, intermediate_size=16)
    torch.manual_seed(1)
    model = transformers.GPTNeoXForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "pythia")
    res = runner("to-linear", tmp_path / "pythia", "-o", tmp_path / "split",
                 "--preset", "gpt-neox-qkv")
    assert res.exit_code == 0, res.stderr
    (shard,) = (tmp_path / "split").glob("model-*.safetensors")
    out = load_file(shard)
    attn = model.gpt_neox.layers[1].attention
    x = torch.randn(2, 5, 12)
    with torch.no_grad():  # what GPTNeoXAttention.forward does with query_key_value
        qkv = attn.query_key_value(x).view(2, 5, -1, 3 * attn.head_size).chunk(3, dim=-1)
        for name, want in zip(("q_proj", "k_proj", "v_proj"), qkv):
            key = f"gpt_neox.layers.1.attention.{name}"
            got = torch.nn.functional.linear(x, out[f"{key}.weight"], out[f"{key}.bias"])
            torch.testing.assert_close(got.view(2, 5, 3, attn.head_size), want)
    res = runner("to-param", tmp_path / "split", "-o", tmp_path / "back")  # provenance: merged
    assert res.exit_code == 0, res.stderr
    (shard,) = (tmp_path / "back").glob("model-*.safetensors")
    assert _equal(load_file(shard), load_file(tmp_path / "pythia" / "model.safetensors"))
    # without a config.json the preset cannot know the heads: exit 2, saying so
    (tmp_path / "pythia" / "config.json").unlink()
    res = runner("to-linear", tmp_path / "pythia", "-o", tmp_path / "x", "--preset",
                 "gpt-neox-qkv")
    assert res.exit_code == 2 and "config.json" in res.stderr, res.stderr


def test_per_expert_to_a_transposed_interleaved_stack_and_back(tmp_path):
    """Composition in the param layout: each expert's w1 and w3 transposed, joined per group of
    heads along their output dim (the columns), stacked; the reverse from provenance alone."""
    _, hub, _ = _both_layouts(tmp_path, _mixtral)
    moe = "model.layers.{l}.block_sparse_moe.experts"
    rules = tmp_path / "rules.toml"
    rules.write_text(
        f"layers = ['model.layers.*.block_sparse_moe.experts.*.weight']\n"
        f"[[stack]]\nfrom = '{moe}.{{e}}.w1.weight'\nto = '{moe}.w1'\n"
        f"[[stack]]\nfrom = '{moe}.{{e}}.w3.weight'\nto = '{moe}.w3'\n"
        f"[[split]]\nfrom = '{moe}.gate_up_proj'\nto = ['{moe}.w1', '{moe}.w3']\nheads = 2\n")
    out = tmp_path / "grouped.safetensors"
    report = convert.to_param(hub, out, rules=rules,
                              exclude=["*.self_attn.*", "*embed*", "lm_head*", "*.gate.weight"])
    assert report.verification is not None and report.verification.equivalent
    sd, src = load_file(out), load_file(hub)
    w1, w3 = (src[f"model.layers.1.block_sparse_moe.experts.2.{n}.weight"] for n in ("w1", "w3"))
    h = w1.shape[0] // 2
    assert torch.equal(sd["model.layers.1.block_sparse_moe.experts.gate_up_proj"][2],
                       torch.cat([w1[:h], w3[:h], w1[h:], w3[h:]]).T)
    convert.to_linear(out, tmp_path / "back.safetensors")
    assert _equal(load_file(tmp_path / "back.safetensors"), src)
