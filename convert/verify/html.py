"""The verdict page: one self-contained HTML file (inline CSS and SVG; no script; nothing
fetched) with the verdict in one line, the plan as a table, every check against its tolerance,
a log-scale chart of each check's smallest passing atol against its atol, the whole-model
figures, and the provenance and command that made it.

The page is rendered by Jinja2 with autoescaping on (keys and paths are user data) from plain
dicts, *sections*, so a batch's worker processes can hand theirs back to the parent.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import __version__

# The command line that is running (set by the CLI); a page made from the API says its call.
from ..command import COMMAND  # noqa: E402,F401 - the command line, set by cli.run
from ..report import _cos, _num, _write_text, verdict_line

CHART_ROWS = 400  # more checks than this: the chart shows those nearest to failing
_WIDTH, _LABEL, _PAD, _TOP, _ROW = 760, 250, 24, 30, 18


def command_line(name: str, *args: Any, **kwargs: Any) -> str:
    """The command that made the page: the command line if linconvert is running, else the
    API call NAME(ARGS, KWARGS) with the keywords that were given."""
    running = COMMAND.get()
    if running:
        return running

    def shown(v: Any) -> str:
        return repr(str(v)) if isinstance(v, Path) else repr(v)

    given = [shown(a) for a in args if a is not None]
    given += [f"{k}={shown(v)}" for k, v in kwargs.items()
              if v not in (None, (), [], {}, False) and not callable(v)]
    return f"convert.{name}({', '.join(given)})"


def verification_section(report: Any, *, title: str = "",
                         provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A page section for a `verify` (a VerifyReport), with DST's provenance if it has one."""
    facts = [("source", report.source), ("destination", report.destination),
             ("proven", "equivalence (whole model)" if report.proven == "equivalence"
              else "the plan, layer by layer"),
             ("pairs from", report.pairing), ("device", report.device),
             ("seed", str(report.seed)), ("batch size", str(report.batch_size)),
             ("tolerances", _tolerances(report.atol, report.rtol))]
    if report.reference:
        facts.append(("reference run", f"the source side in {report.reference}"))
    if report.gates:
        facts.append(("gates", ", ".join(f"--{k.replace('_', '-')} {v:g}"
                                         for k, v in report.gates.items())))
    for k, v in (provenance or {}).items():
        facts.append((f"DST provenance: {k}", str(v)))
    return {"title": title or f"verify {_short(report.source)} → {_short(report.destination)}",
            "ok": report.equivalent, "verdict": _verdict(report), "facts": facts,
            "warnings": list(report.warnings), "plan": None,
            "verification": report.to_dict()}


def conversion_section(conv: Any, *, title: str = "") -> dict[str, Any]:
    """A page section for a conversion (a ConversionReport): its plan, and its verification
    when it ran (also when it failed, which is when people look)."""
    ver = conv.verification
    dst = conv.destination
    if conv.dry_run:
        ok, verdict = True, "dry run: the plan below; nothing was written or verified"
    elif ver is None:
        ok, verdict = True, f"wrote '{dst}', not verified (--no-verify)"
    elif ver.equivalent:
        ok, verdict = True, f"wrote '{dst}', verified {verdict_line(ver)}"
    else:
        ok, verdict = False, f"{_verdict(ver)}; '{dst}' was not written"
    facts = [("direction", conv.plan.direction), ("source", conv.source),
             ("destination", str(dst)), ("layout written", conv.layout.value),
             ("options hash", conv.plan.options_hash)]
    if conv.source_sha256:
        facts.append(("source SHA-256", conv.source_sha256))
    if conv.files and not conv.dry_run and (ver is None or ver.equivalent):
        facts += [("files", ", ".join(conv.files)),
                  ("written", f"{conv.keys_written} tensors, {conv.bytes_written} bytes in "
                              f"{conv.seconds:.2f} s")]
    if ver is not None:
        facts += [("device", ver.device), ("seed", str(ver.seed)),
                  ("batch size", str(ver.batch_size)),
                  ("tolerances", _tolerances(ver.atol, ver.rtol))]
    return {"title": title or f"{conv.plan.direction} {_short(conv.source)}", "ok": ok,
            "verdict": verdict, "facts": facts, "warnings": list(conv.warnings),
            "plan": conv.plan.to_dict(), "verification": ver.to_dict() if ver else None}


def write_html(path: Path | str, sections: Sequence[Mapping[str, Any]], *, command: str,
               batch: Mapping[str, Any] | None = None) -> None:
    """Write the page for SECTIONS (one, or a batch's items) atomically to PATH."""
    _write_text(Path(path), render_page(sections, command=command, batch=batch))


def render_page(sections: Sequence[Mapping[str, Any]], *, command: str,
                batch: Mapping[str, Any] | None = None) -> str:
    """The page's HTML text."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("convert.verify", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = _num
    env.filters["cos"] = _cos
    views = [_view(s, f"item-{i}") for i, s in enumerate(sections)]
    if batch is not None:
        ok, verdict = batch["ok"], batch["verdict"]
    else:
        ok, verdict = views[0]["ok"], views[0]["verdict"]
    return env.get_template("verdict.html").render(
        ok=ok, verdict=verdict, sections=views, batch=batch, command=command,
        version=__version__, generated=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))


def _short(path: str) -> str:
    """A checkpoint's name for a title: the file, or the folder of a sharded index."""
    p = Path(path)
    return f"{p.parent.name}/" if p.name.endswith(".index.json") else p.name


def _verdict(report: Any) -> str:
    """The verdict line, naming the first failing checks."""
    failed = [r.name for r in report.failures]
    names = ", ".join(failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5 else "")
    return verdict_line(report) + (f" ({names})" if failed else "")


def _tolerances(atol: float | None, rtol: float | None) -> str:
    given = [f"atol {atol:g}" if atol is not None else "", f"rtol {rtol:g}" if rtol is not None
             else ""]
    return ", ".join(filter(None, given)) or "torch.testing.assert_close's, by dtype"


def _view(section: Mapping[str, Any], anchor: str) -> dict[str, Any]:
    """What the template shows of a section: its rows, formatted, and its chart."""
    ver = section.get("verification") or {}
    results = ver.get("results", [])
    checks = [{**r, "shape": "x".join(map(str, r["shape"])) or "-",
               "tolerance_text": _tolerance_text(r.get("tolerance")),
               "exact": "-" if r["bit_exact"] is None else ("yes" if r["bit_exact"] else "NO")}
              for r in results]
    figures = [r for r in results if r.get("figures")]
    return {**section, "anchor": anchor, "checks": checks, "figures": figures,
            "reference": ver.get("reference"), "chart": _chart(results),
            "plan_rows": _plan_rows(section.get("plan")),
            "outputs": (section.get("plan") or {}).get("output")}


def _tolerance_text(tol: Mapping[str, Any] | None) -> str:
    if not tol:
        return "-"
    scale = f"·√{tol['in']}" if tol["in"] != 1 else ""
    return f"atol {tol['atol']:g}{scale}\n+ rtol {tol['rtol']:g}·|b|"


def _plan_rows(plan: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """One row per destination tensor (and one per dropped key)."""
    if not plan:
        return []
    rows = []
    for e in plan["entries"]:
        pieces = e["pieces"]
        sources = list(dict.fromkeys(p["source"] for p in pieces))
        transposed = any(p["transpose"] for p in pieces)
        if len(pieces) > 1:
            action = f"stack of {len(pieces)}" + (", transposed" if transposed else "")
        elif pieces and "rows" in pieces[0]:
            action = "part" + (", transposed" if transposed else "")
        else:
            action = "transpose" if transposed else "keep"
        source_shape = "x".join(map(str, pieces[0]["shape"])) if pieces else "-"
        rows.append({"key": e["key"], "sources": sources, "action": action,
                     "shapes": f"{source_shape} → {'x'.join(map(str, e['shape'])) or '-'}",
                     "dtype": e["dtype"], "evidence": e["reason"], "changed": action != "keep"})
    for d in plan["dropped"]:
        rows.append({"key": "-", "sources": [d["source"]], "action": "drop",
                     "shapes": "x".join(map(str, d["shape"])) or "-", "dtype": d["dtype"],
                     "evidence": d["reason"], "changed": True})
    return rows


def _chart(results: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """A log-scale chart of each check's smallest passing atol (a bar) against the atol it
    was given (a tick): a check passes exactly when its bar stops short of its tick."""
    rows = [r for r in results if r.get("atol_needed") is not None and r.get("tolerance")]
    if not rows:
        return None
    note = ""
    if len(rows) > CHART_ROWS:
        note = (f"the {CHART_ROWS} of {len(rows)} checks nearest to failing (the table lists "
                "all)")
        rows = sorted(rows, key=lambda r: -_ratio(r))[:CHART_ROWS]
    values = [v for r in rows for v in (r["atol_needed"], r["tolerance"]["atol"])
              if 0 < v < math.inf]
    hi_exp = math.ceil(math.log10(max(values))) if values else 0
    lo_exp = math.floor(math.log10(min(values))) - 1 if values else -8
    lo_exp = max(min(lo_exp, hi_exp - 1), hi_exp - 14)
    x0, x1 = _LABEL, _WIDTH - _PAD

    def x(v: float) -> float:
        if v <= 0:
            return x0
        e = min(max(math.log10(v) if v < math.inf else hi_exp, lo_exp), hi_exp)
        return round(x0 + (e - lo_exp) / (hi_exp - lo_exp) * (x1 - x0), 1)

    step = 1 if hi_exp - lo_exp <= 10 else 2
    ticks = [{"x": x(10.0 ** e), "label": f"1e{e}"} for e in range(lo_exp, hi_exp + 1, step)]
    bars = []
    for i, r in enumerate(rows):
        y = _TOP + i * _ROW
        needed = r["atol_needed"]
        label = r["name"] if len(r["name"]) <= 38 else "…" + r["name"][-37:]
        bars.append({"name": r["name"], "label": label, "y": y, "text_y": y + 11,
                     "width": max(x(needed) - x0, 1.0), "tick": x(r["tolerance"]["atol"]),
                     "passed": r["passed"], "needed": needed,
                     "atol": r["tolerance"]["atol"]})
    height = _TOP + len(rows) * _ROW + 10
    return {"width": _WIDTH, "height": height, "x0": x0, "x1": x1, "top": _TOP - 6,
            "bottom": height - 6, "ticks": ticks, "bars": bars, "note": note}


def _ratio(r: Mapping[str, Any]) -> float:
    atol = r["tolerance"]["atol"]
    return math.inf if not r["passed"] else (r["atol_needed"] / atol if atol else 0.0)
