"""Renderings of reports and plans: text tables for people, JSON for programs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # `inspect` renders without loading the planner
    from .plan import OutputPlan, Plan


def _shape(shape: Sequence[int]) -> str:
    from .dtypes import describe_shape

    return describe_shape(tuple(shape))


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
    for k, a in plan.rows:
        pieces = getattr(a, "pieces", ())
        more = len({p.source for p in pieces}) - 1
        key = k + (f" (+{more} more)" if more > 0 else "")
        target = "-" if a.dropped else ("=" if a.target == k else a.target)
        if len(pieces) > 1 or (pieces and (pieces[0].index is not None or pieces[0].rows)):
            shape = f"{len(pieces)} pieces -> {_shape(a.target_shape)}"
        else:
            shape = _shape(a.source_shape) + (f" -> {_shape(a.target_shape)}" if a.transpose
                                              else "")
        rows.append([a.action, key, target, shape, a.dtype, a.reason])
    n_t, n_d = len(plan.transposed), len(plan.dropped)
    head = (f"plan: {plan.direction} '{plan.source}': {len(plan.keys) or len(rows)} keys, "
            f"{n_t} transposed, {n_d} dropped, {len(plan.entries) - n_t} kept"
            + (" (reversing its provenance)" if plan.from_provenance else ""))
    text = head + "\n" + table(["action", "key", "target", "shape", "dtype", "reason"], rows)
    return text + ("\n" + render_output(plan.output) if plan.output else "")


def render_output(out: OutputPlan) -> str:
    """The output plan: every file the run writes, with what it holds."""
    how = (f"sharded at {out.max_shard_size} bytes" if out.sharded else
           "external data" if out.external_data else "one file")
    rows = [[f.role, str(f.path), str(len(f.keys)) if f.keys else "-", str(f.nbytes)]
            for f in out.files]
    rows += [["copied", str(dst), "-", "-"] for _, dst in out.side_files]
    head = (f"output: {out.format} '{out.display}' ({how}"
            + ("" if len(rows) == 1 else f", {len(rows)} files")
            + (", replacing what exists" if out.overwrite else "") + ")")
    return head + "\n" + table(["file", "path", "keys", "bytes"], rows)


def render_inspect(report: Any) -> str:
    """`inspect`'s table."""
    rows = [[t.key, _shape(t.shape), t.dtype, t.layout, t.evidence] for t in report.tensors]
    lines = [f"{report.source}: {report.format}{' (sharded)' if report.sharded else ''}, "
             f"{len(report.tensors)} tensor{'' if len(report.tensors) == 1 else 's'}"]
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
    _write_text(Path(path), json.dumps(data, indent=2) + "\n")


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def render_verify(report: Any) -> str:
    """`verify`'s table: one row per check, then the verdict."""
    rows = []
    for r in report.results:
        exact = "-" if r.bit_exact is None else ("yes" if r.bit_exact else "NO")
        rows.append(["ok" if r.passed else "FAIL", r.kind, r.name, r.dtype,
                     _shape(r.shape) if r.shape else "-", _num(r.max_abs_err), _num(r.rel_err),
                     _num(r.atol_needed), exact, r.message])
    verdict = verdict_line(report)
    figures = render_figures(report)
    return table(["result", "kind", "name", "dtype", "shape", "max_abs", "rel_err",
                  "atol_needed", "bit_exact", "note"], rows) + "\n" + \
        (figures + "\n" if figures else "") + verdict


def verdict_line(report: Any) -> str:
    """The verdict of a VerifyReport in one line: what was proven, or how many checks failed."""
    layers = any(r.kind in ("layer", "onnx-layer") for r in report.results)
    proven = ("the two models compute the same outputs" if report.proven == "equivalence"
              else "DST matches its plan layer by layer" if layers
              else "every tensor of DST is SRC's, bit for bit")
    n = len(report.results)
    return (f"equivalent: {proven} ({n} check{'' if n == 1 else 's'}, pairs from "
            f"{report.pairing}, device {report.device})" if report.equivalent else
            f"NOT equivalent: {len(report.failures)} of {n} checks failed")


def _cos(x: float | None) -> str:
    return "-" if x is None else f"{x:.6f}"


def render_figures(report: Any) -> str:
    """The whole-model figures (and distances from a reference run) as a table, or ""."""
    shown = [r for r in report.results if r.figures is not None]
    if not shown:
        return ""
    ref = report.reference
    headers = ["figures", "cosine", "top1", "kl"]
    if ref:
        headers += [f"src-vs-{ref} max_abs", "cosine", f"dst-vs-{ref} max_abs", "cosine"]
    rows = []
    for r in shown:
        f = r.figures
        row = [r.name, _cos(f.cosine), _num(f.top1), _num(f.kl)]
        if ref:
            for d in (f.source_vs_reference, f.target_vs_reference):
                row += [_num(d.max_abs_err), _cos(d.cosine)] if d else ["-", "-"]
        rows.append(row)
    gates = ", ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in report.gates.items())
    return table(headers, rows) + (f"\ngates: {gates}" if gates else "")


def write_junit(path: Path, report: Any) -> None:
    """One test case per check, so CI systems show failures natively."""
    import xml.etree.ElementTree as ET

    suite = ET.Element("testsuite", name="linconvert verify", tests=str(len(report.results)),
                       failures=str(len(report.failures)), errors="0")
    for r in report.results:
        case = ET.SubElement(suite, "testcase", classname=f"linconvert.{r.kind}", name=r.name)
        if not r.passed:
            failure = ET.SubElement(case, "failure", message=r.message or "different")
            failure.text = json.dumps(r.to_dict(), indent=2)
    root = ET.Element("testsuites")
    root.append(suite)
    data = ET.tostring(root, encoding="unicode", xml_declaration=True)
    _write_text(Path(path), data + "\n")


def _write_text(path: Path, text: str) -> None:
    """Write a report file atomically."""
    from .formats.atomic import AtomicFile

    with AtomicFile(path, overwrite=True) as f:
        f.write(text.encode())
        f.commit()


def render_batch_line(res: Any) -> str:
    """One line per finished batch item."""
    if res.status == "converted":
        return (f"converted  {res.source} -> {res.destination} ({res.transposed} transposed"
                f"{', verified' if res.verified else ''}, {res.seconds:.2f} s)")
    if res.status == "skipped":
        return f"skipped    {res.source} -> {res.destination} ({res.message})"
    return f"failed[{res.exit_code}]  {res.source}: {res.message}"


def render_batch_summary(report: Any) -> str:
    """The line at the end of a batch (each item had its own line already)."""
    counts = report.to_dict()["counts"]
    return (f"linconvert: batch: {len(report.items)} items"
            + (f" (shard {report.shard})" if report.shard else "")
            + f", {counts.get('converted', 0)} converted, {counts.get('skipped', 0)} skipped, "
            f"{counts.get('failed', 0)} failed, {report.jobs} jobs, {report.seconds:.1f} s; "
            f"exit {report.exit_code}")
