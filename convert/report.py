"""Renderings of reports and plans: text tables for people, JSON for programs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .plan import Plan


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain aligned text table."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def render_plan(plan: Plan) -> str:
    """The plan as `--dry-run` prints it."""
    rows = []
    for a in plan.actions:
        target = "-" if a.dropped else ("=" if a.target == a.source else a.target)
        shape = _shape(a.shape) + (f" -> {_shape(a.target_shape)}" if a.transpose else "")
        rows.append([a.action, a.source, target, shape, a.dtype, a.reason])
    n_t, n_d = len(plan.transposed), len(plan.dropped)
    head = (f"plan: {plan.layout.command} '{plan.source}': {len(plan.actions)} keys, "
            f"{n_t} transposed, {n_d} dropped, {len(plan.actions) - n_t - n_d} kept"
            + (" (reversing its provenance)" if plan.from_provenance else ""))
    return head + "\n" + table(["action", "key", "target", "shape", "dtype", "reason"], rows)


def render_inspect(report: Any) -> str:
    """`inspect`'s table."""
    rows = [[t.key, _shape(t.shape), t.dtype, t.layout, t.evidence] for t in report.tensors]
    lines = [f"{report.source}: {report.format}{' (sharded)' if report.sharded else ''}, "
             f"{len(report.tensors)} tensors"]
    if report.provenance:
        p = report.provenance
        lines.append(f"provenance: written by linconvert {p['tool_version']} in the "
                     f"{p['layout']} layout from '{p['source']}' ({p['transposed']} transposed)")
    if report.extras:
        lines.append("extras: " + ", ".join(report.extras))
    for g in report.tied:
        lines.append("tied: " + ", ".join(g))
    lines.append(table(["key", "shape", "dtype", "layout", "evidence"], rows))
    return "\n".join(lines)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a JSON report atomically."""
    from .formats.atomic import AtomicFile, output_error

    text = (json.dumps(data, indent=2) + "\n").encode()
    with AtomicFile(Path(path), overwrite=True) as f:
        try:
            view = memoryview(text)
            while view:
                import os

                view = view[os.write(f.fd, view):]
        except OSError as e:
            raise output_error(Path(path), e) from e
        f.commit()
