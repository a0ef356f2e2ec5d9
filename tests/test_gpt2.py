"""GPT-2's Conv1D (param layout) to nn.Linear, on a real transformers model."""

from __future__ import annotations

import textwrap

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import convert

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

CONFIG = {"n_layer": 2, "n_embd": 8, "n_head": 2, "vocab_size": 50, "n_positions": 16,
          "bos_token_id": 0, "eos_token_id": 0}


def _gpt2() -> nn.Module:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))
    return model.eval()


def linear_gpt2() -> nn.Module:
    """The same GPT-2 with every Conv1D replaced by the nn.Linear computing the same function."""
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                nx, nf = child.weight.shape
                setattr(parent, name, nn.Linear(nx, nf, device=child.weight.device))
    return model.eval()


@pytest.fixture
def gpt2_folder(tmp_path):
    model = _gpt2()
    folder = tmp_path / "gpt2"
    model.save_pretrained(folder)  # safetensors; the tied lm_head.weight is not saved
    return model, folder


def test_square_c_proj_is_ambiguous_without_a_preset(gpt2_folder):
    _, folder = gpt2_folder
    with pytest.raises(convert.UsageError) as e:
        convert.to_linear(folder, folder.parent / "o.safetensors")
    assert "h.0.attn.c_proj.weight" in str(e.value)
    assert "h.0.mlp.c_proj.weight" not in str(e.value)  # 32x8 with bias 8: evidence decides


def test_preset_converts_and_linear_model_gives_the_same_logits(gpt2_folder, tmp_path):
    model, folder = gpt2_folder
    report = convert.to_linear(folder, tmp_path / "out.safetensors", preset="gpt2")
    assert len(report.plan.transposed) == 4 * CONFIG["n_layer"]
    target = linear_gpt2()
    missing, unexpected = target.load_state_dict(load_file(tmp_path / "out.safetensors"),
                                                 strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # tied to wte, as in HF
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(target(ids).logits, model(ids).logits)


def test_reference_model_decides_square_c_proj(gpt2_folder, tmp_path):
    _, folder = gpt2_folder
    factory = tmp_path / "linear_gpt2.py"
    factory.write_text(textwrap.dedent(f"""
        from tests.test_gpt2 import linear_gpt2
        def build():
            return linear_gpt2()
        CONFIG = {CONFIG!r}
    """))
    report = convert.to_linear(folder, tmp_path / "o.safetensors", model=f"{factory}:build")
    reasons = {a.source: a.reason for a in report.plan.transposed}
    assert "nn.Linear" not in reasons  # sanity: keys, not classes
    assert "Linear" in reasons["transformer.h.0.attn.c_proj.weight"]
    assert len(reasons) == 4 * CONFIG["n_layer"]


def test_to_param_brings_gpt2_back_bit_exact(gpt2_folder, tmp_path):
    _, folder = gpt2_folder
    convert.to_linear(folder, tmp_path / "lin", preset="gpt2")
    convert.to_param(tmp_path / "lin", tmp_path / "back.safetensors")
    a = load_file(folder / "model.safetensors")
    b = load_file(tmp_path / "back.safetensors")
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "lin" / "config.json").exists()


def test_sharded_output_loads_with_from_pretrained(gpt2_folder, tmp_path):
    """Hugging Face's own loader reads our index and shards (config.json copied beside them)."""
    model, folder = gpt2_folder
    convert.to_linear(folder, tmp_path / "lin", preset="gpt2")
    convert.to_param(tmp_path / "lin", tmp_path / "param", max_shard_size="2KB")
    shards = sorted((tmp_path / "param").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "param").eval()
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 5))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
