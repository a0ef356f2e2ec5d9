"""Stack and split rules in the plan: which destination tensors are made of several source
tensors (a stack of experts, a merge of parts) or of part of one (an unstacked member, a part
of a fused tensor), and their reverse from provenance. No tensors here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from ..companions import companion_map
from ..dtypes import DTYPES, swapped
from ..layout import Layout
from ..provenance import Provenance
from ..selection import Role, Selection, bias_key, siblings
from .entries import Because, Entry, Piece, by_member
from .messages import describe as _describe
from .messages import skipped_rules as _skipped_rules

Decision = tuple[bool | None, Because, str]  # transpose? (None: dropped), why, evidence


def units(flat: dict[str, tuple[tuple[int, ...], str]], decisions: dict[str, Decision],
           names: dict[str, str], selection: Selection, provenance: Provenance | None,
           source: str, errors: list[str], warnings: list[str],
           target: Layout = Layout.LINEAR) -> list[Entry]:
    """The destination tensors before renames, in source order: one per kept key, except
    where a stack rule (or provenance) makes one of several members, or several of one."""
    kept = [k for k in flat if decisions[k][0] is not None]
    made: dict[str, list[Entry]] = {}  # the first source key of a group -> what it makes
    taken: set[str] = set()
    pending: list[Any] = []  # stack rules that match no source key
    of = companion_map({k: s for k, (s, _) in flat.items()}, selection.companions)
    comps = {**{w: ("has", c) for c, (w, _, _) in of.items()},
             **{c: ("of", w) for c, (w, _, _) in of.items()}}  # both ways, looked up by key

    def one(k: str, name: str, index: int | None = None) -> Entry:
        shape, dtype = flat[k]
        transpose, because, evidence = decisions[k]
        out = shape if index is None else shape[1:]
        return Entry(name, swapped(out) if transpose else out, dtype,
                     (Piece(k, shape, bool(transpose), index),), because, evidence)

    def stack(members: list[str], name: str, why: str) -> None:
        if _has_companions(members, comps, why, "stack", errors):
            return
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
        if _has_companions([k], comps, why, "unstack", errors):
            return
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
            pending.append(rule)  # it may unstack what a split makes: see below
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
                 warnings, made, taken, comps)
    for rule in pending:  # the parts a split made of a stacked fused tensor, unstacked
        if not _unstack_parts(rule, made):
            _unmatched(rule, "its members nor its stack", source, errors, warnings)
    units: list[Entry] = []
    for k in kept:
        if k in made:
            units.extend(made[k])
        elif k not in taken:
            units.append(one(k, names.get(k, k)))
    return units


def _unmatched(rule: Any, what: str, source: str, errors: list[str],
               warnings: list[str]) -> None:
    """A rule that matches no key: the user's is exit 2; a preset's is skipped (said under -v)."""
    if rule.shipped:
        warnings.extend(_skipped_rules([str(rule)], source))
    else:
        errors.append(f"{rule} matches no key of '{source}' (neither {what})")


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
                 taken: set[str], comps: Mapping[str, tuple[str, str]]) -> None:
    """Split rules: a fused tensor into its parts (and its bias into theirs), or the parts
    back into one; the reverse of either from provenance."""
    shapes = {k: s for k, (s, _) in flat.items()}

    def axis_of(k: str, why: str, said: Layout | None = None) -> int | None:
        if len(flat[k][0]) == 1:
            return -1  # a bias: its only dim
        held = _held(decisions[k], target)
        if held is not None and said is not None and held is not said:
            errors.append(f"{why} says its tensors are in the {said} layout, but '{k}' is in "
                          f"the {held} layout ({decisions[k][1].words(decisions[k][2], False)})")
            return None
        held = held or said
        if held is None:
            errors.append(f"{why}: nothing says which layout '{k}' is stored in, so not along "
                          "which dim to split it; decide it with --layers or --model, or give "
                          "the rule a layout")
            return None
        return -2 if held is Layout.LINEAR else -1

    def entry(name: str, pieces: list[Piece], dtype: str, k: str, note: str) -> Entry:
        transpose, because, evidence = decisions[k]
        axis = pieces[0].axis
        first = pieces[0].shape if pieces[0].index is None else pieces[0].shape[1:]
        out = list(first)
        groups = by_member(pieces)
        out[axis] = sum(p.rows[1] - p.rows[0] for p in groups[0])
        shape = tuple(out) if pieces[0].member is None else (len(groups), *out)
        return Entry(name, swapped(shape) if transpose else shape, dtype, tuple(pieces), because,
                     f"{evidence}; {note}" if evidence else note)

    def split(k: str, part_names: list[str], sizes: Sequence[int], heads: int, why: str,
              said: Layout | None = None) -> bool:
        shape, dtype = flat[k]
        axis = axis_of(k, why, said)
        if axis is None or _has_companions([k], comps, why, "split", errors):
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

    def merge(parts: list[str], name: str, heads: int, why: str,
              said: Layout | None = None) -> bool:
        dtypes = {flat[p][1] for p in parts}
        flips = {bool(decisions[p][0]) for p in parts}
        axes = {axis_of(p, why, said) for p in parts}
        if len(dtypes) > 1 or len(flips) > 1 or len(axes) != 1 or None in axes:
            errors.append(f"{why}: the parts of '{name}' differ in dtype, layout or decision")
            return False
        (axis,) = axes
        if not _joinable([flat[p][0] for p in parts], axis, name, why, errors) or \
                _has_companions(parts, comps, why, "merge", errors):
            return False
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

    def merge_stacks(parts: list[tuple[str, Entry]], name: str, heads: int, why: str,
                     said: Layout | None = None) -> None:
        """Stacks a stack rule made (each from per-expert tensors) merged into one stacked
        fused tensor, member by member: the per-expert parts joined along their output dim."""
        first_key, first = parts[0]
        sizes = {len(e.pieces) for _, e in parts}
        flips = {e.transpose for _, e in parts}
        axes = {axis_of(e.pieces[0].source, why, said) for _, e in parts}
        if len(sizes) > 1 or len(flips) > 1 or len(axes) != 1 or None in axes or \
                len({e.dtype for _, e in parts}) > 1:
            errors.append(f"{why}: the stacks merged into '{name}' differ in members, dtype, "
                          "layout or decision")
            return
        (axis,) = axes
        if not all(_joinable([e.pieces[m].shape for _, e in parts], axis, name, why, errors)
                   for m in range(len(first.pieces))):
            return
        groups = heads or 1
        pieces = []
        for m in range(len(first.pieces)):
            for g in range(groups):
                for _, e in parts:
                    p = e.pieces[m]
                    n = p.shape[axis]
                    if n % groups:
                        errors.append(f"{why}: {heads} heads do not divide '{p.source}' ({n})")
                        return
                    pieces.append(Piece(p.source, p.shape, p.transpose, None,
                                        (g * n // groups, (g + 1) * n // groups), axis, m))
        merged = entry(name, pieces, first.dtype, first.pieces[0].source, f"merged by {why}")
        made[first_key] = [dataclasses.replace(merged, evidence=f"{first.evidence}; "
                                               f"merged by {why}")]
        for k, _ in parts[1:]:
            made[k] = []

    for rule in selection.splits:
        if isinstance(rule.heads, str):
            errors.append(f"{rule}: heads '{rule.heads}' is read from a config.json beside SRC, "
                          "and this plan was made without one")
            continue
        fused = [k for k in kept if k not in taken and rule.fused_values(k) is not None]
        groups: dict[tuple[tuple[str, str], ...], dict[int, str]] = {}
        for k in kept:
            hit = rule.part_values(k) if k not in taken else None
            if hit is not None:
                groups.setdefault(hit[0], {})[hit[1]] = k
        stacked: dict[tuple[tuple[str, str], ...], dict[int, tuple[str, Entry]]] = {}
        for k, entries in made.items():  # stacks a stack rule made: merged per member
            for e in entries:
                hit = rule.part_values(e.key) if len(e.pieces) > 1 and \
                    e.pieces[0].rows is None else None
                if hit is not None:
                    stacked.setdefault(hit[0], {})[hit[1]] = (k, e)
        for values, found in stacked.items():
            in_order = _all_parts(rule, values, found, errors)
            if in_order:
                merge_stacks(in_order, rule.fused_name(values), rule.heads, str(rule),
                             rule.layout)
        if not fused and not groups and not stacked:
            _unmatched(rule, "the fused tensor nor its parts", source, errors, warnings)
            continue
        for k in fused:
            values = rule.fused_values(k)
            assert values is not None
            names = [rule.part_name(values, i) for i in range(len(rule.parts))]
            if split(k, names, rule.sizes, rule.heads, str(rule), rule.layout):
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
            order = _all_parts(rule, values, parts, errors)
            if order and merge(order, rule.fused_name(values), rule.heads, str(rule), rule.layout):
                biases = [bias_key(p, shapes) for p in order]
                fused_bias = next(iter(siblings(rule.fused_name(values), Role.BIAS)), None)
                if all(b is not None and b in kept and b not in taken for b in biases) and \
                        fused_bias is not None:
                    merge([b for b in biases if b], fused_bias, rule.heads, str(rule))
    if provenance is not None:
        _reverse_splits(flat, decisions, kept, provenance, made, taken, entry)


def _has_companions(keys: Sequence[str], comps: Mapping[str, tuple[str, str]], why: str,
                    verb: str, errors: list[str]) -> bool:
    """Whether a rule would VERB a weight with companions (a scale grid, a mask) or a companion
    itself (COMPS: key -> ("has", a companion) or ("of", its weight)): refused, since a scale
    left whole beside a split weight fits none of its parts."""
    for k in keys:
        if k in comps:
            how, other = comps[k]
            errors.append(f"{why} would {verb} '{k}', " + (
                f"whose companion '{other}' it cannot {verb} with it" if how == "has" else
                f"the companion of '{other}'") + "; convert a dequantized checkpoint, or "
                "leave the layer out of the rule")
            return True
    return False


def _joinable(shapes: Sequence[tuple[int, ...]], axis: int, name: str, why: str,
              errors: list[str]) -> bool:
    """Whether tensors of SHAPES can be joined along AXIS: equal in every other dim."""
    rest = {tuple(d for i, d in enumerate(s) if i != len(s) + axis) for s in shapes}
    if len(rest) > 1 or len({len(s) for s in shapes}) > 1:
        errors.append(f"{why}: the parts of '{name}' differ beyond the dim they are joined "
                      f"along ({', '.join('x'.join(map(str, s)) for s in shapes)})")
        return False
    return True


def _all_parts(rule: Any, values: tuple[tuple[str, str], ...], found: dict[int, Any],
               errors: list[str]) -> list[Any]:
    """FOUND's parts in the rule's order, or [] (and the error) where one is missing."""
    lack = next((i for i in range(len(rule.parts)) if i not in found), None)
    if lack is not None:
        errors.append(f"{rule}: '{rule.part_name(values, lack)}' is missing, so its parts "
                      f"cannot be merged into '{rule.fused_name(values)}'")
        return []
    return [found[i] for i in range(len(rule.parts))]


def _unstack_parts(rule: Any, made: dict[str, list[Entry]]) -> bool:
    """The parts a split made of a stacked fused tensor, unstacked by RULE into one tensor per
    member (transformers 5's gate_up_proj [E, 2I, H] -> per-expert gate_proj and up_proj)."""
    hit = False
    for k, entries in made.items():
        out = []
        for e in entries:
            values = rule.stack(e.key)
            p0 = e.pieces[0]
            if values is None or p0.rows is None or p0.index is not None or \
                    p0.member is not None or len(p0.shape) < 3:
                out.append(e)
                continue
            hit = True
            for m in range(p0.shape[0]):
                pieces = tuple(dataclasses.replace(p, index=m) for p in e.pieces)
                out.append(Entry(rule.member_name(values, m), e.shape[1:], e.dtype, pieces,
                                 e.because, f"{e.evidence}; unstacked by {rule}"))
        made[k] = out
    return hit


def _reverse_splits(flat: dict[str, tuple[tuple[int, ...], str]],
                    decisions: dict[str, Decision], kept: list[str], provenance: Provenance,
                    made: dict[str, list[Entry]], taken: set[str], entry: Any) -> None:
    """From provenance: the parts a split wrote merge back, a merged tensor splits back (the
    output dim of a tensor that was transposed is the other one now)."""
    # fused -> ((member, start), part, a, b, member): where each part's rows came from
    parts_of: dict[str, list[tuple[tuple[int, int], str, int, int, int | None]]] = {}
    for k in kept:
        pieces = provenance.pieces.get(k)
        if not pieces or pieces[0][2] is None:
            continue
        t = bool(decisions[k][0])
        sources = {p[0] for p in pieces}
        if len(sources) == 1:  # k is a part of one fused tensor (or of one member): merge back
            cum = 0
            for src_key, index, rows, _axis, _ in pieces:
                n = rows[1] - rows[0]
                parts_of.setdefault(src_key, []).append(
                    ((-1 if index is None else index, rows[0]), k, cum, cum + n, index))
                cum += n
        else:  # k was merged from parts (per member, where it is a stack): split back
            axis = pieces[0][3]
            member_dims = len(flat[k][0]) - (pieces[0][4] is not None)
            here = axis if not t or member_dims < 2 else (-1 if axis == -2 else -2)
            cum: dict[int | None, int] = {}
            per_part: dict[str, list[Piece]] = {}
            for src_key, _, rows, _axis, member in pieces:
                n = rows[1] - rows[0]
                at = cum.get(member, 0)
                per_part.setdefault(src_key, []).append(
                    Piece(k, flat[k][0], t, member, (at, at + n), here))
                cum[member] = at + n
            made[k] = [entry(name, ps, flat[k][1], k, "provenance") for name, ps in
                       per_part.items()]
            taken.add(k)
    for fused, spans in parts_of.items():
        spans.sort()
        first = spans[0][1]
        t = bool(decisions[first][0])
        axis = provenance.pieces[first][0][3]
        pieces = []
        for _, part, a, b, member in spans:
            here = axis if not t or len(flat[part][0]) < 2 else (-1 if axis == -2 else -2)
            pieces.append(Piece(part, flat[part][0], t, None, (a, b), here, member))
        made[first] = [entry(fused, pieces, flat[first][1], first, "provenance")]
        taken.update(p for _, p, _, _, _ in spans)
