"""Unit tests of `convert.plan.build_plan`: headers only, no tensors, no torch."""

from __future__ import annotations

import json

import pytest

from convert.errors import CorruptInputError, UsageError
from convert.layout import Layout
from convert.plan import build_plan
from convert.provenance import Provenance
from convert.selection import Pattern, RefEntry, ReferenceModel, Rename, Selection

IN, OUT = 3, 5  # non-square: a missing transpose is visible
SQ = 4  # square: ambiguous without evidence

LINEAR, PARAM = Layout.LINEAR, Layout.PARAM


def f32(*shape: int) -> tuple[tuple[int, ...], str]:
    return (shape, "F32")


def param_fc(prefix: str = "fc", w: str = "weight", b: str = "bias") -> dict:
    """A param-layout layer (in x out) with its bias."""
    return {f"{prefix}.{w}": f32(IN, OUT), f"{prefix}.{b}": f32(OUT)}


def linear_fc(prefix: str = "fc") -> dict:
    """A linear-layout layer (out x in) with its bias."""
    return {f"{prefix}.weight": f32(OUT, IN), f"{prefix}.bias": f32(OUT)}


def sel(*, layers=(), exclude=(), drop=(), rename=(), shipped=False, model=None) -> Selection:
    origin = "preset 'x' " if shipped else "--"
    return Selection(
        tuple(Pattern(p, origin + "layers", shipped) for p in layers),
        tuple(Pattern(p, origin + "exclude", shipped) for p in exclude),
        tuple(Pattern(p, origin + "drop", shipped) for p in drop),
        tuple(Rename(a, b, origin + "rename", shipped) for a, b in rename),
        model,
    )


def by_source(plan) -> dict:
    return {a.source: a for a in plan.actions}


# --- bias evidence --------------------------------------------------------------------------


def test_param_weight_with_bias_is_transposed_to_linear():
    plan = build_plan(param_fc(), LINEAR)
    acts = by_source(plan)
    w, b = acts["fc.weight"], acts["fc.bias"]
    assert w.transpose and w.action == "transpose"
    assert w.source_shape == (IN, OUT) and w.target_shape == (OUT, IN)
    assert "bias evidence" in w.reason
    assert not b.transpose and b.target_shape == (OUT,)
    assert [a.source for a in plan.transposed] == ["fc.weight"]
    assert plan.layout is LINEAR and not plan.from_provenance


def test_param_weight_with_bias_is_already_param():
    specs = {**param_fc(), **linear_fc("other")}
    plan = build_plan(specs, PARAM)
    acts = by_source(plan)
    assert not acts["fc.weight"].transpose
    assert acts["fc.weight"].target_shape == (IN, OUT)
    assert "already param" in acts["fc.weight"].reason
    assert acts["other.weight"].transpose
    assert acts["other.weight"].target_shape == (IN, OUT)


def test_linear_weight_with_bias_is_transposed_to_param():
    plan = build_plan(linear_fc(), PARAM)
    w = by_source(plan)["fc.weight"]
    assert w.transpose and w.target_shape == (IN, OUT)


def test_linear_weight_with_bias_is_already_linear():
    specs = {**linear_fc(), **param_fc("p")}
    acts = by_source(build_plan(specs, LINEAR))
    assert not acts["fc.weight"].transpose
    assert "already linear" in acts["fc.weight"].reason
    assert acts["p.weight"].transpose


@pytest.mark.parametrize(("w", "b"), [("W", "b"), ("kernel", "bias")])
def test_other_weight_and_bias_names_are_evidence(w, b):
    acts = by_source(build_plan(param_fc("layer", w, b), LINEAR))
    assert acts[f"layer.{w}"].transpose
    assert acts[f"layer.{w}"].target_shape == (OUT, IN)


def test_mismatched_leaf_pairs_are_not_evidence():
    """`P.kernel` goes with `P.bias`, not `P.b`."""
    specs = {"k.kernel": f32(IN, OUT), "k.b": f32(OUT), **param_fc()}
    plan = build_plan(specs, LINEAR)
    assert not by_source(plan)["k.kernel"].transpose
    assert any("'k.kernel'" in w for w in plan.warnings)


def test_bias_evidence_works_for_top_level_keys():
    acts = by_source(build_plan({"weight": f32(IN, OUT), "bias": f32(OUT)}, LINEAR))
    assert acts["weight"].transpose


def test_dtype_is_carried_and_all_float_dtypes_transpose():
    specs = {}
    for i, dt in enumerate(["F32", "F16", "BF16", "F64", "F8_E4M3"]):
        specs[f"l{i}.weight"] = ((IN, OUT), dt)
        specs[f"l{i}.bias"] = ((OUT,), dt)
    plan = build_plan(specs, LINEAR)
    assert len(plan.transposed) == 5
    assert by_source(plan)["l2.weight"].dtype == "BF16"


# --- ambiguity and missing evidence ----------------------------------------------------------


def square_specs() -> dict:
    return {"attn.q": f32(SQ, SQ), "attn.k": f32(SQ, SQ), "ln.weight": f32(SQ),
            **param_fc()}


def test_square_weights_without_evidence_are_ambiguous():
    with pytest.raises(UsageError, match="square weights with no evidence") as e:
        build_plan(square_specs(), LINEAR, source="ck.safetensors")
    msg = str(e.value)
    assert e.value.exit_code == 2
    assert "'attn.q'" in msg and "'attn.k'" in msg
    assert "'fc.weight'" not in msg
    for option in ("--layers", "--exclude", "--model"):
        assert option in msg
    assert "ck.safetensors" in msg


def test_square_weight_with_square_bias_is_still_ambiguous():
    with pytest.raises(UsageError, match="'sq.weight'"):
        build_plan({"sq.weight": f32(SQ, SQ), "sq.bias": f32(SQ)}, LINEAR)


def test_ambiguity_error_lists_every_square_key():
    specs = {f"sq{i}.proj": f32(SQ, SQ) for i in range(12)}
    with pytest.raises(UsageError) as e:
        build_plan(specs, LINEAR)
    for i in range(12):
        assert f"'sq{i}.proj'" in str(e.value)


def test_ambiguity_resolved_by_layers():
    plan = build_plan(square_specs(), LINEAR, sel(layers=["attn.*"], exclude=[]))
    acts = by_source(plan)
    assert acts["attn.q"].transpose and acts["attn.k"].transpose
    assert "selected by --layers 'attn.*'" in acts["attn.q"].reason
    assert acts["fc.weight"].transpose
    assert not acts["ln.weight"].transpose


def test_ambiguity_resolved_by_exclude():
    plan = build_plan(square_specs(), LINEAR, sel(exclude=["attn.*"]))
    acts = by_source(plan)
    assert not acts["attn.q"].transpose and not acts["attn.k"].transpose
    assert "excluded by" in acts["attn.q"].reason
    assert acts["fc.weight"].transpose


def test_partially_resolved_ambiguity_names_only_the_rest():
    with pytest.raises(UsageError, match="no evidence") as e:
        build_plan(square_specs(), LINEAR, sel(layers=["attn.q"]))
    assert "'attn.k'" in str(e.value) and "'attn.q'" not in str(e.value)


def test_nonsquare_weight_without_bias_is_kept_with_warning():
    """Seed 000's bare `W`: not transposed unless selected, and a warning names it."""
    plan = build_plan({"W": f32(5, 2), **param_fc()}, LINEAR)
    w = by_source(plan)["W"]
    assert not w.transpose and w.target_shape == (5, 2)
    assert "no evidence" in w.reason
    assert any("'W'" in msg and "--layers" in msg for msg in plan.warnings)


def test_nonsquare_weight_without_bias_alone_is_nothing_to_transpose():
    with pytest.raises(UsageError, match="nothing to transpose") as e:
        build_plan({"W": f32(5, 2)}, LINEAR)
    assert e.value.exit_code == 2
    assert "--layers 'W'" in str(e.value)


def test_nonsquare_weight_selected_with_layers_is_transposed():
    plan = build_plan({"W": f32(5, 2)}, LINEAR, sel(layers=["W"]))
    w = by_source(plan)["W"]
    assert w.transpose and w.target_shape == (2, 5)
    # the one thing said: nn.Linear would not load a weight named W (issue 19)
    assert len(plan.warnings) == 1 and "--preset wb" in plan.warnings[0]


def test_already_in_target_layout_only():
    with pytest.raises(UsageError, match="already in the linear layout") as e:
        build_plan({**linear_fc(), **linear_fc("b")}, LINEAR)
    assert e.value.exit_code == 2
    assert "to-param" in str(e.value)
    with pytest.raises(UsageError, match="already in the param layout"):
        build_plan(param_fc(), PARAM)


def test_no_matrix_at_all_is_nothing_to_transpose():
    with pytest.raises(UsageError, match="nothing to transpose"):
        build_plan({"step": ((), "I64"), "b": f32(OUT)}, LINEAR)


# --- selections that cannot be transposed ---------------------------------------------------


@pytest.mark.parametrize("spec", [f32(OUT), ((2, IN, OUT), "I64"), ((IN, OUT), "I64"),
                                  ((IN, OUT), "BOOL"), ((IN, OUT), "F4"), ((IN, OUT), "U8")])
def test_layers_selecting_a_non_float_matrix_is_an_error(spec):
    specs = {"t": spec, **param_fc()}
    with pytest.raises(UsageError, match="'t' is .*not a 2-D float tensor") as e:
        build_plan(specs, LINEAR, sel(layers=["t"]))
    assert e.value.exit_code == 2


@pytest.mark.parametrize("spec", [f32(OUT), f32(2, IN, OUT), ((IN, OUT), "I64"),
                                  ((IN, OUT), "BOOL")])
def test_shipped_pattern_hitting_a_non_float_matrix_warns(spec):
    specs = {"t": spec, **param_fc()}
    plan = build_plan(specs, LINEAR, sel(layers=["t"], shipped=True))
    assert not by_source(plan)["t"].transpose
    assert any("'t'" in w and "skipped" in w for w in plan.warnings)
    assert by_source(plan)["fc.weight"].transpose


def test_layers_on_non_float_matrix_that_is_excluded_is_fine():
    specs = {"t": ((IN, OUT), "I64"), **param_fc()}
    plan = build_plan(specs, LINEAR, sel(layers=["*"], exclude=["t", "fc.bias"]))
    assert not by_source(plan)["t"].transpose


def test_non_float_matrices_are_never_transposed_even_with_evidence():
    specs = {"q.weight": ((IN, OUT), "I8"), "q.bias": f32(OUT), **param_fc()}
    plan = build_plan(specs, LINEAR)
    assert not by_source(plan)["q.weight"].transpose


# --- patterns --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["layers", "exclude", "drop"])
def test_user_pattern_matching_nothing_is_an_error(kind):
    with pytest.raises(UsageError, match=f"--{kind} 'nothing.here' matches no key of 'ck'") as e:
        build_plan(param_fc(), LINEAR, sel(**{kind: ["nothing.here"]}), source="ck")
    assert e.value.exit_code == 2


def test_user_rename_matching_nothing_is_an_error():
    with pytest.raises(UsageError, match="--rename '\\^nothing' 'x' matches no key"):
        build_plan(param_fc(), LINEAR, sel(rename=[("^nothing", "x")]))


@pytest.mark.parametrize("kind", ["layers", "exclude", "drop", "rename"])
def test_shipped_pattern_matching_nothing_warns(kind):
    """A preset's rule that matches nothing is a note (said under -v), not a warning."""
    value = [("^nothing", "x")] if kind == "rename" else ["nothing.here"]
    plan = build_plan(param_fc(), LINEAR, sel(**{kind: value}, shipped=True))
    assert any("matches no key" in w and "skipped" in w for w in plan.notes)
    assert not any("matches no key" in w for w in plan.warnings)
    assert by_source(plan)["fc.weight"].transpose


def test_regex_patterns_match_the_whole_key():
    specs = {"blk.0.proj": f32(SQ, SQ), "blk.1.proj": f32(SQ, SQ), "blk.10.proj": f32(SQ, SQ)}
    plan = build_plan(specs, LINEAR, sel(layers=[r"re:blk\.\d\.proj"], exclude=["blk.10.proj"]))
    acts = by_source(plan)
    assert acts["blk.0.proj"].transpose and acts["blk.1.proj"].transpose
    assert not acts["blk.10.proj"].transpose
    with pytest.raises(UsageError, match="matches no key"):
        build_plan(specs, LINEAR, sel(layers=[r"re:blk"]))  # a search would match; fullmatch not


def test_globs_are_case_sensitive_and_cross_dots():
    specs = {"a.b.Proj": f32(SQ, SQ), "a.b.proj": f32(SQ, SQ)}
    plan = build_plan(specs, LINEAR, sel(layers=["*.proj"], exclude=["*.Proj"]))
    acts = by_source(plan)
    assert acts["a.b.proj"].transpose and not acts["a.b.Proj"].transpose
    with pytest.raises(UsageError, match="'\\*.PROJ' matches no key"):
        build_plan(specs, LINEAR, sel(layers=["*.PROJ"], exclude=["*.Proj"]))


def test_exclude_wins_over_layers_and_evidence():
    plan = build_plan({**param_fc(), **param_fc("g")}, LINEAR,
                      sel(layers=["*.weight"], exclude=["g.*"]))
    acts = by_source(plan)
    assert acts["fc.weight"].transpose
    assert not acts["g.weight"].transpose


def test_invalid_regex_pattern_is_a_usage_error():
    with pytest.raises(UsageError, match="not a valid regular expression") as e:
        build_plan(param_fc(), LINEAR, sel(layers=["re:(fc"]))
    assert e.value.exit_code == 2


def test_layers_contradicting_bias_evidence_is_a_double_transpose():
    specs = {**linear_fc(), **param_fc("p")}
    with pytest.raises(UsageError, match="double transpose") as e:
        build_plan(specs, LINEAR, sel(layers=["*.weight"]))
    assert e.value.exit_code == 2
    assert "'fc.weight'" in str(e.value) and "already in the linear layout" in str(e.value)


def test_shipped_layers_contradicting_bias_evidence_is_skipped():
    specs = {**linear_fc(), **param_fc("p")}
    plan = build_plan(specs, LINEAR, sel(layers=["*.weight"], shipped=True))
    acts = by_source(plan)
    assert not acts["fc.weight"].transpose and acts["p.weight"].transpose
    assert any("double transpose" in w for w in plan.warnings)


def test_layers_agreeing_with_bias_evidence_is_fine():
    plan = build_plan(param_fc(), LINEAR, sel(layers=["fc.weight"]))
    assert by_source(plan)["fc.weight"].transpose


# --- drop ------------------------------------------------------------------------------------


def test_dropped_keys_are_actions_but_not_written():
    specs = {"mask": ((1, 1, SQ, SQ), "BOOL"), **param_fc(), "g.weight": f32(IN, OUT),
             "g.bias": f32(OUT)}
    plan = build_plan(specs, LINEAR, sel(drop=["mask", "g.*"], layers=["g.weight"]))
    acts = by_source(plan)
    for k in ("mask", "g.weight", "g.bias"):
        assert acts[k].dropped and acts[k].action == "drop" and acts[k].target == ""
        assert not acts[k].transpose
    assert plan.dropped == ("mask", "g.weight", "g.bias")
    assert [a.source for a in plan.written] == ["fc.weight", "fc.bias"]
    assert [a.source for a in plan.actions] == list(specs)


# --- renames ---------------------------------------------------------------------------------


def test_renames_are_ordered_and_applied_after_the_decision():
    specs = {"transformer.h.0.sq": f32(SQ, SQ), **param_fc("transformer.h.0.fc")}
    plan = build_plan(specs, LINEAR, sel(layers=["transformer.h.0.sq"],
                                         rename=[(r"^transformer\.", ""), (r"^h\.", "layers.")]))
    acts = by_source(plan)
    assert acts["transformer.h.0.sq"].target == "layers.0.sq"
    assert acts["transformer.h.0.sq"].transpose
    assert acts["transformer.h.0.fc.weight"].target == "layers.0.fc.weight"
    assert acts["transformer.h.0.fc.weight"].transpose


def test_rename_order_matters():
    plan = build_plan(param_fc("a"), LINEAR, sel(rename=[("^a", "b"), ("^b", "c")]))
    assert [a.target for a in plan.written] == ["c.weight", "c.bias"]
    plan = build_plan(param_fc("a"), LINEAR, sel(rename=[("^b", "c"), ("^a", "b")],
                                                  shipped=True))
    assert [a.target for a in plan.written] == ["b.weight", "b.bias"]


def test_rename_collision_is_an_error():
    specs = {**param_fc("enc"), **param_fc("dec")}
    with pytest.raises(UsageError, match="'enc.weight' and 'dec.weight' would both be renamed "
                                         "to 'x.weight'") as e:
        build_plan(specs, LINEAR, sel(rename=[("^(enc|dec)", "x")]))
    assert e.value.exit_code == 2


def test_rename_onto_an_existing_key_is_a_collision():
    specs = {**param_fc("a"), **param_fc("b")}
    with pytest.raises(UsageError, match="both be renamed to 'a.weight'"):
        build_plan(specs, LINEAR, sel(rename=[("^b", "a")]))


def test_rename_to_empty_key_is_an_error():
    with pytest.raises(UsageError, match="empty key"):
        build_plan({**param_fc(), "junk": f32(2)}, LINEAR, sel(rename=[("^junk$", "")]))


def test_output_keeps_source_key_order():
    specs = {"z.weight": f32(IN, OUT), "z.bias": f32(OUT), "a.weight": f32(IN, OUT),
             "a.bias": f32(OUT), "m": f32(2)}
    plan = build_plan(specs, LINEAR, sel(rename=[("^z", "b"), ("^m$", "0")]))
    assert [a.target for a in plan.written] == ["b.weight", "b.bias", "a.weight", "a.bias", "0"]
    assert [a["source"] for a in plan.to_dict()["actions"]] == list(specs)


# --- tied groups -----------------------------------------------------------------------------


def test_tied_keys_needing_different_transposes_are_an_error():
    specs = {**param_fc(), "emb": f32(IN, OUT)}
    with pytest.raises(UsageError, match="tied keys .*'fc.weight'.*'emb'") as e:
        build_plan(specs, LINEAR, tied=[("fc.weight", "emb")])
    assert e.value.exit_code == 2
    assert "together" in str(e.value)


def test_tied_keys_that_agree_are_fine():
    specs = {**param_fc(), "emb": f32(IN, OUT)}
    plan = build_plan(specs, LINEAR, sel(layers=["emb"]), tied=[("fc.weight", "emb")])
    acts = by_source(plan)
    assert acts["fc.weight"].transpose and acts["emb"].transpose
    assert plan.tied == (("fc.weight", "emb"),)


def test_tied_group_with_a_dropped_member_is_fine():
    specs = {**param_fc(), "emb": f32(IN, OUT)}
    plan = build_plan(specs, LINEAR, sel(drop=["emb"]), tied=[("fc.weight", "emb")])
    assert by_source(plan)["emb"].dropped


# --- provenance ------------------------------------------------------------------------------


def forward_provenance() -> tuple[dict, Provenance]:
    """A to-linear output (renamed, squares chosen by --layers) and its provenance."""
    specs = {"h.0.q": f32(SQ, SQ), "h.0.k": f32(SQ, SQ), "h.0.fc.weight": f32(OUT, IN),
             "h.0.fc.bias": f32(OUT), "h.0.emb": f32(7, 2)}
    prov = Provenance(LINEAR, {
        "h.0.q": ("transformer.h.0.q", True),
        "h.0.k": ("transformer.h.0.k", False),
        "h.0.fc.weight": ("transformer.h.0.fc.weight", True),
        "h.0.fc.bias": ("transformer.h.0.fc.bias", False),
        "h.0.emb": ("transformer.h.0.emb", False),
    }, dropped=("transformer.masked_bias",))
    return specs, prov


def test_provenance_in_the_target_layout_refuses_a_double_transpose():
    specs, prov = forward_provenance()
    with pytest.raises(UsageError, match="twice") as e:
        build_plan(specs, LINEAR, provenance=prov)
    assert e.value.exit_code == 2
    assert "to-param" in str(e.value)
    with pytest.raises(UsageError, match="already in the linear layout"):
        build_plan(specs, LINEAR, sel(layers=["h.0.k"]), provenance=prov)


def test_provenance_reverses_the_conversion_exactly():
    specs, prov = forward_provenance()
    plan = build_plan(specs, PARAM, provenance=prov)
    assert plan.from_provenance
    assert [(a.source, a.target, a.transpose) for a in plan.actions] == [
        (k, src, t) for k, (src, t) in prov.keys.items()]
    assert by_source(plan)["h.0.q"].target_shape == (SQ, SQ)
    assert by_source(plan)["h.0.fc.weight"].target_shape == (IN, OUT)
    assert any("transformer.masked_bias" in w for w in plan.warnings)


def test_provenance_with_nothing_transposed_is_not_an_error():
    specs = {"emb": f32(7, 2)}
    plan = build_plan(specs, PARAM, provenance=Provenance(LINEAR, {"emb": ("emb", False)}))
    assert plan.from_provenance and plan.transposed == ()


def test_key_missing_from_provenance_is_corrupt_input():
    specs, prov = forward_provenance()
    specs["extra"] = f32(2)
    with pytest.raises(CorruptInputError, match="'extra'") as e:
        build_plan(specs, PARAM, provenance=prov)
    assert e.value.exit_code == 4


def test_provenance_transposing_a_vector_is_corrupt_input():
    specs = {"v": f32(OUT)}
    with pytest.raises(CorruptInputError, match="'v' was transposed"):
        build_plan(specs, PARAM, provenance=Provenance(LINEAR, {"v": ("v", True)}))


def test_layers_selection_overrides_provenance():
    specs, prov = forward_provenance()
    specs["extra"] = f32(2)  # would be corrupt input if provenance were used
    plan = build_plan(specs, PARAM, sel(layers=["h.0.k"], exclude=["h.0.q"]), provenance=prov)
    acts = by_source(plan)
    assert not plan.from_provenance
    assert acts["h.0.k"].transpose and acts["h.0.k"].target == "h.0.k"
    assert not acts["h.0.q"].transpose  # provenance says it was transposed
    assert acts["h.0.fc.weight"].transpose  # bias evidence
    assert not acts["h.0.emb"].transpose


def test_drop_applies_to_a_provenance_reversal():
    specs, prov = forward_provenance()
    plan = build_plan(specs, PARAM, sel(drop=["h.0.emb"]), provenance=prov)
    assert by_source(plan)["h.0.emb"].dropped
    with pytest.raises(UsageError, match="matches no key"):
        build_plan(specs, PARAM, sel(drop=["nothing"]), provenance=prov)


# --- reference model -------------------------------------------------------------------------


def ref(entries: dict, ties: dict | None = None) -> ReferenceModel:
    return ReferenceModel("models.py:build", entries, ties or {})


def test_reference_nonsquare_transposed_shape_is_transposed():
    reference = ref({"fc.weight": RefEntry((OUT, IN), "Linear", LINEAR),
                     "fc.bias": RefEntry((OUT,), "Linear"), "W": RefEntry((2, 5), "Mine")})
    specs = {**param_fc(), "W": f32(5, 2)}  # W has no bias: only the model can say
    plan = build_plan(specs, LINEAR, sel(model="models.py:build"), reference=reference)
    acts = by_source(plan)
    assert acts["fc.weight"].transpose and acts["W"].transpose
    assert acts["W"].reason.startswith("reference model")


def test_reference_nonsquare_same_shape_is_kept():
    reference = ref({"fc.weight": RefEntry((OUT, IN), "Linear", LINEAR),
                     "fc.bias": RefEntry((OUT,), "Linear"), "W": RefEntry((5, 2), "Mine")})
    plan = build_plan({**param_fc(), "W": f32(5, 2)}, LINEAR, reference=reference)
    assert not by_source(plan)["W"].transpose
    assert plan.warnings == ()


def test_reference_square_owned_by_linear_is_transposed_to_linear():
    reference = ref({"q.weight": RefEntry((SQ, SQ), "Linear", LINEAR),
                     "o.weight": RefEntry((SQ, SQ), "ParamLinear", PARAM)})
    specs = {"q.weight": f32(SQ, SQ), "o.weight": f32(SQ, SQ)}
    acts = by_source(build_plan(specs, LINEAR, reference=reference))
    assert acts["q.weight"].transpose
    assert not acts["o.weight"].transpose
    acts = by_source(build_plan(specs, PARAM, reference=reference))
    assert not acts["q.weight"].transpose and acts["o.weight"].transpose


def test_reference_square_with_unknown_owner_is_ambiguous():
    reference = ref({"q.weight": RefEntry((SQ, SQ), "Mystery", None)})
    specs = {"q.weight": f32(SQ, SQ)}
    with pytest.raises(UsageError, match="square weights with no evidence.*'q.weight'"):
        build_plan(specs, LINEAR, reference=reference)
    plan = build_plan(specs, LINEAR, sel(layers=["q.weight"]), reference=reference)
    assert by_source(plan)["q.weight"].transpose


def test_reference_contradicting_layers_is_an_error():
    reference = ref({"o.weight": RefEntry((SQ, SQ), "ParamLinear", PARAM), **{
        "fc.weight": RefEntry((OUT, IN), "Linear", LINEAR), "fc.bias": RefEntry((OUT,), "L")}})
    specs = {"o.weight": f32(SQ, SQ), **param_fc()}
    with pytest.raises(UsageError, match="selects 'o.weight' but the reference model"):
        build_plan(specs, LINEAR, sel(layers=["o.weight"]), reference=reference)


def test_reference_uses_renamed_keys():
    reference = ref({"net.0.weight": RefEntry((OUT, IN), "Linear", LINEAR),
                     "net.0.bias": RefEntry((OUT,), "Linear")})
    plan = build_plan(param_fc(), LINEAR, sel(rename=[(r"^fc\.", "net.0.")]),
                      reference=reference)
    assert by_source(plan)["fc.weight"].target == "net.0.weight"
    assert by_source(plan)["fc.weight"].transpose


def test_reference_missing_key_is_an_error():
    reference = ref({"fc.weight": RefEntry((OUT, IN), "Linear", LINEAR),
                     "fc.bias": RefEntry((OUT,), "Linear"), "head.weight": RefEntry((2, 2), "L")})
    with pytest.raises(UsageError, match="expects 'head.weight'") as e:
        build_plan(param_fc(), LINEAR, reference=reference)
    assert e.value.exit_code == 2


def test_reference_unexpected_key_is_an_error():
    reference = ref({"fc.weight": RefEntry((OUT, IN), "Linear", LINEAR),
                     "fc.bias": RefEntry((OUT,), "Linear")})
    with pytest.raises(UsageError, match="produces 'extra', which the reference model"):
        build_plan({**param_fc(), "extra": f32(2)}, LINEAR, reference=reference)
    plan = build_plan({**param_fc(), "extra": f32(2)}, LINEAR, sel(drop=["extra"]),
                      reference=reference)
    assert plan.dropped == ("extra",)


def test_reference_misshapen_key_is_an_error():
    reference = ref({"fc.weight": RefEntry((7, 2), "Linear", LINEAR),
                     "fc.bias": RefEntry((OUT,), "Linear")})
    with pytest.raises(UsageError, match="shapes differ.*'fc.weight'"):
        build_plan(param_fc(), LINEAR, reference=reference)
    reference = ref({"fc.weight": RefEntry((OUT, IN), "Linear", LINEAR),
                     "fc.bias": RefEntry((OUT + 1,), "Linear")})
    with pytest.raises(UsageError, match="shapes differ.*'fc.bias'"):
        build_plan(param_fc(), LINEAR, reference=reference)


def test_reference_missing_key_tied_to_a_present_key_is_accepted():
    reference = ref({"emb.weight": RefEntry((OUT, IN), "Embedding"),
                     "head.weight": RefEntry((OUT, IN), "Linear", LINEAR),
                     **{"fc.weight": RefEntry((OUT, IN), "Linear", LINEAR),
                        "fc.bias": RefEntry((OUT,), "Linear")}},
                    ties={"emb.weight": ("head.weight",), "head.weight": ("emb.weight",)})
    specs = {"emb.weight": f32(OUT, IN), **param_fc()}
    plan = build_plan(specs, LINEAR, reference=reference)
    assert [a.target for a in plan.written] == ["emb.weight", "fc.weight", "fc.bias"]
    untied = ref(dict(reference.entries))
    with pytest.raises(UsageError, match="expects 'head.weight'"):
        build_plan(specs, LINEAR, reference=untied)


# --- the plan as data ------------------------------------------------------------------------


def test_plan_to_dict_is_json():
    specs = {**param_fc(), "mask": ((SQ,), "BOOL"), "W": f32(5, 2)}
    plan = build_plan(specs, LINEAR, sel(drop=["mask"]), source="ck.pt")
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["source"] == "ck.pt" and d["layout"] == "linear" and d["direction"] == "to-linear"
    assert d["counts"] == {"transpose": 1, "drop": 1, "keep": 2}
    assert d["options_hash"] == plan.options_hash
    assert d["selection"]["drop"] == ["mask"]
    fc = d["actions"][0]
    assert fc == {"source": "fc.weight", "target": "fc.weight", "action": "transpose",
                  "shape": [IN, OUT], "target_shape": [OUT, IN], "dtype": "F32",
                  "reason": fc["reason"]}
    assert d["actions"][2]["target"] is None and d["actions"][2]["action"] == "drop"
    assert d["warnings"] and "'W'" in d["warnings"][0]


def test_options_hash_tracks_options_and_direction_only():
    base = build_plan(param_fc(), LINEAR, sel(layers=["fc.weight"]))
    same = build_plan({**param_fc(), "other": f32(2)}, LINEAR, sel(layers=["fc.weight"]))
    assert len(base.options_hash) == 64
    assert same.options_hash == base.options_hash
    hashes = {
        base.options_hash,
        build_plan(linear_fc(), PARAM, sel(layers=["fc.weight"])).options_hash,
        build_plan(param_fc(), LINEAR).options_hash,
        build_plan(param_fc(), LINEAR, sel(layers=["fc.weight"], exclude=["fc.bias"]))
        .options_hash,
        build_plan(param_fc(), LINEAR, sel(layers=["fc.weight"], drop=["fc.bias"]))
        .options_hash,
        build_plan(param_fc(), LINEAR, sel(layers=["fc.weight"], rename=[("fc", "g")]))
        .options_hash,
    }
    assert len(hashes) == 6


def test_specs_may_be_objects_with_shape_and_dtype():
    class Spec:
        def __init__(self, shape, dtype):
            self.shape, self.dtype = shape, dtype

    plan = build_plan({"fc.weight": Spec([IN, OUT], "F32"), "fc.bias": Spec([OUT], "F32")},
                      LINEAR)
    assert by_source(plan)["fc.weight"].target_shape == (OUT, IN)
