"""`convert.swap_modules`: live models' param-layout layers become nn.Linear (and back)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import convert
from convert import ParamLinear
from tests.conftest import IN, OUT, SQ, models

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"
GPT2 = {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 100, "n_positions": 32,
        "bos_token_id": 0, "eos_token_id": 0}
QUANTIZE = pytest.mark.filterwarnings("ignore::DeprecationWarning",
                                      "ignore:.*quantize_per_tensor.*:UserWarning")


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)).eval()


def param_mlp() -> nn.Sequential:
    """Non-square layers with biases and a square one without."""
    torch.manual_seed(0)
    return nn.Sequential(ParamLinear(IN, OUT), nn.ReLU(), ParamLinear(OUT, SQ),
                         ParamLinear(SQ, SQ, bias=False))


def snapshot(model: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """Each state-dict entry's owner class and a copy of its tensor: what 'unchanged' means."""
    owners = {name: type(m).__name__ for name, m in model.named_modules()}
    return {k: (owners[k.rpartition(".")[0]], v.detach().clone())
            for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, tuple[str, torch.Tensor]]) -> None:
    after = snapshot(model)
    assert list(after) == list(before)
    for k, (owner, t) in before.items():
        assert after[k][0] == owner, k
        assert after[k][1].shape == t.shape and torch.equal(after[k][1], t), k


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(0, GPT2["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


# --- GPT-2 ----------------------------------------------------------------------------------

@QUANTIZE
def test_gpt2_swaps_to_linear_keeps_logits_and_ties_then_quantizes():
    model = gpt2()
    expected = logits(model)
    unswapped = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear},
                                                       dtype=torch.qint8)
    assert isinstance(unswapped.transformer.h[0].attn.c_attn, Conv1D)  # what the swap is for
    report = convert.swap_modules(model, "linear")
    assert report.applied and report.verified and report.equivalent
    assert len(report.modules) == 4 * GPT2["n_layer"]
    first = report.modules[0]
    assert (first.name, first.old_class, first.new_class) == (
        "transformer.h.0.attn.c_attn", "transformers.pytorch_utils.Conv1D", "nn.Linear")
    assert (first.old_shape, first.new_shape) == ((32, 96), (96, 32))
    assert all(m.check.bit_exact and m.check.max_abs_err is not None
               for m in report.modules)
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    assert model.lm_head.weight is model.transformer.wte.weight
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)
    json.dumps(report.to_dict())

    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    for block in quantized.transformer.h:
        for layer in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
            assert isinstance(layer, dynamic)
    torch.testing.assert_close(logits(quantized), expected, rtol=0.1, atol=0.1)


def test_gpt2_state_dict_is_what_to_linear_writes(tmp_path):
    model = gpt2()
    torch.save(model.state_dict(), tmp_path / "gpt2.pt")
    convert.swap_modules(model, "linear")
    convert.to_linear(tmp_path / "gpt2.pt", tmp_path / "gpt2.linear.safetensors", preset="gpt2")
    written = load_file(tmp_path / "gpt2.linear.safetensors")
    live = model.state_dict()
    assert list(live) == list(written)
    for k, t in live.items():
        assert t.dtype == written[k].dtype and t.shape == written[k].shape, k
        assert torch.equal(t.contiguous().view(torch.uint8), written[k].view(torch.uint8)), k


def test_gpt2_to_param_refuses_the_tied_lm_head_until_excluded():
    model = gpt2()
    expected = logits(model)
    convert.swap_modules(model, "linear")
    before = snapshot(model)
    with pytest.raises(convert.UsageError, match=r"'lm_head.weight' is tied to "
                                                 r"'transformer.wte.weight'.*exclude=\['lm_head'\]"):
        convert.swap_modules(model, "param")
    assert_unchanged(model, before)
    report = convert.swap_modules(model, "param", exclude=["lm_head"])
    assert len(report.modules) == 4 * GPT2["n_layer"]
    assert type(model.lm_head) is nn.Linear
    assert isinstance(model.transformer.h[1].mlp.c_fc, ParamLinear)
    torch.testing.assert_close(logits(model), expected, rtol=0, atol=0)


# --- ParamLinear and the user's classes -----------------------------------------------------

def test_param_mlp_swaps_to_linear_and_back_bit_exact():
    model = param_mlp()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    biases = [model[0].bias, model[2].bias]
    x = torch.randn(6, IN)
    with torch.no_grad():
        expected = model(x)
    convert.swap_modules(model, "linear")
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear, nn.Linear]
    assert model[0].bias is biases[0] and model[2].bias is biases[1]  # the same Parameters
    assert model[3].bias is None
    for k, t in model.state_dict().items():
        assert torch.equal(t, original[k].t() if t.ndim == 2 else original[k]), k
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    report = convert.swap_modules(model, "param")
    assert [m.new_class for m in report.modules] == ["ParamLinear"] * 3
    back = model.state_dict()
    assert list(back) == list(original)
    for k, t in original.items():
        assert t.shape == back[k].shape and t.is_contiguous() and back[k].is_contiguous()
        assert torch.equal(back[k].view(torch.uint8), t.view(torch.uint8)), k


def test_requires_grad_training_mode_and_grads_are_kept():
    model = param_mlp().train()
    model[0].weight.requires_grad_(False)
    model[2](torch.randn(2, OUT)).sum().backward()
    grad = model[2].weight.grad.clone()
    model[3].eval()
    convert.swap_modules(model, "linear")
    assert not model[0].weight.requires_grad and model[0].bias.requires_grad
    assert model[2].weight.requires_grad and torch.equal(model[2].weight.grad, grad.t())
    assert model[0].training and not model[3].training


def test_weights_tied_among_swapped_modules_stay_one_parameter():
    model = nn.Sequential(ParamLinear(SQ, SQ), ParamLinear(SQ, SQ))
    model[1].weight = model[0].weight
    report = convert.swap_modules(model, "linear")
    assert len(report.modules) == 2
    assert model[0].weight is model[1].weight and isinstance(model[0], nn.Linear)


def test_a_module_registered_twice_is_one_new_module():
    shared = ParamLinear(IN, OUT)
    model = nn.Sequential(shared, nn.Tanh(), nn.Linear(OUT, IN), shared)  # 3 -> 5 -> 3 -> 5
    report = convert.swap_modules(model, "linear")
    assert [(m.name, m.also_named) for m in report.modules] == [("0", ("3",))]
    assert model[0] is model[3] and isinstance(model[0], nn.Linear)
    with pytest.raises(convert.UsageError, match="'0' is also registered as '3'"):
        convert.swap_modules(model, "param", exclude=["3"])


def test_a_user_class_given_in_modules_swaps():
    model = models.ParamMLP()
    x = torch.randn(4, models.IN)
    with torch.no_grad():
        expected = model(x)
    with pytest.raises(convert.UsageError, match="nothing to swap to 'linear' in ParamMLP"):
        convert.swap_modules(model, "linear")  # CustomLinear is only known when named
    report = convert.swap_modules(model, "linear", modules=[models.CustomLinear])
    assert [m.old_class for m in report.modules] == ["models.CustomLinear"] * 2
    assert isinstance(model.fc1, nn.Linear) and isinstance(model.fc2, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_one_class_or_one_pattern_is_a_list_of_one():
    model = nn.Sequential(models.CustomLinear(IN, OUT), ParamLinear(OUT, SQ))
    report = convert.swap_modules(model, "linear", modules=models.CustomLinear, include="0")
    assert [m.name for m in report.modules] == ["0"] and isinstance(model[1], ParamLinear)


def test_include_and_exclude_select_by_qualified_name():
    model = gpt2()
    report = convert.swap_modules(model, "linear", include=["*.attn.*"],
                                  exclude=["transformer.h.1.*"])
    assert [m.name for m in report.modules] == ["transformer.h.0.attn.c_attn",
                                                "transformer.h.0.attn.c_proj"]
    assert isinstance(model.transformer.h[1].attn.c_attn, Conv1D)
    assert isinstance(model.transformer.h[0].mlp.c_fc, Conv1D)
    with pytest.raises(convert.UsageError, match="exclude '\\*.wte' matches no ParamLinear"):
        convert.swap_modules(model, "linear", exclude=["*.wte"])
    with pytest.raises(convert.UsageError, match="nothing to swap.*all excluded"):
        convert.swap_modules(model, "linear", exclude=["transformer.h.*"])


def test_to_param_swaps_only_plain_nn_linear():
    attn = nn.MultiheadAttention(SQ, 2)  # its out_proj is a subclass of nn.Linear
    model = nn.ModuleDict({"attn": attn, "head": nn.Linear(SQ, OUT)})
    report = convert.swap_modules(model, "param")
    assert [m.name for m in report.modules] == ["head"]
    assert isinstance(model["head"], ParamLinear) and type(attn.out_proj) is not ParamLinear


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_weights_keep_their_dtype(dtype):
    model = param_mlp().to(dtype)
    report = convert.swap_modules(model, "linear")
    assert report.equivalent and all(m.weight.dtype is dtype for m in model if m._parameters)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_swaps_on_cuda_on_its_own_device():
    model = param_mlp().cuda()
    report = convert.swap_modules(model, "linear")
    assert report.equivalent and model[0].weight.device.type == "cuda"
    assert report.modules[0].device.startswith("cuda")


def test_without_verification_nothing_is_run():
    model = param_mlp().to("meta")
    report = convert.swap_modules(model, "linear", verify=False)
    assert not report.verified and report.modules[0].check is None
    assert model[0].weight.shape == (OUT, IN) and model[0].weight.is_meta
    with pytest.raises(convert.UsageError, match="meta device.*verify=False"):
        convert.swap_modules(model, "param")


# --- faults: verification fails, the model is unchanged --------------------------------------

def test_a_wrong_transpose_fails_verification_naming_the_module(monkeypatch):
    import convert.swap as swap

    real = swap._transposed

    def nudged(weight):
        new = real(weight)
        if new.shape == (SQ, SQ):  # only the square layer's weight, where shapes cannot tell
            with torch.no_grad():
                new[0, 1] += 1
        return new

    monkeypatch.setattr(swap, "_transposed", nudged)
    model = param_mlp()
    before = snapshot(model)
    with pytest.raises(convert.NotEquivalentError, match=r"'3' \(weight is not the bit-exact "
                                                         r"transpose") as e:
        convert.swap_modules(model, "linear")
    report = e.value.report
    assert not report.applied and [m.name for m in report.failures] == ["3"]
    assert report.failures[0].check.max_abs_err > 0
    assert e.value.exit_code == 1
    assert_unchanged(model, before)


class Doubled(nn.Module):
    """Looks like a param-layout layer but computes `2 (x @ W) + b`."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n))
        self.bias = nn.Parameter(torch.randn(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * (x @ self.weight) + self.bias


class LinearInDisguise(Doubled):
    """Stores `out x in` and computes `x @ W.T`: nn.Linear's layout, not the param layout."""

    def __init__(self) -> None:
        super().__init__(SQ)
        self.weight = nn.Parameter(torch.randn(OUT, SQ))
        self.bias = nn.Parameter(torch.randn(OUT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


def test_a_user_class_that_is_not_x_at_w_plus_b_fails_verification():
    torch.manual_seed(0)
    model = nn.Sequential(ParamLinear(SQ, SQ), Doubled(SQ))
    before = snapshot(model)
    with pytest.raises(convert.NotEquivalentError, match=r"'1' \(max abs error") as e:
        convert.swap_modules(model, "linear", modules=[Doubled])
    assert [m.name for m in e.value.report.failures] == ["1"]
    assert e.value.report.modules[0].passed  # the ParamLinear alone was fine
    assert_unchanged(model, before)

    model = nn.Sequential(LinearInDisguise())
    before = snapshot(model)
    with pytest.raises(convert.UsageError, match="bias of shape \\(5,\\).*needs \\[4\\]"):
        convert.swap_modules(model, "linear", modules=[LinearInDisguise])
    assert_unchanged(model, before)


def test_a_forward_that_raises_fails_verification():
    class Rows(Doubled):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.weight @ x  # [n, n] @ [batch, n]: not an [N, in] layer

    model = nn.Sequential(Rows(SQ))
    with pytest.raises(convert.NotEquivalentError, match="its forward on a 8x4 batch raised"):
        convert.swap_modules(model, "linear", modules=[Rows])
    assert isinstance(model[0], Rows)


# --- bad input: one sentence, the model unchanged --------------------------------------------

@pytest.mark.parametrize(("call", "message"), [
    (lambda m: convert.swap_modules(m, "Linear"), "to='Linear' is not a layout"),
    (lambda m: convert.swap_modules(m, "param", modules=[Doubled]), "needs to='linear'"),
    (lambda m: convert.swap_modules(m, "linear", modules=["ParamLinear"]), "not one"),
    (lambda m: convert.swap_modules(m, "linear", include=["fc*"]),
     "include 'fc\\*' matches no ParamLinear, Conv1D module"),
    (lambda m: convert.swap_modules(m, "param"), "nothing to swap to 'param' in Sequential"),
    (lambda m: convert.swap_modules(m[0], "linear"), "the model itself is a ParamLinear"),
    (lambda m: convert.swap_modules(m.state_dict(), "linear"), "an nn.Module, not OrderedDict"),
    (lambda m: convert.swap_modules(m, "linear", batch_size=0), "batch_size=0 runs nothing"),
])
def test_bad_calls_are_usage_errors(call, message):
    model = param_mlp()
    before = snapshot(model)
    with pytest.raises(convert.UsageError, match=message) as e:
        call(model)
    assert e.value.exit_code == 2 and str(e.value).count(". ") == 0
    assert_unchanged(model, before)


def test_modules_it_cannot_convert_are_refused():
    model = param_mlp()
    model[0].register_buffer("mask", torch.ones(IN, OUT))
    with pytest.raises(convert.UsageError, match="'0' \\(ParamLinear\\) also holds 'mask'"):
        convert.swap_modules(model, "linear")
    model = param_mlp()
    model[2].register_forward_hook(lambda *_: None)
    with pytest.raises(convert.UsageError, match="'2' \\(ParamLinear\\) has hooks"):
        convert.swap_modules(model, "linear")
    model = param_mlp()
    torch.nn.utils.parametrizations.weight_norm(model[0])
    before = snapshot(model)
    with pytest.raises(convert.UsageError, match="'0' .* no 2-D float Parameter 'weight'"):
        convert.swap_modules(model, "linear")
    assert_unchanged(model, before)


# --- the README ----------------------------------------------------------------------------

@QUANTIZE
def test_the_readme_snippet_runs():
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^### Live models: swap_modules\n(.*?)(?=^#{2,3} )", text, re.M | re.S)
    assert section, "README.md has no '### Live models: swap_modules' section"
    snippet = re.search(r"```python\n(.*?)```", section.group(1), re.S)
    assert snippet, "the README's swap_modules section has no python example"
    exec(compile(snippet.group(1), "README.md (swap_modules)", "exec"), {})
