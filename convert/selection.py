"""What the user and the evidence say about which tensors are linear weights.

Patterns match source keys (before renames) with `fnmatchcase`, or a regular expression with
the `re:` prefix (matched against the whole key). Rules files, presets and options say the
same things; options add to what a rules file says.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from .companions import CompanionRule, Role, bias_key, siblings  # noqa: F401 - re-exported
from .errors import UsageError
from .layout import Layout

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class Pattern:
    """A glob or `re:` pattern and where it came from (an option, a rules file, a preset)."""

    text: str
    origin: str = "--layers"
    shipped: bool = False

    @cached_property
    def _regex(self) -> re.Pattern[str] | None:
        if not self.text.startswith("re:"):
            return None
        try:
            return re.compile(self.text[3:])
        except re.error as e:
            raise UsageError(f"{self.origin} '{self.text}' is not a valid regular expression "
                             f"({e}).") from e

    def matches(self, key: str) -> bool:
        rx = self._regex
        return bool(rx.fullmatch(key)) if rx is not None else fnmatchcase(key, self.text)

    def __str__(self) -> str:
        return f"{self.origin} '{self.text}'"


@dataclass(frozen=True)
class Rename:
    """An ordered regex substitution applied to every key after the decision."""

    pattern: str
    replacement: str
    origin: str = "--rename"
    shipped: bool = False

    @cached_property
    def _regex(self) -> re.Pattern[str]:
        try:
            return re.compile(self.pattern)
        except re.error as e:
            raise UsageError(f"{self.origin} '{self.pattern}' is not a valid regular expression "
                             f"({e}).") from e

    def apply(self, key: str) -> tuple[str, bool]:
        try:
            out, n = self._regex.subn(self.replacement, key)
        except (re.error, IndexError) as e:
            raise UsageError(f"{self.origin} '{self.pattern}' -> '{self.replacement}' has a bad "
                             f"replacement ({e}).") from e
        return out, n > 0

    def __str__(self) -> str:
        return f"{self.origin} '{self.pattern}' '{self.replacement}'"


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class StackRule:
    """E per-expert tensors <-> one `[E, ...]` tensor: `from` names the members with `{e}` (the
    stacked index) and other `{name}` placeholders (one dot-free path part each); `to` names
    the stack with the same placeholders but `{e}`. Both are source-side names."""

    members: str
    stacked: str
    origin: str = "--stack"
    shipped: bool = False

    def __post_init__(self) -> None:
        mine = _PLACEHOLDER.findall(self.members)
        theirs = _PLACEHOLDER.findall(self.stacked)
        if "e" not in mine or "e" in theirs or set(theirs) != set(mine) - {"e"} or \
                len(mine) != len(set(mine)):
            raise UsageError(f"{self} must name the members with {{e}} and the stack with the "
                             "same placeholders but {e} (e.g. 'experts.{e}.w1.weight' and "
                             "'experts.w1').")

    @cached_property
    def _member_re(self) -> re.Pattern[str]:
        return _compile_placeholders(self.members)

    @cached_property
    def _stack_re(self) -> re.Pattern[str]:
        return _compile_placeholders(self.stacked)

    def member(self, key: str) -> tuple[tuple[tuple[str, str], ...], int] | None:
        """(the other placeholders' values, e) if KEY is a member."""
        m = self._member_re.fullmatch(key)
        if m is None:
            return None
        values = tuple(sorted((k, v) for k, v in m.groupdict().items() if k != "e"))
        return values, int(m["e"])

    def stack(self, key: str) -> tuple[tuple[str, str], ...] | None:
        """The placeholders' values if KEY is a stack."""
        m = self._stack_re.fullmatch(key)
        return None if m is None else tuple(sorted(m.groupdict().items()))

    def stack_name(self, values: tuple[tuple[str, str], ...]) -> str:
        return self.stacked.format(**dict(values))

    def member_name(self, values: tuple[tuple[str, str], ...], e: int) -> str:
        return self.members.format(**dict(values), e=e)

    def __str__(self) -> str:
        return f"{self.origin} '{self.members}' '{self.stacked}'"


@dataclass(frozen=True)
class SplitRule:
    """One fused tensor <-> its parts along the output dimension: `sizes` for unequal parts
    (grouped-query attention), `heads` for parts interleaved per group of heads (GPT-NeoX's
    query_key_value). `{name}` placeholders as in a stack rule; source-side names."""

    fused: str
    parts: tuple[str, ...]
    sizes: tuple[int, ...] = ()
    heads: int | str = 0  # or 'config:NAME': that field of the config.json beside SRC
    origin: str = "--split"
    shipped: bool = False
    layout: Layout | None = None  # where nothing else says it: the layout its tensors are in

    def __post_init__(self) -> None:
        want = set(_PLACEHOLDER.findall(self.fused))
        if len(self.parts) < 2 or "e" in want or any(
                set(_PLACEHOLDER.findall(p)) != want for p in self.parts):
            raise UsageError(f"{self} must name two or more parts, each with the fused name's "
                             "placeholders (e.g. 'h.{l}.attn.c_attn.weight' and "
                             "'h.{l}.attn.q_proj.weight,h.{l}.attn.k_proj.weight,...').")
        if self.sizes and (len(self.sizes) != len(self.parts) or min(self.sizes) < 1):
            raise UsageError(f"{self}: sizes must give one positive size per part.")
        if isinstance(self.heads, str):
            if not re.fullmatch(r"config:[A-Za-z_][A-Za-z0-9_]*", self.heads):
                raise UsageError(f"{self}: heads must be a number or 'config:FIELD' (a field of "
                                 "the config.json beside SRC, e.g. 'config:num_attention_heads').")
        elif self.heads < 0:
            raise UsageError(f"{self}: heads must be positive.")

    @cached_property
    def _fused_re(self) -> re.Pattern[str]:
        return _compile_placeholders(self.fused)

    @cached_property
    def _part_res(self) -> tuple[re.Pattern[str], ...]:
        return tuple(_compile_placeholders(p) for p in self.parts)

    def fused_values(self, key: str) -> tuple[tuple[str, str], ...] | None:
        m = self._fused_re.fullmatch(key)
        return None if m is None else tuple(sorted(m.groupdict().items()))

    def part_values(self, key: str) -> tuple[tuple[tuple[str, str], ...], int] | None:
        for k, regex in enumerate(self._part_res):
            m = regex.fullmatch(key)
            if m is not None:
                return tuple(sorted(m.groupdict().items())), k
        return None

    def fused_name(self, values: tuple[tuple[str, str], ...]) -> str:
        return self.fused.format(**dict(values))

    def part_name(self, values: tuple[tuple[str, str], ...], k: int) -> str:
        return self.parts[k].format(**dict(values))

    def __str__(self) -> str:
        return f"{self.origin} '{self.fused}' '{','.join(self.parts)}'"


def _compile_placeholders(pattern: str) -> re.Pattern[str]:
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(pattern):
        out.append(re.escape(pattern[pos:m.start()]))
        out.append(r"(?P<e>0|[1-9][0-9]*)" if m[1] == "e" else rf"(?P<{m[1]}>[^.]+)")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return re.compile("".join(out))


@dataclass(frozen=True)
class Selection:
    """Everything the user said about keys: selection, exclusions, drops, renames, model."""

    layers: tuple[Pattern, ...] = ()
    exclude: tuple[Pattern, ...] = ()
    drop: tuple[Pattern, ...] = ()
    renames: tuple[Rename, ...] = ()
    model: str | None = None
    stacks: tuple[StackRule, ...] = ()
    splits: tuple[SplitRule, ...] = ()
    companions: tuple[CompanionRule, ...] = ()

    @property
    def chooses_layers(self) -> bool:
        """Whether the user said which keys are linear weights (else provenance may decide)."""
        return bool(self.layers or self.exclude or self.model)

    def to_dict(self) -> dict[str, Any]:
        """What changes the output, for the options hash and reports."""
        return {
            "layers": [p.text for p in self.layers],
            "exclude": [p.text for p in self.exclude],
            "drop": [p.text for p in self.drop],
            "rename": [[r.pattern, r.replacement] for r in self.renames],
            "model": self.model,
            **({"stack": [[r.members, r.stacked] for r in self.stacks]} if self.stacks else {}),
            **({"split": [[r.fused, list(r.parts), list(r.sizes), r.heads,
                           *([r.layout.value] if r.layout else [])]
                          for r in self.splits]} if self.splits else {}),
            **({"companion": [[r.key, r.role.value, list(r.block or ())]
                              for r in self.companions]} if self.companions else {}),
        }

    def options_hash(self, target: Layout, *, export: bool = False) -> str:
        """SHA-256 of the direction and every option that changes the output."""
        direction = f"export {target}" if export else target.command
        blob = json.dumps({"direction": direction, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def merged(self, other: Selection) -> Selection:
        if self.model and other.model and self.model != other.model:
            raise UsageError(f"two reference models given ('{self.model}', '{other.model}'); "
                             "pass one --model.")
        return Selection(self.layers + other.layers, self.exclude + other.exclude,
                         self.drop + other.drop, self.renames + other.renames,
                         self.model or other.model, self.stacks + other.stacks,
                         self.splits + other.splits, self.companions + other.companions)

    def target_key(self, key: str) -> str:
        """KEY after every rename, in order."""
        for r in self.renames:
            key, _ = r.apply(key)
        return key


_RULE_KEYS = {"layers", "exclude", "drop", "rename", "stack", "split", "companion",
              "description"}
_COMPANION_ROLES = {r.value: r for r in (Role.GRID, Role.SAME_SHAPE, Role.VECTOR, Role.SCALAR,
                                         Role.BIAS)}


def rules_from_toml(data: dict[str, Any], origin: str, *, shipped: bool = False) -> Selection:
    """A Selection from a parsed rules file (or preset)."""
    unknown = set(data) - _RULE_KEYS
    if unknown:
        raise UsageError(f"{origin}: unknown key(s) {', '.join(sorted(unknown))}; a rules file "
                         f"holds {', '.join(sorted(_RULE_KEYS - {'description'}))}.")

    def patterns(name: str) -> tuple[Pattern, ...]:
        value = data.get(name, [])
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UsageError(f"{origin}: '{name}' must be a list of strings.")
        return tuple(Pattern(v, f"{origin} {name}", shipped) for v in value)

    def from_to(name: str) -> list[tuple[str, str]]:
        """The (from, to) string pairs of `[[NAME]]` tables."""
        if not isinstance(data.get(name, []), list):
            raise UsageError(f"{origin}: '{name}' must be an array of tables ([[{name}]] with "
                             "from and to).")
        pairs = []
        for i, r in enumerate(data.get(name, [])):
            if not isinstance(r, dict) or set(r) != {"from", "to"} or not all(
                isinstance(v, str) for v in r.values()
            ):
                raise UsageError(f"{origin}: [[{name}]] entry {i + 1} must have string keys "
                                 "'from' and 'to' and nothing else.")
            pairs.append((r["from"], r["to"]))
        return pairs

    renames = [Rename(a, b, f"{origin} rename", shipped) for a, b in from_to("rename")]
    stacks = [StackRule(a, b, f"{origin} stack", shipped) for a, b in from_to("stack")]
    splits = []
    if not isinstance(data.get("split", []), list):
        raise UsageError(f"{origin}: 'split' must be an array of tables ([[split]] with from, "
                         "to, and optionally sizes and heads).")
    for i, r in enumerate(data.get("split", [])):
        ok = (isinstance(r, dict)
              and {"from", "to"} <= set(r) <= {"from", "to", "sizes", "heads", "layout"}
              and isinstance(r["from"], str) and isinstance(r["to"], list)
              and all(isinstance(v, str) for v in r["to"])
              and all(isinstance(v, int) for v in r.get("sizes", []))
              and isinstance(r.get("heads", 0), (int, str))
              and r.get("layout", "linear") in ("linear", "param"))
        if not ok:
            raise UsageError(f"{origin}: [[split]] entry {i + 1} must have a string 'from', a "
                             "list of strings 'to', and optionally integer 'sizes' and 'heads' "
                             "and a 'layout' (linear or param).")
        splits.append(SplitRule(r["from"], tuple(r["to"]), tuple(r.get("sizes", ())),
                                r.get("heads", 0), f"{origin} split", shipped,
                                Layout(r["layout"]) if "layout" in r else None))
    companions = []
    if not isinstance(data.get("companion", []), list):
        raise UsageError(f"{origin}: 'companion' must be an array of tables ([[companion]] with "
                         "key, role, and optionally block).")
    for i, r in enumerate(data.get("companion", [])):
        block = r.get("block") if isinstance(r, dict) else None
        ok = (isinstance(r, dict) and {"key", "role"} <= set(r) <= {"key", "role", "block"}
              and isinstance(r["key"], str) and r["role"] in _COMPANION_ROLES
              and (block is None or (isinstance(block, list) and len(block) == 2
                                     and all(isinstance(b, int) and b > 0 for b in block))))
        if not ok:
            raise UsageError(f"{origin}: [[companion]] entry {i + 1} must have a string 'key' "
                             f"(a glob), a 'role' ({', '.join(sorted(_COMPANION_ROLES))}), and "
                             "optionally 'block' = [rows, columns].")
        companions.append(CompanionRule(r["key"], _COMPANION_ROLES[r["role"]],
                                        tuple(block) if block else None,
                                        f"{origin} companion", shipped))
    return Selection(patterns("layers"), patterns("exclude"), patterns("drop"), tuple(renames),
                     stacks=tuple(stacks), splits=tuple(splits), companions=tuple(companions))


def with_config(selection: Selection, src: Path) -> Selection:
    """SELECTION with each split's `heads = 'config:FIELD'` read from the config.json beside
    SRC (in a folder SRC, or beside a file), as Hugging Face folders carry it."""
    if not any(isinstance(r.heads, str) for r in selection.splits):
        return selection
    config = (src if src.is_dir() else src.parent) / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        rule = next(r for r in selection.splits if isinstance(r.heads, str))
        raise UsageError(f"{rule} takes its heads from '{config}', which cannot be read ("
                         f"{getattr(e, 'strerror', None) or e}); pass the split in a --rules "
                         "file with heads = N.") from e
    splits = []
    for r in selection.splits:
        if isinstance(r.heads, str):
            field_name = r.heads.removeprefix("config:")
            value = data.get(field_name) if isinstance(data, dict) else None
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UsageError(f"{r} takes its heads from '{config}', whose '{field_name}' is "
                                 f"{value!r}, not a positive number; pass the split in a "
                                 "--rules file with heads = N.")
            r = SplitRule(r.fused, r.parts, r.sizes, value, r.origin, r.shipped, r.layout)
        splits.append(r)
    return Selection(selection.layers, selection.exclude, selection.drop, selection.renames,
                     selection.model, selection.stacks, tuple(splits), selection.companions)


def load_rules(path: Path) -> Selection:
    """Read a rules file (TOML)."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"cannot read rules file '{path}' ({e.strerror or e}).") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"rules file '{path}' is not valid TOML ({e}).") from e
    return rules_from_toml(data, f"rules file '{path}'")


def list_presets() -> dict[str, str]:
    """Shipped presets: name -> description."""
    out = {}
    for entry in sorted(resources.files("convert.presets").iterdir(),
                        key=lambda p: p.name.removesuffix(".toml")):
        if entry.name.endswith(".toml"):
            data = tomllib.loads(entry.read_text(encoding="utf-8"))
            out[entry.name[:-5]] = str(data.get("description", ""))
    return out


def preset_text(name: str) -> str:
    """The TOML text of a shipped preset."""
    entry = resources.files("convert.presets") / f"{name}.toml"
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or not entry.is_file():
        raise UsageError(f"no preset named '{name}'; `linconvert presets` lists them "
                         f"({', '.join(list_presets())}).")
    return entry.read_text(encoding="utf-8")


def load_preset(name: str) -> Selection:
    """A shipped preset; its rules that match nothing are skipped with a warning."""
    return rules_from_toml(tomllib.loads(preset_text(name)), f"preset '{name}'", shipped=True)


def make_selection(*, layers: Sequence[str] = (), exclude: Sequence[str] = (),
                   drop: Sequence[str] = (), rename: Sequence[Sequence[str]] = (),
                   rules: Path | str | None = None, preset: str | None = None,
                   model: str | None = None, stack: Sequence[Sequence[str]] = (),
                   split: Sequence[Sequence[str]] = ()) -> Selection:
    """Combine a preset, a rules file and command-line options, in that order."""
    sel = Selection()
    if preset:
        sel = sel.merged(load_preset(preset))
    if rules:
        sel = sel.merged(load_rules(Path(rules)))
    options = Selection(
        tuple(Pattern(p, "--layers") for p in layers),
        tuple(Pattern(p, "--exclude") for p in exclude),
        tuple(Pattern(p, "--drop") for p in drop),
        tuple(Rename(a, b) for a, b in rename),
        model,
        tuple(StackRule(a, b) for a, b in stack),
        tuple(SplitRule(a, tuple(b.split(",")) if isinstance(b, str) else tuple(b))
              for a, b in split),
    )
    sel = sel.merged(options)
    for p in (*sel.layers, *sel.exclude, *sel.drop):
        p.matches("")  # compile now: a bad regex is a usage error before any work
    for r in sel.renames:
        r.apply("")
    return sel


SELECTION_OPTIONS = ("layers", "exclude", "drop", "rename", "rules", "preset", "model",
                     "stack", "split")


def selection_from(selection: Selection | None, options: Mapping[str, Any]) -> Selection:
    """The one Selection of a call: SELECTION as given, or built from the keyword OPTIONS
    (`layers`, `exclude`, `drop`, `rename`, `rules`, `preset`, `model`), not both."""
    unknown = sorted(set(options) - set(SELECTION_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
    given = {k: v for k, v in options.items() if v not in (None, (), [])}
    if selection is not None:
        if given:
            raise UsageError(f"pass either selection= or {', '.join(sorted(given))}, not both.")
        return selection
    return make_selection(**given)


def suggest_renames(ours: Sequence[str], theirs: Sequence[str]) -> list[tuple[str, str]]:
    """The --rename rules that would turn most of OURS into keys of THEIRS: one change of the
    keys' start (`transformer.` dropped, `model.` added), or of their last name parts
    (`W` -> `weight`); [] when neither pairs at least half of OURS."""
    if not ours or not theirs:
        return []
    wanted = set(theirs)
    for rules in (_prefix_change(ours, theirs), _leaf_changes(ours, theirs)):
        if rules:
            renames = [Rename(a, b) for a, b in rules]
            hits = 0
            for k in ours:
                for r in renames:
                    k, _ = r.apply(k)
                hits += k in wanted
            if 2 * hits >= len(ours):
                return rules
    return []


def rename_options(rules: Sequence[tuple[str, str]]) -> str:
    """RULES as the command line writes them."""
    return " ".join(f"--rename '{a}' '{b}'" for a, b in rules)


def _prefix_change(ours: Sequence[str], theirs: Sequence[str]) -> list[tuple[str, str]]:
    """Our first key against each of theirs, cut where their common tail starts a name part."""
    wanted = set(theirs)
    best: tuple[int, str, str] | None = None
    a = ours[0]
    for b in list(theirs)[:1000]:
        n = 0
        while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
            n += 1
        k = next((k for k in range(n, 0, -1) if _starts_name(a, k) and _starts_name(b, k)), 0)
        old, new = a[:len(a) - k], b[:len(b) - k]
        if k == 0 or old == new:
            continue
        hits = sum(1 for key in ours if key.startswith(old) and new + key[len(old):] in wanted)
        if best is None or hits > best[0]:
            best = hits, old, new
    return [(f"^{re.escape(best[1])}", best[2])] if best else []


def _starts_name(key: str, k: int) -> bool:
    """Whether KEY's last K characters start a name part (the key's start, or after a dot)."""
    return k == len(key) or key[len(key) - k - 1] == "."


def _leaf_changes(ours: Sequence[str], theirs: Sequence[str]) -> list[tuple[str, str]]:
    """Last-name-part renames (`P.W` -> `P.weight`) where P is on both sides."""
    by_prefix: dict[str, set[str]] = {}
    for k in theirs:
        prefix, _, leaf = k.rpartition(".")
        by_prefix.setdefault(prefix, set()).add(leaf)
    votes: dict[str, dict[str, int]] = {}
    for k in ours:
        prefix, _, leaf = k.rpartition(".")
        for other in by_prefix.get(prefix, ()):
            if other != leaf:
                votes.setdefault(leaf, {}).setdefault(other, 0)
                votes[leaf][other] += 1
    def likeness(leaf: str, other: str) -> int:  # W ~ weight, b ~ bias
        return len(os.path.commonprefix([leaf.lower(), other.lower()]))

    ranked = sorted(((n, likeness(leaf, other), leaf, other) for leaf, counts in votes.items()
                     for other, n in counts.items()), reverse=True)
    chosen: dict[str, str] = {}
    for _, _, leaf, other in ranked:  # one to one: each name given to one leaf
        if leaf not in chosen and other not in chosen.values():
            chosen[leaf] = other
    rules = []
    for leaf, other in chosen.items():
        if leaf in ours:  # a top-level key of that name too
            rules.append((f"(^|\\.){re.escape(leaf)}$", f"\\g<1>{other}"))
        else:
            rules.append((f"\\.{re.escape(leaf)}$", f".{other}"))
    return rules


# --- evidence -------------------------------------------------------------------------------

def bias_evidence(key: str, shape: tuple[int, ...],
                  shapes: Mapping[str, tuple[int, ...]]) -> tuple[Layout, str] | None:
    """The layout a weight's bias sibling proves, with the reason; None if it proves none.

    `P.weight` (or `P.W`, `P.kernel`) with `P.bias` (or `P.b`) of length `shape[1] != shape[0]`
    is param (in x out); of length `shape[0] != shape[1]`, linear (out x in). A stack `[E, r, c]`
    takes a bias `[E, n]` the same way.
    """
    rows, cols = shape[-2:]
    lead = tuple(shape[:-2])
    for bias in siblings(key, Role.BIAS):
        b = shapes.get(bias)
        if b is None or len(b) != len(lead) + 1 or tuple(b[:-1]) != lead:
            continue
        n = b[-1]
        if n == cols != rows:
            return Layout.PARAM, f"bias '{bias}' has {n} = columns, so in x out"
        if n == rows != cols:
            return Layout.LINEAR, f"bias '{bias}' has {n} = rows, so out x in"
    for scale_key in siblings(key, Role.SCALE):  # one scale per output channel: [out, 1]
        s = shapes.get(scale_key)
        if s is None or len(s) != len(lead) + 2 or tuple(s[:-2]) != lead or rows == 1 or \
                cols == 1:
            continue
        if tuple(s[-2:]) == (rows, 1):
            return Layout.LINEAR, (f"per-channel scale '{scale_key}' is {rows}x1, one per row, "
                                   "so out x in")
        if tuple(s[-2:]) == (1, cols):
            return Layout.PARAM, (f"per-channel scale '{scale_key}' is 1x{cols}, one per "
                                  "column, so in x out")
    return None


@dataclass(frozen=True)
class RefEntry:
    """One key of a reference model: its shape and the layout its owning module implies."""

    shape: tuple[int, ...]
    owner: str
    layout: Layout | None = None


@dataclass(frozen=True)
class ReferenceModel:
    """Torch-free facts about a `--model` (built on the meta device): keys, shapes, owners."""

    spec: str
    entries: dict[str, RefEntry]
    ties: dict[str, tuple[str, ...]] = field(default_factory=dict)
    parameters: tuple[str, ...] = ()  # named_parameters() order: what an optimizer indexes


def _owner_layout(module: Any, leaf: str) -> Layout | None:
    from torch import nn

    from .modules import ParamLinear

    if leaf != "weight":
        return None
    if isinstance(module, nn.Linear):
        return Layout.LINEAR
    cls = type(module)
    if isinstance(module, ParamLinear) or (
        cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
    ):
        return Layout.PARAM
    return None


def build_reference(spec: str) -> ReferenceModel:
    """Build the user's target-layout model on the meta device and record its keys."""
    from .factory import build_model

    model = build_model(spec, "--model", device="meta")
    entries: dict[str, RefEntry] = {}
    by_tensor: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        tensors = list(module.named_parameters(recurse=False, remove_duplicate=False))
        tensors += [(n, b) for n, b in module.named_buffers(recurse=False, remove_duplicate=False)
                    if n not in module._non_persistent_buffers_set and b is not None]
        for leaf, t in tensors:
            if t is None:
                continue
            key = prefix + leaf
            entries[key] = RefEntry(tuple(t.shape), type(module).__name__,
                                    _owner_layout(module, leaf))
            by_tensor.setdefault(id(t), []).append(key)
    state_keys = list(model.state_dict(keep_vars=True))
    entries = {k: entries[k] for k in state_keys if k in entries}
    ties = {}
    for keys in by_tensor.values():
        keys = [k for k in keys if k in entries]
        for k in keys:
            if len(keys) > 1:
                ties[k] = tuple(x for x in keys if x != k)
    parameters = tuple(name for name, _ in model.named_parameters())
    return ReferenceModel(spec, entries, ties, parameters)
