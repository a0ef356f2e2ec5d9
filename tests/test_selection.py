"""Tests of convert/selection.py: patterns, rules files, presets, evidence, reference models."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from convert.errors import UsageError
from convert.layout import Layout
from convert.selection import (
    Pattern,
    Rename,
    Selection,
    bias_evidence,
    build_reference,
    list_presets,
    load_preset,
    load_rules,
    make_selection,
    rules_from_toml,
)
from tests.conftest import FIXTURES, IN, OUT, SQ

MODELS = str(FIXTURES / "models.py")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


RULES = """\
    description = "my rules"
    layers  = ["*.c_attn.weight", "re:h\\\\.\\\\d+\\\\.mlp\\\\..*"]
    exclude = ["*.wpe.weight"]
    drop    = "*.attn.masked_bias"
    [[rename]]
    from = '^transformer\\.'
    to   = ''
    [[rename]]
    from = '^h\\.'
    to   = 'layers.'
"""


# --- patterns and renames --------------------------------------------------------------------


def test_glob_pattern_is_case_sensitive_fnmatch():
    p = Pattern("*.c_attn.weight")
    assert p.matches("transformer.h.0.c_attn.weight")
    assert not p.matches("transformer.h.0.C_ATTN.weight")
    assert not p.matches("transformer.h.0.c_attn.weight.x")
    assert Pattern("h.[0-2].w").matches("h.1.w") and not Pattern("h.[0-2].w").matches("h.3.w")


def test_regex_pattern_is_a_full_match():
    p = Pattern(r"re:h\.\d+\.w")
    assert p.matches("h.12.w")
    assert not p.matches("x.h.12.w") and not p.matches("h.12.w.bias")
    assert str(p) == r"--layers 're:h\.\d+\.w'"


def test_invalid_regex_pattern_is_usage_error():
    with pytest.raises(UsageError, match="--exclude 're:\\(' is not a valid regular expr") as e:
        Pattern("re:(", "--exclude").matches("x")
    assert e.value.exit_code == 2


def test_rename_reports_whether_it_hit():
    r = Rename(r"^transformer\.", "")
    assert r.apply("transformer.h.0.w") == ("h.0.w", True)
    assert r.apply("lm_head.weight") == ("lm_head.weight", False)
    assert Rename(r"^h\.(\d+)", r"layers.\1").apply("h.3.w") == ("layers.3.w", True)


def test_selection_target_key_applies_renames_in_order():
    s = Selection(renames=(Rename("^a", "b"), Rename("^b", "c")))
    assert s.target_key("a.x") == "c.x"
    s = Selection(renames=(Rename("^b", "c"), Rename("^a", "b")))
    assert s.target_key("a.x") == "b.x"


def test_chooses_layers():
    assert not Selection().chooses_layers
    assert not make_selection(drop=["x"], rename=[("a", "b")]).chooses_layers
    assert make_selection(layers=["x"]).chooses_layers
    assert make_selection(exclude=["x"]).chooses_layers
    assert make_selection(model="m:f").chooses_layers


# --- make_selection --------------------------------------------------------------------------


def test_make_selection_from_options():
    s = make_selection(layers=["a", "re:b.*"], exclude=["c"], drop=["d"],
                       rename=[("^e", "f")], model="m.py:build")
    assert [p.text for p in s.layers] == ["a", "re:b.*"]
    assert all(p.origin == "--layers" and not p.shipped for p in s.layers)
    assert [(p.text, p.origin) for p in s.exclude] == [("c", "--exclude")]
    assert [(p.text, p.origin) for p in s.drop] == [("d", "--drop")]
    assert [(r.pattern, r.replacement) for r in s.renames] == [("^e", "f")]
    assert s.model == "m.py:build"
    assert s.to_dict() == {"layers": ["a", "re:b.*"], "exclude": ["c"], "drop": ["d"],
                           "rename": [["^e", "f"]], "model": "m.py:build"}


def test_make_selection_merges_preset_then_rules_then_options(tmp_path):
    rules = write(tmp_path, "rules.toml", RULES)
    s = make_selection(preset="gpt2", rules=rules, layers=["opt.weight"], exclude=["x"],
                       rename=[("^layers", "blocks")])
    assert [p.text for p in s.layers] == [
        "*.c_attn.weight", "*.c_proj.weight", "*.c_fc.weight",  # preset
        "*.c_attn.weight", r"re:h\.\d+\.mlp\..*",  # rules file
        "opt.weight",  # option
    ]
    assert [p.shipped for p in s.layers] == [True] * 3 + [False] * 3
    assert s.layers[0].origin.startswith("preset 'gpt2'")
    assert "rules file" in s.layers[3].origin and str(rules) in s.layers[3].origin
    assert [p.text for p in s.exclude] == ["*wte.weight", "*wpe.weight", "*.wpe.weight", "x"]
    assert [p.text for p in s.drop] == ["*.attn.masked_bias"]
    assert [(r.pattern, r.replacement) for r in s.renames] == [
        (r"^transformer\.", ""), (r"^h\.", "layers."), ("^layers", "blocks")]
    assert s.target_key("transformer.h.0.attn.c_attn.weight") == "blocks.0.attn.c_attn.weight"


def test_make_selection_rejects_a_bad_regex_option_up_front():
    with pytest.raises(UsageError, match="--layers 're:\\[' is not a valid regular") as e:
        make_selection(layers=["re:["])
    assert e.value.exit_code == 2
    with pytest.raises(UsageError, match="--rename '\\(' is not a valid regular"):
        make_selection(rename=[("(", "x")])
    with pytest.raises(UsageError, match="bad replacement"):
        make_selection(rename=[("a", r"\9")])


def test_make_selection_unknown_preset():
    with pytest.raises(UsageError, match="no preset named 'nope'"):
        make_selection(preset="nope")


def test_merging_two_different_models_is_an_error():
    a, b = Selection(model="a:f"), Selection(model="b:f")
    with pytest.raises(UsageError, match="two reference models") as e:
        a.merged(b)
    assert e.value.exit_code == 2
    assert a.merged(Selection(model="a:f")).model == "a:f"
    assert Selection().merged(b).model == "b:f"


def test_options_hash_depends_on_direction_and_options():
    s = make_selection(layers=["a"])
    assert s.options_hash(Layout.LINEAR) == make_selection(layers=["a"]).options_hash(
        Layout.LINEAR)
    assert s.options_hash(Layout.LINEAR) != s.options_hash(Layout.PARAM)
    assert s.options_hash(Layout.LINEAR) != make_selection(layers=["b"]).options_hash(
        Layout.LINEAR)
    assert s.options_hash(Layout.LINEAR) != make_selection(layers=["a"], model="m:f") \
        .options_hash(Layout.LINEAR)


# --- rules files -----------------------------------------------------------------------------


def test_load_rules(tmp_path):
    s = load_rules(write(tmp_path, "r.toml", RULES))
    assert [p.text for p in s.layers] == ["*.c_attn.weight", r"re:h\.\d+\.mlp\..*"]
    assert s.layers[1].matches("h.11.mlp.c_fc.weight")
    assert [p.text for p in s.exclude] == ["*.wpe.weight"]
    assert [p.text for p in s.drop] == ["*.attn.masked_bias"]  # a string is a one-item list
    assert [(r.pattern, r.replacement) for r in s.renames] == [
        (r"^transformer\.", ""), (r"^h\.", "layers.")]
    assert not any(p.shipped for p in (*s.layers, *s.exclude, *s.drop))
    assert s.model is None


def test_load_rules_empty_file_is_an_empty_selection(tmp_path):
    assert load_rules(write(tmp_path, "r.toml", "")) == Selection()


@pytest.mark.parametrize(("text", "match"), [
    ('layer = ["x"]\n', "unknown key\\(s\\) layer;.*layers"),
    ('layers = ["x"]\nmodel = "m:f"\n', "unknown key\\(s\\) model"),
    ("layers = [1, 2]\n", "'layers' must be a list of strings"),
    ("exclude = 3\n", "'exclude' must be a list of strings"),
    ("drop = [[\"a\"]]\n", "'drop' must be a list of strings"),
    ("[[rename]]\nfrom = 'a'\n", "\\[\\[rename\\]\\] entry 1 must have string keys"),
    ("[[rename]]\nfrom = 'a'\nto = 'b'\n[[rename]]\nfrom = 'a'\nto = 2\n", "entry 2"),
    ("[[rename]]\nfrom = 'a'\nto = 'b'\nflags = 'i'\n", "entry 1"),
    ('rename = ["a", "b"]\n', "entry 1"),
])
def test_load_rules_errors(tmp_path, text, match):
    path = write(tmp_path, "r.toml", text)
    with pytest.raises(UsageError, match=match) as e:
        load_rules(path)
    assert e.value.exit_code == 2
    assert str(path) in str(e.value)


def test_load_rules_invalid_toml(tmp_path):
    path = write(tmp_path, "r.toml", "layers = [\"a\"\n")
    with pytest.raises(UsageError, match="is not valid TOML") as e:
        load_rules(path)
    assert e.value.exit_code == 2


def test_load_rules_not_utf8(tmp_path):
    path = tmp_path / "r.toml"
    path.write_bytes(b'layers = ["\xff"]\n')
    with pytest.raises(UsageError, match="not valid TOML"):
        load_rules(path)


def test_load_rules_missing_file(tmp_path):
    with pytest.raises(UsageError, match="cannot read rules file") as e:
        load_rules(tmp_path / "absent.toml")
    assert e.value.exit_code == 2


@pytest.mark.parametrize("text", ['layers = ["re:(a"]\n', "[[rename]]\nfrom = '('\nto = ''\n"],
                         ids=["layers", "rename"])
def test_rules_file_invalid_regex_is_rejected_when_loaded(tmp_path, text):
    path = write(tmp_path, "r.toml", text)
    with pytest.raises(UsageError, match="not a valid regular expression"):
        make_selection(rules=path)


@pytest.mark.parametrize("text", ["rename = 5\n", "rename = true\n"], ids=["int", "bool"])
def test_load_rules_scalar_rename_is_a_usage_error(tmp_path, text):
    with pytest.raises(UsageError, match="rename"):
        load_rules(write(tmp_path, "r.toml", text))


# --- presets ---------------------------------------------------------------------------------


def test_list_presets_has_gpt2():
    presets = list_presets()
    assert "gpt2" in presets
    assert "Conv1D" in presets["gpt2"]


def test_load_preset_gpt2_is_shipped():
    s = load_preset("gpt2")
    assert [p.text for p in s.layers] == ["*.c_attn.weight", "*.c_proj.weight", "*.c_fc.weight"]
    assert all(p.shipped for p in s.layers)
    assert s.layers[0].matches("transformer.h.0.attn.c_attn.weight")


@pytest.mark.parametrize("name", ["nope", "../gpt2", "gpt2.toml", ""])
def test_load_unknown_preset(name):
    with pytest.raises(UsageError, match="no preset named") as e:
        load_preset(name)
    assert e.value.exit_code == 2
    assert "gpt2" in str(e.value)  # lists what exists


def test_rules_from_toml_shipped_flag_reaches_renames():
    s = rules_from_toml({"rename": [{"from": "a", "to": "b"}]}, "preset 'p'", shipped=True)
    assert s.renames[0].shipped and s.renames[0].origin == "preset 'p' rename"


# --- bias evidence ---------------------------------------------------------------------------


def test_bias_evidence_param_and_linear():
    shapes = {"fc.weight": (IN, OUT), "fc.bias": (OUT,), "g.weight": (OUT, IN), "g.bias": (OUT,)}
    layout, why = bias_evidence("fc.weight", (IN, OUT), shapes)
    assert layout is Layout.PARAM and "'fc.bias'" in why and "in x out" in why
    layout, why = bias_evidence("g.weight", (OUT, IN), shapes)
    assert layout is Layout.LINEAR and "'g.bias'" in why and "out x in" in why


@pytest.mark.parametrize(("w", "b"), [("weight", "bias"), ("W", "b"), ("kernel", "bias")])
def test_bias_evidence_names(w, b):
    shapes = {f"m.{w}": (IN, OUT), f"m.{b}": (OUT,)}
    assert bias_evidence(f"m.{w}", (IN, OUT), shapes)[0] is Layout.PARAM
    shapes = {w: (OUT, IN), b: (OUT,)}
    assert bias_evidence(w, (OUT, IN), shapes)[0] is Layout.LINEAR


@pytest.mark.parametrize(("key", "shape", "shapes"), [
    ("fc.weight", (SQ, SQ), {"fc.bias": (SQ,)}),  # square: proves nothing
    ("fc.weight", (IN, OUT), {}),  # no sibling
    ("fc.weight", (IN, OUT), {"fc.bias": (7,)}),  # fits neither side
    ("fc.weight", (IN, OUT), {"fc.bias": (1, OUT)}),  # not 1-D
    ("fc.weight", (IN, OUT), {"fc.b": (OUT,)}),  # weight goes with bias
    ("fc.kernel", (IN, OUT), {"fc.b": (OUT,)}),  # kernel goes with bias
    ("fc.W", (IN, OUT), {"fc.bias": (OUT,)}),  # W goes with b
    ("fc.w", (IN, OUT), {"fc.bias": (OUT,)}),  # unknown leaf
    ("fc.weight", (IN, OUT), {"other.bias": (OUT,)}),  # another layer's bias
])
def test_bias_evidence_none(key, shape, shapes):
    assert bias_evidence(key, shape, {key: shape, **shapes}) is None


# --- reference models ------------------------------------------------------------------------


def test_build_reference_linear_mlp():
    ref = build_reference(MODELS + ":build_linear_mlp")
    assert ref.spec.endswith(":build_linear_mlp")
    assert list(ref.entries) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    w = ref.entries["fc1.weight"]
    assert w.shape == (6, 4) and w.owner == "Linear" and w.layout is Layout.LINEAR
    assert ref.entries["fc2.weight"].shape == (3, 6)
    b = ref.entries["fc1.bias"]
    assert b.shape == (6,) and b.owner == "Linear" and b.layout is None
    assert ref.ties == {}


def test_build_reference_square_linear():
    ref = build_reference(MODELS + ":build_square_linear")
    assert list(ref.entries) == ["proj.weight", "out.weight"]  # bias=False: no bias keys
    for e in ref.entries.values():
        assert e.shape == (4, 4) and e.owner == "Linear" and e.layout is Layout.LINEAR


def test_build_reference_square_param():
    ref = build_reference(MODELS + ":build_square_param")
    assert list(ref.entries) == ["proj.weight", "out.weight"]
    for e in ref.entries.values():
        assert e.shape == (4, 4) and e.owner == "ParamLinear" and e.layout is Layout.PARAM


def test_build_reference_hand_written_param_layer_is_unknown():
    """Seed 003's CustomLinear is not ParamLinear: its layout cannot be told."""
    ref = build_reference(MODELS + ":build_param_mlp")
    w = ref.entries["fc1.weight"]
    assert w.shape == (4, 6) and w.owner == "CustomLinear" and w.layout is None


TIED = """\
    import torch
    from torch import nn

    import convert

    DEVICES = []


    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.emb.weight
            self.shared = nn.Linear(2, 2)
            self.again = self.shared
            self.register_buffer("stats", torch.zeros(3))
            self.register_buffer("scratch", torch.zeros(3), persistent=False)


    class Wrapped(convert.ParamLinear):
        pass


    def build():
        DEVICES.append(torch.empty(1).device.type)
        return Tied()


    def build_sub():
        return nn.Sequential(Wrapped(3, 3), nn.Linear(3, 3))


    def build_int():
        return 3
"""


@pytest.fixture
def tied_module(tmp_path) -> str:
    return str(write(tmp_path, "tiedmodels.py", TIED))


def test_build_reference_records_ties_and_buffers(tied_module):
    ref = build_reference(tied_module + ":build")
    assert ref.ties["emb.weight"] == ("head.weight",)
    assert ref.ties["head.weight"] == ("emb.weight",)
    assert ref.ties["shared.weight"] == ("again.weight",)
    assert ref.ties["again.bias"] == ("shared.bias",)
    assert "stats" not in ref.ties
    assert ref.entries["emb.weight"].owner == "Embedding"
    assert ref.entries["emb.weight"].layout is None
    assert ref.entries["head.weight"].layout is Layout.LINEAR
    assert ref.entries["head.weight"].shape == (5, 3)
    assert ref.entries["stats"].shape == (3,)
    assert "scratch" not in ref.entries  # non-persistent buffers are not in a state dict
    assert set(ref.entries) == {"emb.weight", "head.weight", "shared.weight", "shared.bias",
                                "again.weight", "again.bias", "stats"}


def test_build_reference_builds_on_the_meta_device(tied_module):
    import sys

    build_reference(tied_module + ":build")
    mod = next(m for m in list(sys.modules.values())
               if getattr(m, "__file__", None) == tied_module)
    assert mod.DEVICES[-1] == "meta"


def test_build_reference_subclasses_keep_their_layout(tied_module):
    ref = build_reference(tied_module + ":build_sub")
    assert ref.entries["0.weight"].owner == "Wrapped"
    assert ref.entries["0.weight"].layout is Layout.PARAM
    assert ref.entries["1.weight"].layout is Layout.LINEAR


@pytest.mark.parametrize(("spec", "match"), [
    ("nocolon", "must be written MODULE:FACTORY"),
    (":build", "must be written MODULE:FACTORY"),
    ("models.py:", "must be written MODULE:FACTORY"),
    ("missing_module_for_linconvert_tests:f", "cannot import 'missing_module_for_linconvert"),
    ("no/such/file.py:f", "does not exist"),
])
def test_build_reference_bad_spec(spec, match):
    with pytest.raises(UsageError, match=match) as e:
        build_reference(spec)
    assert e.value.exit_code == 2
    assert "--model" in str(e.value)


def test_build_reference_factory_must_return_a_module(tied_module):
    with pytest.raises(UsageError, match="returned a int, not an nn.Module") as e:
        build_reference(tied_module + ":build_int")
    assert e.value.exit_code == 2
    with pytest.raises(UsageError, match="has no attribute 'nothing'"):
        build_reference(tied_module + ":nothing")
    with pytest.raises(UsageError, match="'DEVICES' is not callable"):
        build_reference(tied_module + ":DEVICES")


def test_reference_decides_square_fixture_weights():
    """End to end, headers only: the fixture models resolve square weights both ways."""
    from convert.plan import build_plan

    specs = {"proj.weight": ((SQ, SQ), "F32"), "out.weight": ((SQ, SQ), "F32")}
    to_linear = build_plan(specs, Layout.LINEAR,
                           reference=build_reference(MODELS + ":build_square_linear"))
    assert all(a.transpose for a in to_linear.actions)
    to_param = build_plan(specs, Layout.PARAM,
                          reference=build_reference(MODELS + ":build_square_param"))
    assert all(a.transpose for a in to_param.actions)
    with pytest.raises(UsageError, match="nothing to transpose"):
        build_plan(specs, Layout.LINEAR,
                   reference=build_reference(MODELS + ":build_square_param"))


def test_one_selection_value_is_what_the_keywords_build(tmp_path):
    """`selection=` and the keywords are the same Selection; both at once is a usage error."""
    import torch
    from safetensors.torch import save_file

    import convert
    from convert.errors import UsageError
    from convert.selection import make_selection

    save_file({"sq": torch.randn(4, 4), "b": torch.randn(4)}, str(tmp_path / "a.safetensors"))
    by_value = convert.to_linear(tmp_path / "a.safetensors", tmp_path / "o.safetensors",
                                 selection=make_selection(layers=["sq"]), dry_run=True)
    by_words = convert.to_linear(tmp_path / "a.safetensors", tmp_path / "o.safetensors",
                                 layers=["sq"], dry_run=True)
    assert by_value.plan == by_words.plan
    assert [e.key for e in by_value.plan.transposed] == ["sq"]
    with pytest.raises(UsageError, match="not both"):
        convert.to_linear(tmp_path / "a.safetensors", selection=make_selection(layers=["sq"]),
                          layers=["sq"], dry_run=True)
    with pytest.raises(TypeError, match="layer"):
        convert.to_linear(tmp_path / "a.safetensors", layer=["sq"], dry_run=True)
