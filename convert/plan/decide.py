"""Deciding the entries: which source tensors are transposed, kept, renamed or dropped.

`build_plan` is the whole decision of a conversion, from names, shapes and dtypes alone: each
decision is a `Because` and its evidence. No tensors here, and no torch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..companions import (
    REFUSED,
    CompanionError,
    Follows,
    Role,
    classify,
    companion_map,
    quantized_weight,
    siblings,
    strangers,
)
from ..dtypes import DTYPES, describe_shape, is_float_weight, is_transposable, swapped
from ..errors import CorruptInputError, UsageError
from ..layout import Layout
from ..provenance import Provenance
from ..selection import (
    Pattern,
    ReferenceModel,
    Selection,
    bias_evidence,
    rename_options,
    suggest_renames,
)
from .entries import Because, Drop, Entry, Plan
from .messages import Note
from .messages import describe as _describe
from .messages import quoted as _quoted
from .messages import skipped_rules as _skipped_rules
from .rules import Decision, units

SpecLike = Any  # TensorSpec, or a (shape, dtype) pair in tests


def _normalize(specs: Mapping[str, SpecLike]) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for k, s in specs.items():
        if isinstance(s, tuple):
            shape, dtype = s
        else:
            shape, dtype = s.shape, s.dtype
        out[k] = (tuple(shape), str(dtype))
    return out


def build_plan(specs: Mapping[str, SpecLike], target: Layout, selection: Selection | None = None,
               *, reference: ReferenceModel | None = None, provenance: Provenance | None = None,
               tied: Sequence[Sequence[str]] = (), source: str = "checkpoint",
               require_change: bool = True, refuse_ambiguous: bool = True) -> Plan:
    """Decide, for every key, whether it is transposed, kept, renamed or dropped.

    Args:
        specs: key -> TensorSpec (or a `(shape, dtype)` pair), in source order.
        target: the layout to write.
        selection: the user's patterns, renames and drops.
        reference: facts about `--model`, if given.
        provenance: the source's linconvert record, if any.
        tied: groups of keys that share one tensor.
        source: the source's name, for messages.
        require_change: refuse a plan that transposes nothing (a conversion must change
            something; `export` asks for the plan anyway).
        refuse_ambiguous: refuse square weights without evidence (else they are kept as they
            are: `export` to a format that only copies them).

    Raises:
        UsageError: an ambiguous square weight, a pattern that matches nothing, a contradiction,
            a rename collision, a double transpose, or nothing to transpose.
        CorruptInputError: provenance that does not describe the file.
    """
    selection = selection or Selection()
    flat = _normalize(specs)
    if provenance is not None and provenance.layout is target:
        raise UsageError(
            f"'{source}' is already in the {target} layout (its linconvert provenance says so); "
            f"converting it again would transpose its weights twice; use {target.other.command} "
            "to go back, or `linconvert export SRC -o DST` for another format unchanged.")
    if provenance is not None and provenance.operation == "export":
        provenance = None  # an export transposed nothing: its reverse is decided by evidence
    if provenance is not None and not selection.chooses_layers:
        decisions, warnings = _decide_from_provenance(flat, provenance, selection, source)
        names = {k: provenance.keys[k][0] for k in flat if k in provenance.keys}
        from_provenance = True
    else:
        decisions, warnings = _decide(flat, target, selection, reference, source,
                                      refuse_ambiguous)
        names = {}
        from_provenance = False

    entries, drops, more_warnings = _finish(flat, decisions, names, selection, reference,
                                            tied, source,
                                            provenance if from_provenance else None, target)
    warnings += more_warnings
    restructured = any(len(e.pieces) > 1 or e.pieces[0].index is not None or e.pieces[0].rows
                       for e in entries)  # a stack or a split changes the file by itself
    if require_change and not restructured and not any(e.transpose for e in entries) and \
            not from_provenance:
        raise UsageError(_nothing_to_transpose(decisions, target, source))
    return Plan(source, target, tuple(entries), tuple(drops), selection.options_hash(target),
                tuple(flat), tuple(tuple(g) for g in tied if len(g) > 1),
                tuple(w for w in warnings if not isinstance(w, Note)), from_provenance,
                selection.to_dict(), reference.parameters if reference else (),
                notes=tuple(str(w) for w in warnings if isinstance(w, Note)))


def build_export_plan(specs: Mapping[str, SpecLike], selection: Selection | None = None, *,
                      layout: Layout | None = None, reference: ReferenceModel | None = None,
                      provenance: Provenance | None = None, tied: Sequence[Sequence[str]] = (),
                      source: str = "checkpoint", layers_matter: bool = True) -> Plan:
    """The plan of `export`: every tensor copied as it is (renames and drops applied), in the
    layout SRC holds, which is recorded in provenance and drawn as an ONNX layer graph.

    The layout is LAYOUT if given, else SRC's provenance, else the evidence: the linear weights
    are the tensors a conversion to the other layout would transpose, decided by the same rules
    (so a square weight without evidence is exit 2 here too, where LAYERS_MATTER: an ONNX layer
    graph draws them; a copy into safetensors or `.pt` only records the layout).

    Raises:
        UsageError: the layout cannot be told (no evidence, or weights of both layouts), or the
            decision rules refuse (see `build_plan`).
    """
    selection = selection or Selection()
    if layout is None and provenance is not None:
        layout = provenance.layout
    if layout is not None:
        if provenance is not None and provenance.layout is layout and \
                not selection.chooses_layers:
            # the weights SRC's conversion transposed are its linear weights
            keys = [k for k, (_, t) in provenance.keys.items() if t and k in specs]
            selection = Selection(tuple(Pattern(k, "provenance", True) for k in keys), (),
                                  selection.drop, selection.renames, selection.model)
        conv = build_plan(specs, layout.other, selection, reference=reference, tied=tied,
                          source=source, require_change=False, refuse_ambiguous=layers_matter)
        held = layout
    else:
        if selection.layers or selection.exclude:
            raise UsageError(f"export of '{source}' with --layers, --exclude or a preset's "
                             "patterns needs --layout linear or --layout param: patterns say "
                             "which tensors are linear weights, not which layout they are "
                             "stored in.")
        plans = {}
        for held in (Layout.LINEAR, Layout.PARAM):
            plan = build_plan(specs, held.other, selection, reference=reference, tied=tied,
                              source=source, require_change=False,
                              refuse_ambiguous=layers_matter)
            if plan.transposed:
                plans[held] = plan
        if not plans:
            raise UsageError(f"export cannot tell which layout '{source}' holds (no bias "
                             "evidence, provenance or reference model); pass --layout linear "
                             "or --layout param.")
        if len(plans) == 2:
            lin = _quoted([e.source for e in plans[Layout.LINEAR].transposed], 2)
            par = _quoted([e.source for e in plans[Layout.PARAM].transposed], 2)
            raise UsageError(f"'{source}' holds linear weights of both layouts ({lin} linear, "
                             f"{par} param); say which layout to record with --layout.")
        ((held, conv),) = plans.items()
    entries = []
    for e in conv.entries:  # the same pieces, none transposed
        pieces = tuple(dataclasses.replace(p, transpose=False) for p in e.pieces)
        shape = swapped(e.shape) if e.transpose else e.shape
        if e.transpose:
            entries.append(Entry(e.key, shape, e.dtype, pieces, Because.LAYOUT_KEPT,
                                 f"{held}: {e.reason}"))
        else:
            entries.append(Entry(e.key, shape, e.dtype, pieces, e.because, e.evidence))
    return Plan(source, held, tuple(entries), conv.drops,
                selection.options_hash(held, export=True), conv.keys, conv.tied, conv.warnings,
                False, conv.selection, conv.model_parameters, operation="export",
                notes=conv.notes)


def _decide_from_provenance(flat: dict[str, tuple[tuple[int, ...], str]], prov: Provenance,
                            selection: Selection,
                            source: str) -> tuple[dict[str, Decision], list[str]]:
    decisions: dict[str, Decision] = {}
    used: set[Pattern] = set()
    for k, (shape, dtype) in flat.items():
        drop = _first(selection.drop, k, used)
        if drop:
            decisions[k] = None, Because.PATTERN, str(drop)
            continue
        entry = prov.keys.get(k)
        if entry is None:
            raise CorruptInputError(f"'{source}' holds '{k}', which its linconvert provenance "
                                    "does not list: the file was changed after it was written; "
                                    "pass --layers/--exclude to plan it without provenance.")
        was, transposed = entry
        if transposed and not is_transposable(dtype, shape):
            raise CorruptInputError(f"'{source}': provenance says '{k}' was transposed but it is "
                                    f"{_describe(shape, dtype)}.")
        decisions[k] = transposed, Because.PROVENANCE, was
    warnings = _unused_patterns(selection.drop, used, source)
    if prov.dropped:
        warnings.append(f"the conversion that wrote '{source}' dropped {_quoted(prov.dropped)}; "
                        "they cannot be restored.")
    return decisions, warnings


def _first(patterns: Sequence[Pattern], key: str, used: set[Pattern]) -> Pattern | None:
    hit = None
    for p in patterns:
        if p.matches(key):
            used.add(p)
            hit = hit or p
    return hit


def _decide(flat: dict[str, tuple[tuple[int, ...], str]], target: Layout, selection: Selection,
            reference: ReferenceModel | None, source: str,
            refuse_ambiguous: bool = True) -> tuple[dict[str, Decision], list[str]]:
    """key -> (True: transpose / False: keep / None: dropped, because, evidence)."""
    shapes = {k: s for k, (s, _) in flat.items()}
    decisions: dict[str, Decision] = {}
    used: set[Pattern] = set()
    warnings: list[str] = []
    errors: list[str] = []
    ambiguous: list[str] = []
    no_evidence: list[str] = []

    comps = companion_map(shapes, selection.companions)
    excluded: set[str] = set()  # what the user's --exclude names: never a stranger
    for rule in selection.companions:
        if not rule.shipped and not any(rule.matches(c) for c in comps):
            errors.append(f"{rule} matches no sibling of a layer's weight in '{source}'")
    chosen: dict[str, tuple[Pattern | None, Pattern | None]] = {}
    for k, (shape, dtype) in flat.items():
        drop = _first(selection.drop, k, used)
        layer = _first(selection.layers, k, used)
        excl = _first(selection.exclude, k, used)
        if excl and not excl.shipped:
            excluded.add(k)
        if drop:
            decisions[k] = None, Because.PATTERN, str(drop)
            continue
        if k in comps:  # it follows its weight: decided below, once the weights are
            chosen[k] = layer, excl
            continue
        if not is_float_weight(dtype, shape) and not quantized_weight(k, dtype, shape, shapes):
            if layer and not excl:
                what = (f"'{k}' is {_describe(shape, dtype)}, not a 2-D float tensor (or a "
                        "stack of them), so it cannot be transposed")
                if layer.shipped:
                    warnings.append(f"{what}; {layer} skipped it.")
                else:
                    errors.append(f"{what}: narrow {layer}")
            kind = "not 2-D" if len(shape) < 2 else (
                "packed or non-float dtype" if dtype in DTYPES else "dtype safetensors lacks")
            decisions[k] = False, Because.NOT_A_MATRIX, kind
            continue
        if len(shape) > 2:
            # A stack of matrices (experts) or a convolution kernel: only the user's own
            # selection, a reference model, bias evidence ([E, out]) or an expert's name makes
            # it a stack; a preset's name rule (Flax/Keras `*.kernel`) skips it.
            if layer and layer.shipped and not excl:
                warnings.append(f"'{k}' is {_describe(shape, dtype)}, not a 2-D float tensor; "
                                f"{layer} skipped it (select a stack of experts with --layers).")
                layer = None
            if not (layer or excl or (reference and selection.target_key(k) in
                                      reference.entries)
                    or bias_evidence(k, shape, shapes) or "expert" in k.lower()):
                decisions[k] = False, Because.NOT_A_MATRIX, "not 2-D"
                continue

        square = shape[-1] == shape[-2]
        evidence = bias_evidence(k, shape, shapes)
        ref = _reference_decision(k, shape, target, selection, reference) if reference else None
        if ref is not None:
            transpose, why = ref
            if transpose is None:
                ref = None  # the model cannot tell; the options below may
            else:
                if layer and not excl and not transpose and not layer.shipped:
                    errors.append(f"{layer} selects '{k}' but the reference model says {why}")
                if excl and transpose and not excl.shipped:
                    errors.append(f"{excl} excludes '{k}' but the reference model says {why}")
                decisions[k] = transpose, Because.REFERENCE_MODEL, why
                continue
        if excl:
            decisions[k] = False, Because.EXCLUDED, str(excl)
        elif layer:
            if evidence and evidence[0] is target:
                msg = (f"{layer} selects '{k}' but it is already in the {target} layout "
                       f"({evidence[1]}); transposing it would be a double transpose")
                if layer.shipped:
                    warnings.append(msg + "; skipped.")
                    decisions[k] = False, Because.BIAS_EVIDENCE, evidence[1]
                    continue
                errors.append(msg + "; remove it from the selection")
            decisions[k] = True, Because.PATTERN, str(layer)
        elif evidence:
            layout, why = evidence
            transpose = layout is not target
            decisions[k] = (transpose, Because.BIAS_EVIDENCE,
                            why + ("" if transpose else f"; already {target}"))
        elif square:
            ambiguous.append(k)
            decisions[k] = False, Because.NO_EVIDENCE, "square"
        else:
            no_evidence.append(k)
            decisions[k] = False, Because.NO_EVIDENCE, ""

    _follow(flat, decisions, comps, chosen, errors)
    _refuse_strangers(flat, decisions, comps, excluded, errors)
    warnings += _unused_patterns((*selection.layers, *selection.exclude, *selection.drop), used,
                                 source)
    if errors:
        raise UsageError("; ".join(errors) + ".")
    if ambiguous and refuse_ambiguous and reference is not None:
        produced = [selection.target_key(k) for k, d in decisions.items() if d[0] is not None]
        rules = suggest_renames([k for k in produced if k not in reference.entries],
                                [k for k in reference.entries if k not in produced])
        if rules:
            raise UsageError(
                f"the reference model '{reference.spec}' cannot decide the square weights "
                f"{_quoted(ambiguous, 4)} of '{source}': it names its keys differently; "
                f"{rename_options(rules)} would match them to its keys.")
    if ambiguous and refuse_ambiguous:
        raise UsageError(
            f"'{source}' has square weights with no evidence of their layout: "
            f"{_quoted(ambiguous, len(ambiguous))}; a square matrix loads silently either way, "
            "so say which are linear weights to transpose with --layers "
            f"(e.g. --layers '{glob_for(ambiguous)}'), which to leave with --exclude, or give "
            "the target model with --model MODULE:FACTORY.")
    if no_evidence:
        hint = ("; for hand-written W/b layers, --preset wb selects every W and renames W/b to "
                "nn.Linear's weight/bias" if any(_leaf(k) == "W" for k in no_evidence) else "")
        warnings.append(f"no evidence that {_quoted(no_evidence)} are linear weights (no bias "
                        f"sibling); left as they are; select them with --layers if they are"
                        f"{hint}.")
    return decisions, warnings


def _follow(flat: dict[str, tuple[tuple[int, ...], str]], decisions: dict[str, Decision],
            comps: Mapping[str, tuple[str, Role, tuple[int, int] | None]],
            chosen: Mapping[str, tuple[Pattern | None, Pattern | None]],
            errors: list[str]) -> None:
    """Each companion gets its weight's decision as its role and shape say: a grid or a mask is
    transposed with its weight, a scalar or a per-channel vector kept."""
    for c, (w, role, block) in comps.items():
        if c not in chosen:
            continue  # dropped
        layer, excl = chosen[c]
        wd = decisions.get(w)
        if wd is None or wd[0] is None:
            decisions[c] = False, Because.COMPANION, f"{role.value} of '{w}', which is dropped"
            continue
        try:
            comp = classify(c, w, role, flat[c][0], flat[w][0], block)
        except CompanionError as e:
            if wd[0]:
                errors.append(f"{e}; --exclude both, or give its block with a [[companion]] "
                              "rule (block = [rows, columns]) in a --rules file")
            decisions[c] = False, Because.COMPANION, f"{role.value} of '{w}', kept with it"
            continue
        transpose = bool(wd[0]) and comp.follows is Follows.TRANSPOSED
        if excl and not excl.shipped and transpose:
            errors.append(f"{excl} excludes '{c}', the {comp.kind} of '{w}', which is "
                          "transposed: left as it is, it would no longer fit its weight; "
                          f"exclude '{w}' too, or narrow {excl}")
        if layer and not layer.shipped and not wd[0] and comp.follows is Follows.TRANSPOSED:
            errors.append(f"{layer} selects '{c}', the {comp.kind} of '{w}', which is kept: "
                          f"a companion follows its weight; select '{w}' instead")
        if transpose and not is_transposable(flat[c][1], flat[c][0]):
            errors.append(f"'{c}' is {_describe(*flat[c])}, whose elements are not whole bytes, "
                          f"so it cannot follow its weight '{w}'")
        decisions[c] = transpose, Because.COMPANION, comp.evidence + (
            "" if transpose or comp.follows is Follows.KEPT else ", kept with it")


def _refuse_strangers(flat: dict[str, tuple[tuple[int, ...], str]],
                      decisions: dict[str, Decision], comps: Mapping[str, Any],
                      excluded: set[str], errors: list[str]) -> None:
    """A transposed weight's sibling that fits no role and shares one of its dims, or a
    packed weight beside transposed ones: exit 2, naming it."""
    shapes = {k: s for k, (s, _) in flat.items()}
    moving = [k for k, d in decisions.items() if d[0] and k not in comps]
    if not moving:
        return
    known = set(comps) | excluded | {k for k, d in decisions.items()
                                     if d[0] is None or d[0] or d[1] is Because.EXCLUDED}
    for w in moving:
        known.update(siblings(w, Role.BIAS))
    for k in flat:
        leaf = _leaf(k)
        if leaf in REFUSED and decisions[k][0] is not None and \
                decisions[k][1] is not Because.EXCLUDED:
            errors.append(f"'{k}' {REFUSED[leaf]}; linconvert cannot transpose it, so its layer "
                          f"would not match the transposed layers beside it ('{moving[0]}'); "
                          "dequantize the checkpoint first, or --exclude its layer's tensors")
    for w in moving:
        for k in strangers(w, shapes, known):
            if _leaf(k) in REFUSED:
                continue
            shared = sorted(set(shapes[w][-2:]) & set(shapes[k]))
            errors.append(f"'{k}' ({_describe(*flat[k])}) sits beside '{w}', which is "
                          f"transposed, and shares its dimension {shared[0]}, but nothing says "
                          "how it follows a transpose; --exclude it if it is not the weight's, "
                          "or say its role in a --rules file ([[companion]] key = "
                          f"'{k}', role = 'grid', 'same-shape', 'vector' or 'scalar')")
            known.add(k)


def _leaf(key: str) -> str:
    return key.rpartition(".")[2]


def glob_for(keys: Sequence[str]) -> str:
    """One pattern that matches every key of KEYS: their common start and end around a `*`."""
    if len(keys) == 1:
        return keys[0]
    head = os.path.commonprefix(list(keys))
    tail = os.path.commonprefix([k[::-1] for k in keys])[::-1]
    return f"{head}*{tail[max(0, len(head) + len(tail) - min(map(len, keys))):]}"


def _unused_patterns(patterns: Sequence[Pattern], used: set[Pattern], source: str) -> list[str]:
    """One warning for a preset's rules that matched nothing; UsageError for the user's."""
    unused = [p for p in patterns if p not in used]
    mine = [p for p in unused if not p.shipped]
    if mine:
        raise UsageError("; ".join(f"{p} matches no key of '{source}'" for p in mine) + ".")
    return _skipped_rules([str(p) for p in unused], source)


def _reference_decision(key: str, shape: tuple[int, ...], target: Layout, selection: Selection,
                        reference: ReferenceModel) -> tuple[bool | None, str] | None:
    """What the reference model says about KEY: (transpose?, why); None if it lacks the key."""
    entry = reference.entries.get(selection.target_key(key))
    if entry is None or len(entry.shape) != len(shape):
        return None
    flipped = swapped(shape)
    if shape[-1] != shape[-2]:
        if entry.shape == flipped:
            return True, f"its {entry.owner} wants {describe_shape(entry.shape)}, the transpose"
        if entry.shape == shape:
            return False, f"its {entry.owner} wants this shape"
        return None  # misshapen: reported with the key-set check
    if entry.shape != shape:
        return None
    if entry.layout is None:
        return None, f"square weight owned by {entry.owner}"
    if entry.layout is target:
        return True, f"square weight owned by {entry.owner} ({entry.layout} layout)"
    return False, f"square weight owned by {entry.owner} ({entry.layout} layout)"


def _finish(flat: dict[str, tuple[tuple[int, ...], str]], decisions: dict[str, Decision],
            names: dict[str, str], selection: Selection, reference: ReferenceModel | None,
            tied: Sequence[Sequence[str]], source: str,
            provenance: Provenance | None = None,
            target: Layout = Layout.LINEAR) -> tuple[list[Entry], list[Drop], list[str]]:
    """Apply renames (after NAMES, provenance's original keys), then check collisions, ties
    and the reference model's key set."""
    entries: list[Entry] = []
    drops: list[Drop] = []
    warnings: list[str] = []
    targets: dict[str, str] = {}
    used: set[int] = set()
    errors: list[str] = []
    for k, (shape, dtype) in flat.items():
        transpose, because, evidence = decisions[k]
        if transpose is None:
            drops.append(Drop(k, shape, dtype, because, evidence))
    for unit in units(flat, decisions, names, selection, provenance, source, errors,
                       warnings, target):
        t = unit.key
        for i, r in enumerate(selection.renames):
            t, hit = r.apply(t)
            if hit:
                used.add(i)
        first = unit.pieces[0].source
        if not t:
            errors.append(f"renames turn '{unit.key}' into an empty key")
        elif t in targets:
            errors.append(f"'{targets[t]}' and '{first}' would both be renamed to '{t}'")
        targets[t] = first
        entries.append(dataclasses.replace(unit, key=t))
    skipped = []
    for i, r in enumerate(selection.renames):
        if i not in used:
            if r.shipped:
                skipped.append(str(r))
            else:
                errors.append(f"{r} matches no key of '{source}'"
                              + _renamed_before(r, i, flat, names, selection))
    warnings += _skipped_rules(skipped, source)
    by_source = {e.source: e for e in entries}
    for group in tied:
        live = [by_source[k] for k in group if k in by_source]
        if len({e.transpose for e in live}) > 1:
            which = ", ".join(f"'{e.source}' ({e.action})" for e in live)
            errors.append(f"tied keys {which} share one tensor but would need different "
                          "transposes; select or exclude them together")
    if reference is not None:
        errors += _reference_mismatch(entries, reference)
    if errors:
        raise UsageError("; ".join(errors) + ".")
    named_w = [e.key for e in entries if e.transpose and _leaf(e.key) == "W"]
    if named_w and reference is None:
        rules = ("--rename '(^|\\.)W$' '\\g<1>weight' --rename '(^|\\.)b$' '\\g<1>bias'"
                 if any("." not in k for k in named_w) else
                 "--rename '\\.W$' '.weight' --rename '\\.b$' '.bias'")
        warnings.append(f"{_quoted(named_w, 3)} {'keeps' if len(named_w) == 1 else 'keep'} "
                        "the name 'W', which nn.Linear does not load (it names its parameters "
                        f"weight and bias): add --preset wb, or {rules}.")
    return entries, drops, warnings


def _renamed_before(rename: Any, i: int, flat: Mapping[str, Any], names: Mapping[str, str],
                    selection: Selection) -> str:
    """Words for a rename that matches no key because an earlier one (a preset's) already
    renamed the keys it was written for."""
    for k in flat:
        original = names.get(k, k)
        if not rename.apply(original)[1]:
            continue
        key = original
        for earlier in selection.renames[:i]:
            key, hit = earlier.apply(key)
            if hit:
                return (f" after {earlier}, which already renamed '{original}' to '{key}' "
                        "(write it for the renamed keys, or drop it)")
    return ""


def _reference_mismatch(entries: list[Entry], ref: ReferenceModel) -> list[str]:
    produced = {e.key: e for e in entries}
    missing = [k for k in ref.entries
               if k not in produced and not any(t in produced for t in ref.ties.get(k, ()))]
    unexpected = [t for t in produced if t not in ref.entries]
    misshapen = [f"'{t}' ({'x'.join(map(str, e.shape))}, the model wants "
                 f"{'x'.join(map(str, ref.entries[t].shape))})"
                 for t, e in produced.items()
                 if t in ref.entries and e.shape != ref.entries[t].shape]
    errors = []
    rules = suggest_renames(unexpected, missing) if missing and unexpected else []
    if rules:
        errors.append(f"the conversion's keys differ from the reference model's ('{ref.spec}'): "
                      f"{rename_options(rules)} would turn {_quoted(sorted(unexpected), 3)} "
                      "into the keys it expects")
    elif missing:
        errors.append(f"the reference model '{ref.spec}' expects {_quoted(sorted(missing))}, "
                      "which the conversion does not produce (add a --rename?)")
    if unexpected and not rules:
        errors.append(f"the conversion produces {_quoted(sorted(unexpected))}, which the "
                      f"reference model '{ref.spec}' lacks (add a --rename or --drop?)")
    if misshapen:
        errors.append(f"shapes differ from the reference model '{ref.spec}': "
                      f"{', '.join(sorted(misshapen)[:8])}")
    return errors


def _nothing_to_transpose(decisions: dict[str, Decision], target: Layout, source: str) -> str:
    already = [k for k, (t, because, _) in decisions.items()
               if t is False and because in (Because.BIAS_EVIDENCE, Because.REFERENCE_MODEL)]
    unproven = [k for k, (_, because, _) in decisions.items() if because is Because.NO_EVIDENCE]
    if already:
        return (f"nothing to transpose in '{source}': its weights are already in the {target} "
                f"layout ({_quoted(already, 3)}); use {target.other.command} for the other way, "
                "or `linconvert export SRC -o DST` to write it in another format unchanged.")
    if unproven:
        return (f"nothing to transpose in '{source}': no evidence that its 2-D tensors "
                f"{_quoted(unproven, 4)} are linear weights; select them with --layers "
                f"(e.g. --layers '{unproven[0]}').")
    return f"nothing to transpose in '{source}': it holds no 2-D float tensor to select."
