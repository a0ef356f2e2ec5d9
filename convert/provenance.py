"""Provenance: the `linconvert` metadata entry that records how a file was made.

It is what makes the reverse conversion need no options and what refuses a double transpose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CorruptInputError
from .layout import Layout

METADATA_KEY = "linconvert"
VERSION = 1
SHA_PLACEHOLDER = "0" * 64


@dataclass(frozen=True)
class Provenance:
    """What a linconvert-written file says about itself."""

    layout: Layout
    keys: dict[str, tuple[str, bool]]  # destination key -> (source key, transposed)
    dropped: tuple[str, ...] = ()
    source_name: str = ""
    source_sha256: str = ""
    options_hash: str = ""
    tool_version: str = ""
    tied: tuple[tuple[str, ...], ...] = field(default=())
    operation: str = "convert"  # or "export": the layout kept, nothing transposed
    # destination key -> its pieces, (source key, member index or None), where it is not one
    # whole source tensor: a stack of members, or one member of a source stack
    # (source key, member index or None, rows or None, axis or None, destination member or
    # None) each
    pieces: dict[str, tuple[tuple[Any, ...], ...]] = field(default_factory=dict)

    def to_json(self, keys: list[str] | None = None) -> str:
        """JSON text for the metadata entry, listing only KEYS (a shard's own) if given."""
        listed = self.keys if keys is None else {k: self.keys[k] for k in keys}
        return json.dumps({
            "version": VERSION,
            "layout": self.layout.value,
            "keys": {k: {"source": s, "transposed": t,
                         **({"pieces": [list(p if p[4:] != (None,) else p[:4])
                                        for p in self.pieces[k]]}
                            if k in self.pieces else {})}
                     for k, (s, t) in listed.items()},
            "dropped": list(self.dropped),
            "source": {"name": self.source_name, "sha256": self.source_sha256},
            "options_hash": self.options_hash,
            "tool_version": self.tool_version,
            "tied": [list(g) for g in self.tied],
            **({"operation": self.operation} if self.operation != "convert" else {}),
        }, separators=(",", ":"), ensure_ascii=False)


def parse_provenance(text: str, path: Path) -> Provenance:
    """Parse the metadata entry; a malformed one is exit 4 (it would steer a conversion)."""
    try:
        obj = json.loads(text)
        if obj["version"] != VERSION:
            raise ValueError(f"version {obj['version']!r}, this linconvert reads {VERSION}")
        keys = {str(k): (str(v["source"]), bool(v["transposed"])) for k, v in obj["keys"].items()}
        pieces = {str(k): tuple(_piece(p) for p in v["pieces"])
                  for k, v in obj["keys"].items() if "pieces" in v}
        return Provenance(
            layout=Layout(obj["layout"]),
            keys=keys,
            dropped=tuple(map(str, obj.get("dropped", ()))),
            source_name=str(obj.get("source", {}).get("name", "")),
            source_sha256=str(obj.get("source", {}).get("sha256", "")),
            options_hash=str(obj.get("options_hash", "")),
            tool_version=str(obj.get("tool_version", "")),
            tied=tuple(tuple(map(str, g)) for g in obj.get("tied", ())),
            operation=_operation(obj.get("operation", "convert")),
            pieces=pieces,
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptInputError(f"'{path}' has malformed linconvert provenance metadata ({e}); "
                                "it cannot steer a conversion.") from e


def _piece(value: Any) -> tuple[Any, ...]:
    """(source, index, rows, axis, member) from a provenance piece ([source, index], four, or
    all five)."""
    source, index, *rest = value
    rows, axis, member = (*rest, None, None, None)[:3]
    return (str(source), None if index is None else int(index),
            None if rows is None else (int(rows[0]), int(rows[1])),
            None if axis is None else int(axis), None if member is None else int(member))


def _operation(value: object) -> str:
    if value not in ("convert", "export"):
        raise ValueError(f"operation {value!r} is not convert or export")
    return str(value)


def merge_provenance(parts: list[Provenance], path: Path) -> Provenance:
    """One provenance from every shard's (each lists its own keys)."""
    first = parts[0]
    keys: dict[str, tuple[str, bool]] = {}
    pieces: dict[str, tuple[tuple[Any, ...], ...]] = {}
    for p in parts:
        pieces.update(p.pieces)
        if (p.layout, p.source_sha256, p.options_hash) != (first.layout, first.source_sha256,
                                                           first.options_hash):
            raise CorruptInputError(f"the shards of '{path}' carry provenance from different "
                                    "conversions; the checkpoint mixes files.")
        keys.update(p.keys)
    return Provenance(first.layout, keys, first.dropped, first.source_name, first.source_sha256,
                      first.options_hash, first.tool_version, first.tied, first.operation,
                      pieces)
