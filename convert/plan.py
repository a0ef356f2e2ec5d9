"""The plan: one frozen action per source key, built from names, shapes and dtypes alone.

`build_plan` is the whole decision of a conversion; `--dry-run` prints exactly what it returns
and the executor consumes exactly that. No tensors here, and no torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .dtypes import DTYPES, is_float_matrix
from .errors import CorruptInputError, UsageError
from .layout import Layout
from .provenance import Provenance
from .selection import Pattern, ReferenceModel, Selection, bias_evidence

TRANSPOSE, KEEP, DROP = "transpose", "keep", "drop"


@dataclass(frozen=True)
class KeyAction:
    """What happens to one source key."""

    source: str
    target: str  # "" when dropped
    shape: tuple[int, ...]
    dtype: str
    transpose: bool
    reason: str
    dropped: bool = False

    @property
    def action(self) -> str:
        return DROP if self.dropped else TRANSPOSE if self.transpose else KEEP

    @property
    def target_shape(self) -> tuple[int, ...]:
        return self.shape[::-1] if self.transpose else self.shape

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target or None, "action": self.action,
                "shape": list(self.shape), "target_shape": list(self.target_shape),
                "dtype": self.dtype, "reason": self.reason}


@dataclass(frozen=True)
class Plan:
    """Every source key's action, in source order, and what was said about them."""

    source: str
    layout: Layout
    actions: tuple[KeyAction, ...]
    options_hash: str
    tied: tuple[tuple[str, ...], ...] = ()
    warnings: tuple[str, ...] = ()
    from_provenance: bool = False
    selection: dict[str, Any] = field(default_factory=dict)
    model_parameters: tuple[str, ...] = ()  # the reference model's parameters, in order

    @property
    def written(self) -> tuple[KeyAction, ...]:
        """Actions that produce an output key, in output order."""
        return tuple(a for a in self.actions if not a.dropped)

    @property
    def transposed(self) -> tuple[KeyAction, ...]:
        return tuple(a for a in self.actions if a.transpose)

    @property
    def dropped(self) -> tuple[str, ...]:
        return tuple(a.source for a in self.actions if a.dropped)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "layout": self.layout.value,
            "direction": self.layout.command,
            "options_hash": self.options_hash,
            "from_provenance": self.from_provenance,
            "selection": self.selection,
            "counts": {TRANSPOSE: len(self.transposed), DROP: len(self.dropped),
                       KEEP: len(self.actions) - len(self.transposed) - len(self.dropped)},
            "actions": [a.to_dict() for a in self.actions],
            "tied": [list(g) for g in self.tied],
            "warnings": list(self.warnings),
        }


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
               tied: Sequence[Sequence[str]] = (), source: str = "checkpoint") -> Plan:
    """Decide, for every key, whether it is transposed, kept, renamed or dropped.

    Args:
        specs: key -> TensorSpec (or a `(shape, dtype)` pair), in source order.
        target: the layout to write.
        selection: the user's patterns, renames and drops.
        reference: facts about `--model`, if given.
        provenance: the source's linconvert record, if any.
        tied: groups of keys that share one tensor.
        source: the source's name, for messages.

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
            "to go back.")
    if provenance is not None and not selection.chooses_layers:
        decisions, reasons, warnings = _decide_from_provenance(flat, provenance, selection,
                                                               source)
        names = {k: provenance.keys[k][0] for k in flat}
        from_provenance = True
    else:
        decisions, reasons, warnings = _decide(flat, target, selection, reference, source)
        names = {}
        from_provenance = False

    actions, more_warnings = _finish(flat, decisions, reasons, names, selection, reference,
                                     tied, source)
    warnings += more_warnings
    if not any(a.transpose for a in actions) and not from_provenance:
        raise UsageError(_nothing_to_transpose(flat, target, reasons, source))
    return Plan(source, target, tuple(actions), selection.options_hash(target),
                tuple(tuple(g) for g in tied if len(g) > 1), tuple(warnings), from_provenance,
                selection.to_dict(), reference.parameters if reference else ())


def _decide_from_provenance(flat: dict[str, tuple[tuple[int, ...], str]], prov: Provenance,
                            selection: Selection, source: str) -> tuple[dict[str, bool | None],
                                                                        dict[str, str],
                                                                        list[str]]:
    decisions: dict[str, bool | None] = {}
    reasons: dict[str, str] = {}
    used: set[Pattern] = set()
    for k, (shape, dtype) in flat.items():
        drop = _first(selection.drop, k, used)
        if drop:
            decisions[k], reasons[k] = None, f"dropped by {drop}"
            continue
        entry = prov.keys.get(k)
        if entry is None:
            raise CorruptInputError(f"'{source}' holds '{k}', which its linconvert provenance "
                                    "does not list: the file was changed after it was written; "
                                    "pass --layers/--exclude to plan it without provenance.")
        was, transposed = entry
        if transposed and not is_float_matrix(dtype, shape):
            raise CorruptInputError(f"'{source}': provenance says '{k}' was transposed but it is "
                                    f"{_describe(shape, dtype)}.")
        decisions[k] = transposed
        reasons[k] = (f"provenance: written from '{was}' "
                      f"{'transposed' if transposed else 'unchanged'}")
    warnings = _unused_patterns(selection.drop, used, source)
    if prov.dropped:
        warnings.append(f"the conversion that wrote '{source}' dropped {_quoted(prov.dropped)}; "
                        "they cannot be restored.")
    return decisions, reasons, warnings


def _first(patterns: Sequence[Pattern], key: str, used: set[Pattern]) -> Pattern | None:
    hit = None
    for p in patterns:
        if p.matches(key):
            used.add(p)
            hit = hit or p
    return hit


def _decide(flat: dict[str, tuple[tuple[int, ...], str]], target: Layout, selection: Selection,
            reference: ReferenceModel | None,
            source: str) -> tuple[dict[str, bool | None], dict[str, str], list[str]]:
    """key -> True (transpose) / False (keep) / None (dropped), with reasons."""
    shapes = {k: s for k, (s, _) in flat.items()}
    decisions: dict[str, bool | None] = {}
    reasons: dict[str, str] = {}
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
            decisions[k], reasons[k] = None, f"dropped by {drop}"
            continue
        if not is_float_matrix(dtype, shape):
            if layer and not excl:
                what = (f"'{k}' is {_describe(shape, dtype)}, not a 2-D float tensor, so it "
                        f"cannot be transposed")
                if layer.shipped:
                    warnings.append(f"{what}; {layer} skipped it.")
                else:
                    errors.append(f"{what}: narrow {layer}")
            kind = "not 2-D" if len(shape) != 2 else (
                "packed or non-float dtype" if dtype in DTYPES else "dtype safetensors lacks")
            decisions[k], reasons[k] = False, f"{kind}: never transposed"
            continue

        square = shape[0] == shape[1]
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
                decisions[k], reasons[k] = transpose, f"reference model: {why}"
                continue
        if excl:
            decisions[k], reasons[k] = False, f"excluded by {excl}"
        elif layer:
            if evidence and evidence[0] is target:
                msg = (f"{layer} selects '{k}' but it is already in the {target} layout "
                       f"({evidence[1]}); transposing it would be a double transpose")
                if layer.shipped:
                    warnings.append(msg + "; skipped.")
                    decisions[k], reasons[k] = False, f"bias evidence: {evidence[1]}"
                    continue
                errors.append(msg + "; remove it from the selection")
            decisions[k], reasons[k] = True, f"selected by {layer}"
        elif evidence:
            layout, why = evidence
            decisions[k] = layout is not target
            reasons[k] = f"bias evidence: {why}" + ("" if decisions[k] else
                                                     f"; already {target}")
        elif square:
            ambiguous.append(k)
            decisions[k], reasons[k] = False, "ambiguous"
        else:
            no_evidence.append(k)
            decisions[k], reasons[k] = False, "no evidence: not a linear weight unless selected"

    warnings += _unused_patterns((*selection.layers, *selection.exclude, *selection.drop), used,
                                 source)
    if errors:
        raise UsageError("; ".join(errors) + ".")
    if ambiguous:
        raise UsageError(
            f"'{source}' has square weights with no evidence of their layout: "
            f"{_quoted(ambiguous, len(ambiguous))}; a square matrix loads silently either way, "
            "so say which are linear weights to transpose with --layers "
            f"(e.g. --layers '{ambiguous[0]}'), which to leave with --exclude, or give the "
            "target model with --model MODULE:FACTORY.")
    if no_evidence:
        warnings.append(f"no evidence that {_quoted(no_evidence)} are linear weights (no bias "
                        "sibling); left as they are; select them with --layers if they are.")
    return decisions, reasons, warnings


def _unused_patterns(patterns: Sequence[Pattern], used: set[Pattern], source: str) -> list[str]:
    """One warning for a preset's rules that matched nothing; UsageError for the user's."""
    unused = [p for p in patterns if p not in used]
    mine = [p for p in unused if not p.shipped]
    if mine:
        raise UsageError("; ".join(f"{p} matches no key of '{source}'" for p in mine) + ".")
    return _skipped_rules([str(p) for p in unused], source)


def _skipped_rules(rules: list[str], source: str) -> list[str]:
    """A preset's rules that match nothing here (a preset covers more than one model)."""
    if not rules:
        return []
    if len(rules) == 1:
        return [f"{rules[0]} matches no key of '{source}'; skipped."]
    return [f"{len(rules)} preset rules match no key of '{source}' and were skipped: "
            + ", ".join(rules) + "."]


def _reference_decision(key: str, shape: tuple[int, ...], target: Layout, selection: Selection,
                        reference: ReferenceModel) -> tuple[bool | None, str] | None:
    """What the reference model says about KEY: (transpose?, why); None if it lacks the key."""
    entry = reference.entries.get(selection.target_key(key))
    if entry is None or len(entry.shape) != 2:
        return None
    flipped = shape[::-1]
    if shape[0] != shape[1]:
        if entry.shape == flipped:
            return True, f"its {entry.owner} wants {'x'.join(map(str, entry.shape))}, the transpose"
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


def _finish(flat: dict[str, tuple[tuple[int, ...], str]], decisions: dict[str, bool | None],
            reasons: dict[str, str], names: dict[str, str], selection: Selection,
            reference: ReferenceModel | None, tied: Sequence[Sequence[str]],
            source: str) -> tuple[list[KeyAction], list[str]]:
    """Apply renames (after NAMES, provenance's original keys), then check collisions, ties
    and the reference model's key set."""
    actions = []
    warnings: list[str] = []
    targets: dict[str, str] = {}
    used: set[int] = set()
    errors = []
    for k, (shape, dtype) in flat.items():
        decision = decisions[k]
        if decision is None:
            actions.append(KeyAction(k, "", shape, dtype, False, reasons[k], dropped=True))
            continue
        t = names.get(k, k)
        for i, r in enumerate(selection.renames):
            t, hit = r.apply(t)
            if hit:
                used.add(i)
        if not t:
            errors.append(f"renames turn '{k}' into an empty key")
        elif t in targets:
            errors.append(f"'{targets[t]}' and '{k}' would both be renamed to '{t}'")
        targets[t] = k
        actions.append(KeyAction(k, t, shape, dtype, bool(decision), reasons[k]))
    skipped = []
    for i, r in enumerate(selection.renames):
        if i not in used:
            if r.shipped:
                skipped.append(str(r))
            else:
                errors.append(f"{r} matches no key of '{source}'")
    warnings += _skipped_rules(skipped, source)
    by_source = {a.source: a for a in actions}
    for group in tied:
        live = [by_source[k] for k in group if k in by_source and not by_source[k].dropped]
        if len({a.transpose for a in live}) > 1:
            which = ", ".join(f"'{a.source}' ({a.action})" for a in live)
            errors.append(f"tied keys {which} share one tensor but would need different "
                          "transposes; select or exclude them together")
    if reference is not None:
        errors += _reference_mismatch(actions, reference)
    if errors:
        raise UsageError("; ".join(errors) + ".")
    return actions, warnings


def _reference_mismatch(actions: list[KeyAction], ref: ReferenceModel) -> list[str]:
    produced = {a.target: a for a in actions if not a.dropped}
    missing = [k for k in ref.entries
               if k not in produced and not any(t in produced for t in ref.ties.get(k, ()))]
    unexpected = [t for t in produced if t not in ref.entries]
    misshapen = [f"'{t}' ({'x'.join(map(str, a.target_shape))}, the model wants "
                 f"{'x'.join(map(str, ref.entries[t].shape))})"
                 for t, a in produced.items()
                 if t in ref.entries and a.target_shape != ref.entries[t].shape]
    errors = []
    if missing:
        errors.append(f"the reference model '{ref.spec}' expects {_quoted(sorted(missing))}, "
                      "which the conversion does not produce (add a --rename?)")
    if unexpected:
        errors.append(f"the conversion produces {_quoted(sorted(unexpected))}, which the "
                      f"reference model '{ref.spec}' lacks (add a --rename or --drop?)")
    if misshapen:
        errors.append(f"shapes differ from the reference model '{ref.spec}': "
                      f"{', '.join(sorted(misshapen)[:8])}")
    return errors


def _nothing_to_transpose(flat: dict[str, tuple[tuple[int, ...], str]], target: Layout,
                          reasons: dict[str, str], source: str) -> str:
    already = [k for k, r in reasons.items() if r.endswith(f"already {target}")
               or "wants this shape" in r or (r.startswith("reference model:")
                                              and f"({target.other} layout)" in r)]
    unproven = [k for k, r in reasons.items() if r.startswith("no evidence")]
    if already:
        return (f"nothing to transpose in '{source}': its weights are already in the {target} "
                f"layout ({_quoted(already, 3)}); use {target.other.command} for the other way.")
    if unproven:
        return (f"nothing to transpose in '{source}': no evidence that its 2-D tensors "
                f"{_quoted(unproven, 4)} are linear weights; select them with --layers "
                f"(e.g. --layers '{unproven[0]}').")
    return f"nothing to transpose in '{source}': it holds no 2-D float tensor to select."
