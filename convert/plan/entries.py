"""The plan's values: one frozen Entry per destination tensor, made of Pieces of source tensors.

A copy is one piece, a transpose one transposed piece; a stack of experts is E pieces (each a
member, `index` saying which) and a part of a fused tensor one piece with `rows`, so the next
kinds of conversion are new pieces for the same loop, not new code paths. Why an entry is made
the way it is travels as a value (`Because` plus its evidence) and becomes words only at the
edge (`reason`, `to_dict`). No tensors and no torch here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from ..layout import Layout


class Because(Enum):
    """Why a destination tensor is made the way it is."""

    BIAS_EVIDENCE = "bias evidence"
    PATTERN = "selected by"
    EXCLUDED = "excluded by"
    REFERENCE_MODEL = "reference model"
    PROVENANCE = "provenance"
    NO_EVIDENCE = "no evidence"
    NOT_A_MATRIX = "never transposed"
    COMPANION = "follows its weight"
    LAYOUT_KEPT = "a linear weight, layout kept"  # export: another format, same layout

    def words(self, evidence: str, transposed: bool) -> str:
        """The decision in words, for tables and reports."""
        if self in (Because.PATTERN, Because.EXCLUDED):
            return f"{self.value} {evidence}"
        if self is Because.NOT_A_MATRIX:
            return f"{evidence}: never transposed"
        if self is Because.NO_EVIDENCE:
            return "no evidence: not a linear weight unless selected"
        if self is Because.LAYOUT_KEPT:
            return f"{self.value} ({evidence})"
        if self is Because.PROVENANCE:
            return (f"provenance: written from '{evidence}' "
                    f"{'transposed' if transposed else 'unchanged'}")
        return f"{self.value}: {evidence}"


@dataclass(frozen=True)
class Piece:
    """A slice of one source tensor, as it lands in its destination."""

    source: str
    shape: tuple[int, ...]  # the source tensor's shape
    transpose: bool = False  # swap the last two dims
    index: int | None = None  # which member of a source stack, if any
    rows: tuple[int, int] | None = None  # which part (along the output dim) of a fused tensor
    axis: int | None = None  # with rows: the source's output dim (-2 linear, -1 param)
    member: int | None = None  # with rows: the member of a destination stack it is joined into
    # (per-expert parts merged into one stacked fused tensor: transformers 5's gate_up_proj)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"source": self.source, "shape": list(self.shape),
                             "transpose": self.transpose}
        if self.index is not None:
            d["index"] = self.index
        if self.rows is not None:
            d["rows"] = list(self.rows)
            d["axis"] = self.axis
        if self.member is not None:
            d["member"] = self.member
        return d

    @property
    def record(self) -> tuple[Any, ...]:
        """What provenance records of it: (source, index, rows, axis, member)."""
        return self.source, self.index, self.rows, self.axis, self.member


def by_member(pieces: Sequence[Piece]) -> list[list[Piece]]:
    """PIECES grouped by the destination stack member they are joined into, in order (one
    group where they make one tensor)."""
    if pieces[0].member is None:
        return [list(pieces)]
    groups: dict[int, list[Piece]] = {}
    for p in pieces:
        groups.setdefault(p.member if p.member is not None else 0, []).append(p)
    return [groups[m] for m in sorted(groups)]


@dataclass(frozen=True)
class Entry:
    """One tensor of the output: its name, shape, dtype and the pieces it is made of."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    pieces: tuple[Piece, ...]
    because: Because
    evidence: str = ""  # the key, pattern, model or bias that decided it

    dropped = False

    @property
    def source(self) -> str:
        """The source key (the first piece's, for an entry made of several)."""
        return self.pieces[0].source

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(p.source for p in self.pieces)

    @property
    def source_shape(self) -> tuple[int, ...]:
        return self.pieces[0].shape

    @property
    def transpose(self) -> bool:
        return any(p.transpose for p in self.pieces)

    @property
    def target(self) -> str:
        return self.key

    @property
    def target_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def action(self) -> str:
        return "transpose" if self.transpose else "keep"

    @property
    def reason(self) -> str:
        return self.because.words(self.evidence, self.transpose)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "shape": list(self.shape), "dtype": self.dtype,
                "pieces": [p.to_dict() for p in self.pieces], "because": self.because.name,
                "evidence": self.evidence, "reason": self.reason}


@dataclass(frozen=True)
class Drop:
    """A source key the output leaves out, and why."""

    source: str
    shape: tuple[int, ...]
    dtype: str
    because: Because
    evidence: str = ""

    dropped = True
    transpose = False
    target = ""
    action = "drop"

    @property
    def source_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def target_shape(self) -> tuple[int, ...]:
        return self.shape

    @property
    def reason(self) -> str:
        return f"dropped by {self.evidence}"

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "shape": list(self.shape), "dtype": self.dtype,
                "because": self.because.name, "evidence": self.evidence,
                "reason": self.reason}


@dataclass(frozen=True)
class FilePlan:
    """One file the output consists of, and the destination keys it holds."""

    path: Path
    role: str  # "tensors", "index", "graph" (ONNX) or "external data"
    keys: tuple[str, ...] = ()
    nbytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "role": self.role, "keys": len(self.keys),
                "bytes": self.nbytes}


@dataclass(frozen=True)
class OutputPlan:
    """Where and how the entries are written: every file, in the order they are published."""

    format: str  # "safetensors", "pt" or "onnx"
    path: Path  # DST as named (a file, or a folder for sharded output)
    files: tuple[FilePlan, ...]
    overwrite: bool = False
    folder: bool = False
    max_shard_size: int | None = None
    metadata: tuple[tuple[str, str], ...] = ()  # written besides provenance (safetensors)
    external_data: bool = False  # ONNX: initializers in one `DST.data` file
    graph: str = ""  # ONNX: "layers" (one node per layer) or "model" (the whole --model)
    side_files: tuple[tuple[Path, Path], ...] = ()  # a folder SRC's config/tokenizer: from, to
    notes: tuple[str, ...] = ()  # what the output leaves out, said once

    @property
    def tensor_files(self) -> tuple[FilePlan, ...]:
        return tuple(f for f in self.files if f.role == "tensors")

    @property
    def index(self) -> Path | None:
        return next((f.path for f in self.files if f.role == "index"), None)

    @property
    def sharded(self) -> bool:
        return self.max_shard_size is not None

    @property
    def display(self) -> Path:
        """What the user opens: the folder, the index of a sharded file set, or the file."""
        if self.folder:
            return self.path
        return self.index or self.path

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.format, "path": str(self.display),
                "folder": self.folder, "sharded": self.sharded,
                "max_shard_size": self.max_shard_size, "overwrite": self.overwrite,
                "files": [f.to_dict() for f in self.files],
                "metadata": sorted(k for k, _ in self.metadata),
                "external_data": self.external_data, "graph": self.graph or None,
                "side_files": [str(b) for _, b in self.side_files]}


@dataclass(frozen=True)
class Plan:
    """Every destination tensor, what is dropped, and (once planned) the output's files."""

    source: str
    layout: Layout
    entries: tuple[Entry, ...]
    drops: tuple[Drop, ...]
    options_hash: str
    keys: tuple[str, ...] = ()  # the source's keys, in its order
    tied: tuple[tuple[str, ...], ...] = ()
    warnings: tuple[str, ...] = ()
    from_provenance: bool = False
    selection: dict[str, Any] = field(default_factory=dict)
    model_parameters: tuple[str, ...] = ()  # the reference model's parameters, in order
    output: OutputPlan | None = None
    operation: str = "convert"  # or "export": the layout kept, nothing transposed
    notes: tuple[str, ...] = ()  # said under -v only (a preset's rules this model did not need)

    @property
    def direction(self) -> str:
        """What the plan does, in the command's word: to-linear, to-param or export."""
        return "export" if self.operation == "export" else self.layout.command

    @property
    def layer_weights(self) -> tuple[Entry, ...]:
        """The linear layers' weights, as written (an ONNX layer graph's nodes)."""
        return tuple(e for e in self.entries
                     if e.transpose or e.because is Because.LAYOUT_KEPT)

    @property
    def written(self) -> tuple[Entry, ...]:
        """The destination tensors, in output order."""
        return self.entries

    @property
    def transposed(self) -> tuple[Entry, ...]:
        return tuple(e for e in self.entries if e.transpose)

    @property
    def dropped(self) -> tuple[str, ...]:
        return tuple(d.source for d in self.drops)

    @property
    def rows(self) -> tuple[tuple[str, Entry | Drop], ...]:
        """(source key, what it becomes), in source order: each destination tensor once, at
        its first source key (a stack at its first member, every member of an unstacked
        tensor at that tensor), and each dropped key."""
        at: dict[str, list[Entry | Drop]] = {d.source: [d] for d in self.drops}
        for e in self.entries:
            at.setdefault(e.source, []).append(e)
        order = self.keys or tuple(at)
        return tuple((k, item) for k in order for item in at.get(k, ()))

    @property
    def actions(self) -> tuple[Entry | Drop, ...]:
        """What the rows hold, in their order."""
        return tuple(item for _, item in self.rows)

    def to_dict(self) -> dict[str, Any]:
        actions = []
        for k, a in self.rows:
            actions.append({"source": k, "target": a.target or None, "action": a.action,
                            "shape": list(a.source_shape), "target_shape": list(a.target_shape),
                            "dtype": a.dtype, "reason": a.reason})
        return {
            "source": self.source,
            "layout": self.layout.value,
            "direction": self.direction,
            "options_hash": self.options_hash,
            "from_provenance": self.from_provenance,
            "selection": self.selection,
            "counts": {"transpose": len(self.transposed), "drop": len(self.drops),
                       "keep": len(self.entries) - len(self.transposed)},
            "entries": [e.to_dict() for e in self.entries],
            "dropped": [d.to_dict() for d in self.drops],
            "actions": actions,
            "tied": [list(g) for g in self.tied],
            "output": self.output.to_dict() if self.output else None,
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }
