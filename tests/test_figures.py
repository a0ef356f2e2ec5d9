"""Whole-model figures (cosine, top-1, KL), the gates on them, and `--reference float64`: each
gate fails on a planted fault, names the output and the figure, and exits 1."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import convert
from convert.verify.figures import cosine_similarity, kl_divergence, top1_agreement
from tests.conftest import FIXTURES

MODELS = FIXTURES / "models.py"

LM = textwrap.dedent(f"""
    import sys
    import torch
    sys.path.insert(0, {str(FIXTURES)!r})
    from models import LinearMLP, ParamMLP

    class ParamLM(ParamMLP):
        def forward(self, x):
            return {{"hidden": torch.relu(self.fc1(x)), "logits": super().forward(x)}}

    class LinearLM(LinearMLP):
        def forward(self, x):
            return {{"hidden": torch.relu(self.fc1(x)), "logits": super().forward(x)}}

    def param_lm():
        return ParamLM()

    def linear_lm():
        return LinearLM()

    def param_bf16():
        return ParamMLP().to(torch.bfloat16)

    def linear_bf16():
        return LinearMLP().to(torch.bfloat16)
""")


@pytest.fixture
def lm(fixture_dir):
    """SRC (param layout), a DST in the linear layout with no provenance (so only the outputs
    are judged), and the factories of a model that returns {'hidden', 'logits'}."""
    factory = fixture_dir / "lm.py"
    factory.write_text(LM)
    src = fixture_dir / "mlp_param.safetensors"
    dst = fixture_dir / "twin.safetensors"
    save_file({k: (v.t().contiguous() if k.endswith("weight") else v)
               for k, v in load_file(src).items()}, str(dst))
    return src, dst, factory


def _whole(src, dst, factory, *extra, source="param_lm", target="linear_lm"):
    return ["verify", src, dst, "--source-model", f"{factory}:{source}",
            "--target-model", f"{factory}:{target}", "--input-shape", "64,4", *extra]


def _nudge(path, key, change):
    t = load_file(path)
    change(t[key])
    save_file(t, str(path))


def test_the_figures_themselves():
    a = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    assert cosine_similarity(a, a) == pytest.approx(1.0)
    assert cosine_similarity(a, -a) == pytest.approx(-1.0)
    assert top1_agreement(a, a) == 1.0 and top1_agreement(a, a.flip(0)) == 0.0
    assert kl_divergence(a, a) == pytest.approx(0.0, abs=1e-15)
    p, q = torch.softmax(a.double(), -1), torch.softmax(a.flip(0).double(), -1)
    want = float((p * (p.log() - q.log())).sum(-1).mean())
    assert kl_divergence(a.flip(0), a) == pytest.approx(want)


def test_figures_in_text_and_json_for_an_output_named_logits(lm, runner, tmp_path):
    src, dst, factory = lm
    res = runner(*_whole(src, dst, factory, "--report", tmp_path / "r.json"))
    assert res.exit_code == 0, res.stdout + res.stderr
    assert "figures" in res.stdout and "logits" in res.stdout
    outputs = {r["name"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    assert set(outputs) == {"hidden", "logits"}
    fig = outputs["logits"]["figures"]
    assert fig["logits"] and fig["top1"] == 1.0 and fig["kl"] < 1e-10
    assert fig["cosine"] == pytest.approx(1.0)
    assert outputs["hidden"]["figures"]["top1"] is None  # not logits: cosine only
    assert outputs["hidden"]["figures"]["cosine"] == pytest.approx(1.0)


def test_min_cosine_fails_a_flipped_row_and_names_output_and_figure(lm, runner):
    src, dst, factory = lm
    assert runner(*_whole(src, dst, factory, "--min-cosine", "0.9999")).exit_code == 0
    _nudge(dst, "fc2.weight", lambda w: w[0].neg_())
    res = runner(*_whole(src, dst, factory, "--min-cosine", "0.9999"))
    assert res.exit_code == 1
    assert "'logits'" in res.stderr and "'hidden'" not in res.stderr
    assert "misses --min-cosine 0.9999" in res.stdout


def test_a_gate_judges_instead_of_the_tolerance(lm, runner):
    """A tiny nudge fails the element-wise tolerance but passes a cosine gate."""
    src, dst, factory = lm
    _nudge(dst, "fc2.bias", lambda b: b.add_(1e-3))
    assert runner(*_whole(src, dst, factory)).exit_code == 1
    res = runner(*_whole(src, dst, factory, "--min-cosine", "0.999"))
    assert res.exit_code == 0, res.stdout + res.stderr
    assert "passes --min-cosine" in res.stdout and "gates: --min-cosine 0.999" in res.stdout


def test_max_kl_and_min_top1_fail_shifted_logits(lm, runner):
    src, dst, factory = lm
    for gate in (["--max-kl", "1e-6"], ["--min-top1", "0.99"]):
        assert runner(*_whole(src, dst, factory, *gate)).exit_code == 0
    _nudge(dst, "fc2.bias", lambda b: b.__setitem__(0, b[0] + 5))
    res = runner(*_whole(src, dst, factory, "--max-kl", "1e-6"))
    assert res.exit_code == 1 and "'logits'" in res.stderr
    assert "KL" in res.stdout and "misses --max-kl 1e-06" in res.stdout
    res = runner(*_whole(src, dst, factory, "--min-top1", "0.99"))
    assert res.exit_code == 1 and "'logits'" in res.stderr
    assert "misses --min-top1 0.99" in res.stdout


def test_logits_by_position_for_a_bare_tensor(lm, runner, tmp_path):
    src, dst, _ = lm
    args = ["verify", src, dst, "--source-model", f"{MODELS}:build_param_mlp",
            "--target-model", f"{MODELS}:build_linear_mlp", "--input-shape", "16,4"]
    res = runner(*args, "--min-top1", "1")
    assert res.exit_code == 2 and "--logits" in res.stderr  # no output is named logits
    res = runner(*args, "--logits", "0", "--min-top1", "1", "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.stdout + res.stderr
    fig = json.loads((tmp_path / "r.json").read_text())["results"][0]["figures"]
    assert fig["top1"] == 1.0 and fig["gated"] == ["min_top1"]
    res = runner(*args, "--logits", "nope")
    assert res.exit_code == 2 and "'output[0]'" in res.stderr


def test_gates_need_whole_model_mode(lm, runner):
    src, dst, _ = lm
    res = runner("verify", src, dst, "--min-cosine", "0.9")
    assert res.exit_code == 2 and "--source-model" in res.stderr
    res = runner(*_whole(src, dst, lm[2], "--min-cosine", "2"))
    assert res.exit_code == 2 and "out of range" in res.stderr


def test_reference_float64_separates_format_error_from_conversion_error(fixture_dir, lm):
    """A bfloat16 port: both sides are far from float64 by about as much, and close to each
    other (the conversion added no error the format did not)."""
    _, _, factory = lm
    src = fixture_dir / "mlp_bf16.safetensors"
    save_file({k: v.bfloat16() for k, v in load_file(fixture_dir / "mlp_param.safetensors")
               .items()}, str(src))
    dst = fixture_dir / "mlp_bf16.linear.safetensors"
    convert.to_linear(src, dst)
    report = convert.verify(src, dst, source_model=f"{factory}:param_bf16",
                            target_model=f"{factory}:linear_bf16", input_shape=[(256, 4)],
                            input_dtype="bfloat16", reference="float64")
    out = report.results[0]
    assert out.kind == "output" and out.dtype == "BF16" and report.reference == "float64"
    src_err = out.figures.source_vs_reference.max_abs_err
    dst_err = out.figures.target_vs_reference.max_abs_err
    assert src_err > 1e-3 and dst_err > 1e-3  # bfloat16's own rounding
    assert 0.5 < dst_err / src_err < 2
    # the two sides' bfloat16 kernels round differently (x @ W and F.linear), by about an ulp
    # of the output: the element-wise tolerance fails, the figures say it is the format's
    assert not out.passed and out.max_abs_err <= 2 * src_err
    assert out.figures.cosine > 0.99999
    gated = convert.verify(src, dst, source_model=f"{factory}:param_bf16",
                           target_model=f"{factory}:linear_bf16", input_shape=[(256, 4)],
                           input_dtype="bfloat16", min_cosine=0.9999)
    assert gated.equivalent
    layers = [r for r in report.results if r.kind == "layer"]
    assert layers and all(r.figures.reference == "float64" for r in layers)
    assert all(r.figures.source_vs_reference.max_abs_err < 1e-5 for r in layers)  # float32 math
    text = convert.report.render_verify(report)
    assert "src-vs-float64 max_abs" in text and "dst-vs-float64 max_abs" in text
