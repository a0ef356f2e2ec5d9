"""Pairing: which SRC key each DST key is checked against, and whether it was transposed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..dtypes import is_float_weight, is_transposable, swapped
from ..errors import UsageError
from ..layout import Layout

if TYPE_CHECKING:  # planning and selection load on first use, not with `import convert`
    from ..checkpoint import Checkpoint
    from ..plan import Plan
    from ..selection import Selection


@dataclass(frozen=True)
class Pair:
    """A SRC key and its DST counterpart; `transposed` pairs are linear layers."""

    source: str
    target: str
    transposed: bool
    source_index: int | None = None  # a member of a SRC stack (DST unstacked it)
    target_index: int | None = None  # a member of a DST stack (DST stacked SRC's members)
    # a split's part or a merge: DST is these (source, index, rows, axis, member) pieces of SRC,
    # joined along the output dim (per member of a DST stack), then transposed where
    # `transposed`
    parts: tuple[tuple[Any, ...], ...] = ()

    @property
    def name(self) -> str:
        return self.target + ("" if self.target_index is None else f"[{self.target_index}]")



def pairs_from_plan(plan: Plan) -> list[Pair]:
    """One pair per piece: a stack's members pair with its rows, an unstacked member with
    its row of the source stack."""
    pairs = []
    for e in plan.entries:
        if any(p.rows is not None for p in e.pieces):
            pairs.append(Pair(e.source, e.key, e.transpose,
                              parts=tuple(p.record for p in e.pieces)))
            continue
        stacked = len(e.pieces) > 1
        for j, p in enumerate(e.pieces):
            pairs.append(Pair(p.source, e.key, p.transpose, p.index, j if stacked else None))
    return pairs


def pairs_from_provenance(prov: Any) -> list[Pair]:
    pairs = []
    for d, (s, t) in prov.keys.items():
        pieces = prov.pieces.get(d)
        if not pieces:
            pairs.append(Pair(s, d, t))
        elif any(p[2] is not None for p in pieces):  # a part of a split, or a merge
            pairs.append(Pair(pieces[0][0], d, t, parts=tuple(pieces)))
        elif len(pieces) > 1:
            pairs += [Pair(p[0], d, t, None, j) for j, p in enumerate(pieces)]
        else:
            pairs.append(Pair(pieces[0][0], d, t, pieces[0][1]))
    return pairs


def pair_keys(src: Checkpoint, dst: Checkpoint, selection: Selection | None = None,
              reference: Any = None) -> tuple[list[Pair], set[str], Layout | None, str]:
    """Pairs of SRC and DST keys: from DST's provenance, else the selection, else by name.

    Returns the pairs, SRC keys deliberately dropped, DST's layout if known, and how the pairs
    were found. A square weight that neither provenance nor options decide is exit 2.
    """
    from ..plan import build_plan
    from ..selection import Selection

    selection = selection or Selection()
    prov = dst.provenance
    if prov is not None and not selection.chooses_layers and _describes(prov, src, dst):
        return pairs_from_provenance(prov), set(prov.dropped), prov.layout, "DST's provenance"
    if selection.chooses_layers or selection.renames or selection.drop:
        best: Plan | None = None
        best_score = -1
        for layout in (Layout.LINEAR, Layout.PARAM):
            try:
                plan = build_plan(src.specs, layout, selection, reference=reference,
                                  tied=src.tied, source=str(src.path))
            except UsageError:
                continue
            score = sum(1 for a in plan.written if a.target in dst.specs
                        and dst.specs[a.target].shape == a.target_shape)
            if score > best_score:
                best, best_score = plan, score
        if best is None:  # let the planner say why
            build_plan(src.specs, Layout.LINEAR, selection, reference=reference,
                       tied=src.tied, source=str(src.path))
            raise AssertionError("unreachable")
        if best_score == 0 and src.specs and dst.specs:
            raise UsageError(_no_pairs(src, dst, best))
        return pairs_from_plan(best), set(best.dropped), best.layout, "the selection options"
    from ..companions import CompanionError, Follows, classify, companion_map

    pairs = []
    ambiguous = []
    comps = companion_map({k: s.shape for k, s in src.specs.items()}, selection.companions)
    with_companions = {w for w, _, _ in comps.values()}
    moved: dict[str, bool] = {}
    for k, s in src.specs.items():
        d = dst.specs.get(k)
        if d is None or k in comps:
            continue
        weight = is_float_weight(s.dtype, s.shape) or (
            is_transposable(s.dtype, s.shape) and k in with_companions)
        if weight and s.shape == d.shape and s.shape[-1] == s.shape[-2]:
            ambiguous.append(k)
        moved[k] = weight and s.shape[-1] != s.shape[-2] and d.shape == swapped(s.shape)
        pairs.append(Pair(k, k, moved[k]))
    for k, (w, role, block) in comps.items():  # a companion moves as its weight did
        if k in dst.specs:
            try:
                follows = classify(k, w, role, src.specs[k].shape, src.specs[w].shape,
                                   block).follows is Follows.TRANSPOSED
            except CompanionError:
                follows = True  # misshapen: the companion check says how
            pairs.append(Pair(k, k, moved.get(w, False) and follows))
    if not pairs and src.specs and dst.specs:
        raise UsageError(_no_pairs(src, dst))
    if ambiguous:
        shown = ", ".join(f"'{k}'" for k in ambiguous)
        raise UsageError(f"'{dst.path}' has no linconvert provenance and square weights {shown} "
                         "could be transposed or not; say which with --layers (converted) and "
                         "--exclude (unchanged), or pass the --rules/--preset used to convert.")
    return pairs, set(), None, "names and transposed shapes"


def _no_pairs(src: Checkpoint, dst: Checkpoint, plan: Plan | None = None) -> str:
    """Why nothing can be compared: no SRC key (after the selection's renames) is a DST key;
    with the --rename that would pair them, where one does."""
    from ..selection import rename_options, suggest_renames

    names = [e.key for e in plan.entries] if plan is not None else list(src.specs)
    theirs = list(dst.specs)
    rules = suggest_renames(names, theirs)
    hint = (f"{rename_options(rules)} would pair them" if rules else
            "pass --rename FROM TO (or the --rules/--preset used to convert) so they pair")
    return (f"no key of '{src.path}' pairs with a key of '{dst.path}' (e.g. '{names[0]}' and "
            f"'{theirs[0]}'), so nothing can be compared; {hint}.")


def _describes(prov: Any, src: Checkpoint, dst: Checkpoint) -> bool:
    """Whether DST's provenance is about SRC: every key it names is in SRC with the shape it
    implies (a round trip's file describes the middle file, not the first)."""
    for p in pairs_from_provenance(prov):
        a, b = src.specs.get(p.source), dst.specs.get(p.target)
        if a is None or b is None or any(q[0] not in src.specs for q in p.parts):
            return False
        if p.parts:
            continue  # checked piece by piece by the verifier
        have = a.shape if p.source_index is None else a.shape[1:]
        want = b.shape if p.target_index is None else b.shape[1:]
        if (swapped(have) if p.transposed and len(have) >= 2 else have) != want:
            return False
    return True
