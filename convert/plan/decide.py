"""Deciding the entries: which source tensors are transposed, kept, renamed or dropped.

`build_plan` is the whole decision of a conversion, from names, shapes and dtypes alone: each
decision is a `Because` and its evidence. No tensors here, and no torch.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from ..dtypes import DTYPES, describe_shape, is_float_weight, swapped
from ..errors import CorruptInputError, UsageError
from ..layout import Layout
from ..provenance import Provenance
from ..selection import (
    Pattern,
    ReferenceModel,
    Role,
    Selection,
    bias_evidence,
    bias_key,
    rename_options,
    siblings,
    suggest_renames,
)
from .entries import Because, Drop, Entry, Piece, Plan

Decision = tuple[bool | None, Because, str]  # transpose? (None: dropped), why, evidence

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


def _quoted(keys: Sequence[str], limit: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(f"'{k}'" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _describe(shape: tuple[int, ...], dtype: str) -> str:
    return f"{dtype} {'x'.join(map(str, shape)) or 'scalar'}"


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
    if require_change and not any(e.transpose for e in entries) and not from_provenance:
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
        if transposed and not is_float_weight(dtype, shape):
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

    for k, (shape, dtype) in flat.items():
        drop = _first(selection.drop, k, used)
        layer = _first(selection.layers, k, used)
        excl = _first(selection.exclude, k, used)
        if drop:
            decisions[k] = None, Because.PATTERN, str(drop)
            continue
        if not is_float_weight(dtype, shape):
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


class Note(str):
    """A message for `-v` only: a preset covers a family, and most of its rules miss any one
    model, so its skipped rules are no warning."""


def _skipped_rules(rules: list[str], source: str) -> list[str]:
    """A preset's rules that match nothing here (a preset covers more than one model)."""
    if not rules:
        return []
    if len(rules) == 1:
        return [Note(f"{rules[0]} matches no key of '{source}'; skipped.")]
    return [Note(f"{len(rules)} preset rules match no key of '{source}' and were skipped: "
                 + ", ".join(rules) + ".")]


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


def _units(flat: dict[str, tuple[tuple[int, ...], str]], decisions: dict[str, Decision],
           names: dict[str, str], selection: Selection, provenance: Provenance | None,
           source: str, errors: list[str], warnings: list[str],
           target: Layout = Layout.LINEAR) -> list[Entry]:
    """The destination tensors before renames, in source order: one per kept key, except
    where a stack rule (or provenance) makes one of several members, or several of one."""
    kept = [k for k in flat if decisions[k][0] is not None]
    made: dict[str, list[Entry]] = {}  # the first source key of a group -> what it makes
    taken: set[str] = set()

    def one(k: str, name: str, index: int | None = None) -> Entry:
        shape, dtype = flat[k]
        transpose, because, evidence = decisions[k]
        out = shape if index is None else shape[1:]
        return Entry(name, swapped(out) if transpose else out, dtype,
                     (Piece(k, shape, bool(transpose), index),), because, evidence)

    def stack(members: list[str], name: str, why: str) -> None:
        shapes = {flat[m] for m in members}
        flips = {bool(decisions[m][0]) for m in members}
        if len(shapes) > 1 or len(flips) > 1:
            errors.append(f"{why} would stack '{members[0]}' with members of another shape, "
                          "dtype or decision" + (" (some transposed, some not)"
                                                 if len(flips) > 1 else ""))
            return
        (shape, dtype), = shapes
        first = one(members[0], name)
        pieces = tuple(Piece(m, shape, bool(decisions[m][0])) for m in members)
        made[members[0]] = [Entry(name, (len(members), *first.shape), dtype, pieces,
                                  first.because, f"{first.evidence}; stacked by {why}")]
        taken.update(members)

    def unstack(k: str, names_of: list[str], why: str) -> None:
        if len(flat[k][0]) < 2 or flat[k][0][0] != len(names_of):
            errors.append(f"{why} would unstack '{k}', which is {_describe(*flat[k])}, not a "
                          f"stack of {len(names_of)}")
            return
        made[k] = [one(k, n, i) for i, n in enumerate(names_of)]
        taken.add(k)

    if provenance is not None:  # the reverse of a stack is an unstack, and back
        groups: dict[str, list[tuple[int, str]]] = {}
        for k in kept:
            pieces = provenance.pieces.get(k)
            if not pieces or any(p[2] is not None for p in pieces):
                continue  # a split or a merge: see _reverse_splits
            if len(pieces) > 1:
                unstack(k, [p[0] for p in pieces], "provenance")
            elif pieces[0][1] is not None:
                groups.setdefault(pieces[0][0], []).append((pieces[0][1], k))
        for original, members in groups.items():
            order = [k for _, k in sorted(members)]
            stack(order, original, "provenance")
    for rule in selection.stacks:
        forward: dict[tuple[tuple[str, str], ...], dict[int, str]] = {}
        backward = []
        for k in kept:
            if k in taken:
                continue
            hit = rule.member(k)
            if hit is not None:
                forward.setdefault(hit[0], {})[hit[1]] = k
            elif rule.stack(k) is not None:
                backward.append(k)
        if not forward and not backward:
            if rule.shipped:
                warnings.extend(_skipped_rules([str(rule)], source))
            else:
                errors.append(f"{rule} matches no key of '{source}' (neither its members nor "
                              "its stack)")
            continue
        for values, members in forward.items():
            missing = [e for e in range(max(members) + 1) if e not in members]
            if missing:
                errors.append(f"{rule}: the stack '{rule.stack_name(values)}' lacks member "
                              f"'{rule.member_name(values, missing[0])}' (members run 0 to "
                              f"{max(members)}, all present)")
                continue
            stack([members[e] for e in range(len(members))], rule.stack_name(values), str(rule))
        for k in backward:
            values = rule.stack(k)
            assert values is not None
            n = flat[k][0][0] if flat[k][0] else 0
            unstack(k, [rule.member_name(values, e) for e in range(n)], str(rule))
    _split_units(flat, decisions, kept, target, selection, provenance, source, errors,
                 warnings, made, taken)
    units: list[Entry] = []
    for k in kept:
        if k in made:
            units.extend(made[k])
        elif k not in taken:
            units.append(one(k, names.get(k, k)))
    return units


def _held(decision: Decision, target: Layout) -> Layout | None:
    """The layout a weight is stored in, from its decision (None: nothing says)."""
    transpose, because, _ = decision
    if transpose:
        return target.other
    if because in (Because.BIAS_EVIDENCE, Because.REFERENCE_MODEL, Because.PROVENANCE):
        return target
    return None


def _ranges(sizes: Sequence[int], k: int, heads: int) -> list[tuple[int, int]]:
    """Where part K lies along the fused output dim: one range, or one per group of heads."""
    if not heads:
        start = sum(sizes[:k])
        return [(start, start + sizes[k])]
    group = sum(sizes) // heads
    offset = sum(sizes[:k]) // heads
    return [(g * group + offset, g * group + offset + sizes[k] // heads) for g in range(heads)]


def _split_units(flat: dict[str, tuple[tuple[int, ...], str]],
                 decisions: dict[str, Decision], kept: list[str], target: Layout,
                 selection: Selection, provenance: Provenance | None, source: str,
                 errors: list[str], warnings: list[str], made: dict[str, list[Entry]],
                 taken: set[str]) -> None:
    """Split rules: a fused tensor into its parts (and its bias into theirs), or the parts
    back into one; the reverse of either from provenance."""
    shapes = {k: s for k, (s, _) in flat.items()}

    def axis_of(k: str, why: str) -> int | None:
        if len(flat[k][0]) == 1:
            return -1  # a bias: its only dim
        held = _held(decisions[k], target)
        if held is None:
            errors.append(f"{why}: nothing says which layout '{k}' is stored in, so not along "
                          "which dim to split it; decide it with --layers or --model")
            return None
        return -2 if held is Layout.LINEAR else -1

    def entry(name: str, pieces: list[Piece], dtype: str, k: str, note: str) -> Entry:
        transpose, because, evidence = decisions[k]
        axis = pieces[0].axis
        first = pieces[0].shape
        out = list(first)
        out[axis] = sum(p.rows[1] - p.rows[0] for p in pieces)
        shape = tuple(out)
        return Entry(name, swapped(shape) if transpose else shape, dtype, tuple(pieces), because,
                     f"{evidence}; {note}" if evidence else note)

    def split(k: str, part_names: list[str], sizes: Sequence[int], heads: int, why: str) -> bool:
        shape, dtype = flat[k]
        axis = axis_of(k, why)
        if axis is None:
            return False
        total = shape[axis]
        if DTYPES.get(dtype) is None or DTYPES[dtype].bits % 8:
            errors.append(f"{why}: '{k}' is {dtype}, whose elements are not whole bytes")
            return False
        sizes = list(sizes) or ([total // len(part_names)] * len(part_names)
                                if total % len(part_names) == 0 else [])
        if sum(sizes) != total or (heads and any(n % heads for n in sizes)):
            errors.append(f"{why}: the parts of '{k}' ({total} along its output dim) "
                          + ("cannot be equal" if not sizes else
                             f"have sizes {sizes}, which " + ("do not add up to it"
                                                            if sum(sizes) != total else
                                                            f"{heads} heads do not divide")))
            return False
        t = bool(decisions[k][0])
        made[k] = [entry(n, [Piece(k, shape, t, None, r, axis) for r in _ranges(sizes, i, heads)],
                         dtype, k, f"part {i + 1} of {len(part_names)} by {why}")
                   for i, n in enumerate(part_names)]
        taken.add(k)
        return True

    def merge(parts: list[str], name: str, heads: int, why: str) -> bool:
        dtypes = {flat[p][1] for p in parts}
        flips = {bool(decisions[p][0]) for p in parts}
        axes = {axis_of(p, why) for p in parts}
        if len(dtypes) > 1 or len(flips) > 1 or len(axes) != 1 or None in axes:
            errors.append(f"{why}: the parts of '{name}' differ in dtype, layout or decision")
            return False
        (axis,) = axes
        sizes = [flat[p][0][axis] for p in parts]
        if heads and any(n % heads for n in sizes):
            errors.append(f"{why}: {heads} heads do not divide the parts of '{name}' ({sizes})")
            return False
        groups = heads or 1
        pieces = [Piece(p, flat[p][0], bool(decisions[p][0]), None,
                        (g * n // groups, (g + 1) * n // groups), axis)
                  for g in range(groups) for p, n in zip(parts, sizes)]
        made[parts[0]] = [entry(name, pieces, flat[parts[0]][1], parts[0], f"merged by {why}")]
        taken.update(parts)
        return True

    for rule in selection.splits:
        fused = [k for k in kept if k not in taken and rule.fused_values(k) is not None]
        groups: dict[tuple[tuple[str, str], ...], dict[int, str]] = {}
        for k in kept:
            hit = rule.part_values(k) if k not in taken else None
            if hit is not None:
                groups.setdefault(hit[0], {})[hit[1]] = k
        if not fused and not groups:
            if rule.shipped:
                warnings.extend(_skipped_rules([str(rule)], source))
            else:
                errors.append(f"{rule} matches no key of '{source}' (neither the fused tensor "
                              "nor its parts)")
            continue
        for k in fused:
            values = rule.fused_values(k)
            assert values is not None
            names = [rule.part_name(values, i) for i in range(len(rule.parts))]
            if split(k, names, rule.sizes, rule.heads, str(rule)):
                bias = bias_key(k, shapes)
                part_biases = [next(iter(siblings(n, Role.BIAS)), None) for n in names]
                if bias is not None and bias in kept and bias not in taken:
                    if None in part_biases:
                        errors.append(f"{rule}: '{k}' has the bias '{bias}', and its parts "
                                      "have no bias names to split it into")
                    else:
                        split(bias, [b for b in part_biases if b], rule.sizes, rule.heads,
                              str(rule))
        for values, parts in groups.items():
            if len(parts) != len(rule.parts):
                lack = next(i for i in range(len(rule.parts)) if i not in parts)
                errors.append(f"{rule}: '{rule.part_name(values, lack)}' is missing, so its "
                              f"parts cannot be merged into '{rule.fused_name(values)}'")
                continue
            order = [parts[i] for i in range(len(rule.parts))]
            if merge(order, rule.fused_name(values), rule.heads, str(rule)):
                biases = [bias_key(p, shapes) for p in order]
                fused_bias = next(iter(siblings(rule.fused_name(values), Role.BIAS)), None)
                if all(b is not None and b in kept and b not in taken for b in biases) and \
                        fused_bias is not None:
                    merge([b for b in biases if b], fused_bias, rule.heads, str(rule))
    if provenance is not None:
        _reverse_splits(flat, decisions, kept, provenance, made, taken, entry)


def _reverse_splits(flat: dict[str, tuple[tuple[int, ...], str]],
                    decisions: dict[str, Decision], kept: list[str], provenance: Provenance,
                    made: dict[str, list[Entry]], taken: set[str], entry: Any) -> None:
    """From provenance: the parts a split wrote merge back, a merged tensor splits back (the
    output dim of a tensor that was transposed is the other one now)."""
    parts_of: dict[str, list[tuple[int, str, int, int]]] = {}  # fused -> (start, part, a, b)
    for k in kept:
        pieces = provenance.pieces.get(k)
        if not pieces or pieces[0][2] is None:
            continue
        t = bool(decisions[k][0])
        sources = {p[0] for p in pieces}
        if len(sources) == 1:  # k is a part of one fused tensor: merge back
            cum = 0
            for src_key, _, rows, _axis in pieces:
                n = rows[1] - rows[0]
                parts_of.setdefault(src_key, []).append((rows[0], k, cum, cum + n))
                cum += n
        else:  # k was merged from parts: split back
            axis = pieces[0][3]
            here = axis if not t or len(flat[k][0]) < 2 else (-1 if axis == -2 else -2)
            cum = 0
            per_part: dict[str, list[Piece]] = {}
            for src_key, _, rows, _axis in pieces:
                n = rows[1] - rows[0]
                per_part.setdefault(src_key, []).append(
                    Piece(k, flat[k][0], t, None, (cum, cum + n), here))
                cum += n
            made[k] = [entry(name, ps, flat[k][1], k, "provenance") for name, ps in
                       per_part.items()]
            taken.add(k)
    for fused, spans in parts_of.items():
        spans.sort()
        first = spans[0][1]
        t = bool(decisions[first][0])
        axis = provenance.pieces[first][0][3]
        pieces = []
        for _, part, a, b in spans:
            here = axis if not t or len(flat[part][0]) < 2 else (-1 if axis == -2 else -2)
            pieces.append(Piece(part, flat[part][0], t, None, (a, b), here))
        made[first] = [entry(fused, pieces, flat[first][1], first, "provenance")]
        taken.update(p for _, p, _, _ in spans)


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
    for unit in _units(flat, decisions, names, selection, provenance, source, errors,
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
