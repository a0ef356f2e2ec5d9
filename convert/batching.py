"""Many checkpoints: items from paths, globs, folders or a manifest; worker processes; a
journal for resuming; `--shard I/N` for splitting one batch over machines with no coordination.

The parent plans the items (sorted by source path), checks that no two share a DST, hands each
to a worker that converts and verifies it, prints one line per finished item, appends finished
items to the journal in their output folder, and returns the worst exit code.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .checkpoint import CHECKPOINT_SUFFIXES, open_checkpoint
from .children import die_with
from .errors import ConvertError, UsageError
from .formats import is_dcp
from .layout import Layout

JOURNAL = ".linconvert-journal.jsonl"
_ITEM_OPTIONS = ("layers", "exclude", "drop", "rename", "rules", "preset", "model",
                 "state_dict_key", "format", "max_shard_size")
_LIST_OPTIONS = ("layers", "exclude", "drop")


@dataclass(frozen=True)
class Item:
    """One checkpoint to convert."""

    source: str
    destination: str
    direction: str  # "to-linear" or "to-param"
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def layout(self) -> Layout:
        return Layout(self.direction.removeprefix("to-"))

    def option_dict(self) -> dict[str, Any]:
        return dict(self.options)


@dataclass
class ItemResult:
    """What happened to one item."""

    source: str
    destination: str
    direction: str
    status: str  # "converted", "skipped", "failed"
    exit_code: int
    message: str = ""
    seconds: float = 0.0
    keys_written: int = 0
    bytes_written: int = 0
    transposed: int = 0
    source_sha256: str = ""
    options_hash: str = ""
    verified: bool | None = None
    # the item's verdict-page section (its plan and verification), kept only for --html
    section: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["section"]
        return d


@dataclass
class BatchReport:
    """Every item's outcome; `exit_code` is the worst of them."""

    items: list[ItemResult] = field(default_factory=list)
    shard: str = ""
    jobs: int = 1
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return max((r.exit_code for r in self.items), default=0)

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for r in self.items:
            counts[r.status] = counts.get(r.status, 0) + 1
        return {"exit_code": self.exit_code, "shard": self.shard, "jobs": self.jobs,
                "seconds": round(self.seconds, 3), "counts": counts,
                "items": [r.to_dict() for r in self.items]}


# --- planning the items ---------------------------------------------------------------------

def _is_checkpoint_folder(folder: Path) -> bool:
    return any(folder.glob("*.index.json")) or (folder / "model.safetensors").is_file() or \
        (folder / "pytorch_model.bin").is_file() or is_dcp(folder)


def _is_partial(p: Path) -> bool:
    return p.name.startswith(".") or p.name.endswith(".partial")


def expand_sources(args: Sequence[str]) -> list[tuple[Path, Path]]:
    """(source, base) pairs: BASE is what the source's path is mirrored relative to."""
    out: list[tuple[Path, Path]] = []
    for arg in args:
        matches = [Path(m) for m in sorted(glob.glob(arg, recursive=True))] if glob.has_magic(
            arg) else [Path(arg)]
        if not matches or not all(m.exists() for m in matches):
            raise UsageError(f"batch input '{arg}' matches no file or folder.")
        for m in matches:
            if m.is_dir() and not _is_checkpoint_folder(m):
                for p in sorted(m.rglob("*")):
                    if _is_partial(p) or any(_is_partial(q) for q in p.relative_to(m).parents
                                             if q != Path(".")):
                        continue
                    if _is_item(p):
                        out.append((p, m))
            else:
                out.append((m, m.parent))
    return out


def _is_item(p: Path) -> bool:
    """A checkpoint file (not a shard of a checkpoint folder), or a checkpoint folder."""
    if _is_output(p):
        return False
    if p.is_dir():
        return _is_checkpoint_folder(p)
    return p.suffix.lower() in CHECKPOINT_SUFFIXES and not _is_checkpoint_folder(p.parent)


def _is_output(p: Path) -> bool:
    """linconvert's own outputs (NAME.linear.EXT, NAME.param/) are not inputs of a rerun."""
    stem = p.name[: -len(p.suffix)] if p.suffix and p.is_file() else p.name
    return stem.endswith((".linear", ".param")) or any(
        parent.name.endswith((".linear", ".param")) for parent in p.parents)


def _default_name(src: Path, layout: Layout, fmt: str | None) -> str:
    from .plan import resolve_output

    return resolve_output(src, None, layout, fmt=fmt).path.name


def read_manifest(path: Path) -> list[dict[str, Any]]:
    """Rows of a CSV (with a header) or JSON-lines manifest."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read manifest '{path}' ({e}).") from e
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise UsageError(f"manifest '{path}' line {n} is not JSON ({e}).") from e
            if not isinstance(row, dict):
                raise UsageError(f"manifest '{path}' line {n} is not a JSON object.")
            rows.append(row)
    else:
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "source" not in reader.fieldnames:
            raise UsageError(f"manifest '{path}' needs a header row with a 'source' column.")
        for row in reader:
            rows.append({k: v for k, v in row.items() if k and v not in (None, "")})
    for n, row in enumerate(rows, 1):
        unknown = set(row) - {"source", "destination", "direction", *_ITEM_OPTIONS}
        if unknown or "source" not in row:
            raise UsageError(f"manifest '{path}' row {n}: needs 'source'; unknown column(s) "
                             f"{', '.join(sorted(unknown)) or 'none'}.")
        for k in _LIST_OPTIONS:
            if isinstance(row.get(k), str):
                row[k] = [x for x in row[k].split(";") if x]
        if isinstance(row.get("rename"), str):
            pairs = [x.split("=>", 1) for x in row["rename"].split(";") if x]
            if any(len(p) != 2 for p in pairs):
                raise UsageError(f"manifest '{path}' row {n}: write rename as FROM=>TO;FROM=>TO.")
            row["rename"] = [tuple(p) for p in pairs]
        base = path.parent
        for k in ("source", "destination", "rules"):
            if k in row and not Path(row[k]).is_absolute():
                row[k] = str(base / row[k])
    return rows


def plan_items(sources: Sequence[str] = (), *, manifest: Path | None = None,
               direction: str | None = None, out_dir: Path | None = None,
               options: dict[str, Any] | None = None) -> list[Item]:
    """Every item, sorted by source path; two items with one DST is exit 2."""
    options = {k: v for k, v in (options or {}).items() if v not in (None, (), [])}
    items: list[Item] = []
    if direction is not None and direction not in ("to-linear", "to-param"):
        raise UsageError(f"--direction '{direction}' is not to-linear or to-param.")
    for src, base in expand_sources(sources):
        if direction is None:
            raise UsageError("plain batch inputs need --direction to-linear or to-param (or "
                             "give each row's direction in a --manifest).")
        layout = Layout(direction.removeprefix("to-"))
        name = _default_name(src, layout, options.get("format"))
        rel = src.parent.relative_to(base) if out_dir is not None else None
        dst = (out_dir / rel / name) if out_dir is not None and rel is not None else \
            src.parent / name
        items.append(Item(str(src), str(dst), direction, tuple(sorted(options.items()))))
    for row in read_manifest(manifest) if manifest else []:
        d = row.get("direction") or direction
        if d not in ("to-linear", "to-param"):
            raise UsageError(f"manifest row for '{row['source']}' needs a direction (to-linear "
                             "or to-param), or pass --direction.")
        merged = {**options, **{k: row[k] for k in _ITEM_OPTIONS if k in row}}
        src = Path(row["source"])
        if "destination" in row:
            dst = Path(row["destination"])
        else:
            name = _default_name(src, Layout(d.removeprefix("to-")), merged.get("format"))
            dst = (out_dir / name) if out_dir is not None else src.parent / name
        items.append(Item(str(src), str(dst), d, tuple(sorted(
            (k, tuple(map(tuple, v)) if k == "rename" else tuple(v) if isinstance(v, list)
             else v) for k, v in merged.items()))))
    items.sort(key=lambda it: it.source)
    seen: dict[str, str] = {}
    for it in items:
        key = os.path.abspath(it.destination)
        if key in seen:
            raise UsageError(f"'{seen[key]}' and '{it.source}' would both be written to "
                             f"'{it.destination}'; give them distinct destinations.")
        seen[key] = it.source
    return items


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`I/N`, 0-based: item k belongs to shard k mod N."""
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i, n = -1, 0
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard '{text}' must be I/N with 0 <= I < N (e.g. 0/4).")
    return i, n


def select_shard(items: list[Item], shard: tuple[int, int] | None) -> list[Item]:
    if shard is None:
        return items
    i, n = shard
    return [it for k, it in enumerate(items) if k % n == i]


# --- running one item -----------------------------------------------------------------------

def _sha256(path: Path) -> str:
    """SHA-256 of a source as provenance records it (all shards, in index order)."""
    from .digest import sha256_files

    if path.is_dir() or path.name.endswith(".index.json") or is_dcp(path):
        with open_checkpoint(path) as ckpt:
            return sha256_files(ckpt.files)
    return sha256_files((path,))


def _options_hash(item: Item) -> str:
    from .selection import SELECTION_OPTIONS, selection_from

    o = item.option_dict()
    sel = selection_from(None, {k: v for k, v in o.items() if k in SELECTION_OPTIONS})
    return sel.options_hash(item.layout)


def _already_done(item: Item, journal: dict[str, dict[str, Any]], sha: str,
                  options_hash: str) -> str:
    """Why ITEM needs no work ("" if it does): the journal or DST's provenance says so."""
    dst = Path(item.destination)
    if not dst.exists():
        return ""
    entry = journal.get(os.path.abspath(dst))
    if entry and entry.get("source_sha256") == sha and entry.get("options_hash") == \
            options_hash:
        return "done (journal)"
    try:
        with open_checkpoint(dst) as out:
            prov = out.provenance
    except ConvertError:
        return ""
    if prov is not None and prov.source_sha256 == sha and prov.options_hash == options_hash:
        return "done (provenance)"
    return ""


def run_item(item: Item, journal_entry: dict[str, Any] | None, force: bool, overwrite: bool,
             verify: bool, allow_global: tuple[str, ...], page: bool = False) -> ItemResult:
    """Convert one item (in a worker); never raises for a bad item. With PAGE the result keeps
    the item's verdict-page section."""
    from .api import convert
    from .errors import NotEquivalentError

    start = time.perf_counter()
    res = ItemResult(item.source, item.destination, item.direction, "failed", 70)
    try:
        src = Path(item.source)
        if not src.exists():
            raise UsageError(f"'{item.source}' does not exist.")
        res.options_hash = _options_hash(item)
        why = ""
        if not force and Path(item.destination).exists():  # only then is the hash needed now
            res.source_sha256 = _sha256(src)
            journal = {os.path.abspath(item.destination): journal_entry} if journal_entry \
                else {}
            why = _already_done(item, journal, res.source_sha256, res.options_hash)
        if why:
            res.status, res.exit_code, res.message = "skipped", 0, why
            return res
        o = item.option_dict()
        dst = Path(item.destination)
        if not (o.get("max_shard_size") or dst.suffix == "" or str(item.destination).endswith(
                "/")):
            dst.parent.mkdir(parents=True, exist_ok=True)
        report = convert(src, dst, target=item.layout, overwrite=overwrite or force,
                         verify=verify, allow_global=allow_global, **o)
        res.status, res.exit_code = "converted", 0
        res.keys_written, res.bytes_written = report.keys_written, report.bytes_written
        res.transposed = len(report.plan.transposed)
        res.verified = bool(report.verification and report.verification.equivalent)
        if report.source_sha256:
            res.source_sha256 = report.source_sha256
        res.message = "; ".join(report.warnings)
        if page:
            from .verify.html import conversion_section

            res.section = conversion_section(report, title=item.source)
    except ConvertError as e:
        res.exit_code, res.message = e.exit_code, str(e)
        if page and isinstance(e, NotEquivalentError) and e.conversion is not None:
            from .verify.html import conversion_section

            res.section = conversion_section(e.conversion, title=item.source)
    except Exception as e:  # noqa: BLE001 - one bad item must not stop the batch
        res.exit_code, res.message = 70, f"internal error ({type(e).__name__}: {e})"
    finally:
        res.seconds = time.perf_counter() - start
    return res


# --- the journal ----------------------------------------------------------------------------

def journal_path(item: Item, out_dir: Path | None) -> Path:
    return (out_dir or Path(item.destination).parent) / JOURNAL


def read_journals(items: Sequence[Item], out_dir: Path | None) -> dict[str, dict[str, Any]]:
    """DST (absolute) -> its latest journal entry, from every journal the items use."""
    entries: dict[str, dict[str, Any]] = {}
    for path in {journal_path(it, out_dir) for it in items}:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        for line in lines:
            try:
                entry = json.loads(line)
                entries[os.path.abspath(entry["destination"])] = entry
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line from a killed run
    return entries


def append_journal(path: Path, res: ItemResult) -> None:
    """One line per finished item; O_APPEND and one write, so concurrent batches interleave
    whole lines."""
    line = json.dumps({"source": res.source, "destination": res.destination,
                       "direction": res.direction, "source_sha256": res.source_sha256,
                       "options_hash": res.options_hash, "time": time.time()}) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o666)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # the journal only saves work; provenance still lets a rerun skip safetensors


# --- the batch ------------------------------------------------------------------------------

def default_jobs() -> int:
    """The CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def run_batch(items: list[Item], *, jobs: int | None = None, out_dir: Path | None = None,
              force: bool = False, overwrite: bool = False, fail_fast: bool = False,
              verify: bool = True, allow_global: tuple[str, ...] = (), shard: str = "",
              on_result: Callable[[ItemResult], None] | None = None,
              page: bool = False) -> BatchReport:
    """Convert ITEMS with JOBS worker processes; ON_RESULT sees each result as it finishes;
    with PAGE each result keeps its verdict-page section."""
    jobs = jobs or default_jobs()
    report = BatchReport(shard=shard, jobs=jobs)
    start = time.perf_counter()
    journal = read_journals(items, out_dir)

    def finish(res: ItemResult) -> None:
        if res.status == "converted":
            append_journal(journal_path(Item(res.source, res.destination, res.direction),
                                        out_dir), res)
        report.items.append(res)
        if on_result is not None:
            on_result(res)

    args = [(it, journal.get(os.path.abspath(it.destination)), force, overwrite, verify,
             allow_global, page) for it in items]
    if jobs == 1 or len(items) <= 1:
        for a in args:
            res = run_item(*a)
            finish(res)
            if fail_fast and res.exit_code:
                break
    else:
        _run_pool(args, jobs, fail_fast, finish)
    report.seconds = time.perf_counter() - start
    order = {it.source: i for i, it in enumerate(items)}
    report.items.sort(key=lambda r: order.get(r.source, 0))
    return report


def _init_worker(threads: int, parent: int) -> None:
    """Each worker gets its share of the CPUs: JOBS workers with torch's default thread count
    would oversubscribe the cores and spin (measured: +50% CPU time, no speed-up)."""
    die_with(parent)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for a torch imported later in the worker
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def _run_pool(args: list[tuple], jobs: int, fail_fast: bool,
              finish: Callable[[ItemResult], None]) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    # fork, and let each worker import torch on a thread once its first item is streamed (1.4 s
    # that overlap that item's fsync and hash, instead of a serial import here). Only an
    # initialised CUDA in this process makes fork unsafe: then spawn.
    torch = sys.modules.get("torch")
    cuda_live = torch is not None and torch.cuda.is_initialized()
    method = "fork" if hasattr(os, "fork") and not cuda_live else "spawn"
    ctx = multiprocessing.get_context(method)
    pending = list(args)
    threads = max(1, default_jobs() // jobs)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init_worker,
                             initargs=(threads, os.getpid())) as pool:
        running = {}
        stop = False
        try:
            while pending or running:
                while pending and len(running) < jobs and not stop:
                    a = pending.pop(0)
                    running[pool.submit(run_item, *a)] = a[0]
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    item = running.pop(fut)
                    try:
                        res = fut.result()
                    except BrokenProcessPool:
                        res = ItemResult(item.source, item.destination, item.direction,
                                         "failed", 70, "its worker process died (killed?); "
                                         "no DST was published; rerun the batch to retry it")
                    finish(res)
                    if fail_fast and res.exit_code:
                        stop = True
                if stop:
                    for fut in running:
                        fut.cancel()
                    pending.clear()
        except KeyboardInterrupt:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def batch(sources: Sequence[str | Path] = (), *, manifest: str | Path | None = None,
          direction: str | None = None, out_dir: str | Path | None = None,
          jobs: int | None = None, shard: str | None = None, force: bool = False,
          overwrite: bool = False, fail_fast: bool = False, verify: bool = True,
          allow_global: Sequence[str] = (),
          on_result: Callable[[ItemResult], None] | None = None,
          on_plan: Callable[[int], None] | None = None, html: str | Path | None = None,
          **options: Any) -> BatchReport:
    """Convert many checkpoints (see `linconvert batch --help`); returns the BatchReport.

    `options` are the selection options applied to every item (`layers`, `rules`, `preset`,
    ...); manifest rows may add their own. HTML names a verdict page to write: one row per
    item, linking to the item's own section (its plan and verification).
    """
    unknown = set(options) - set(_ITEM_OPTIONS)
    if unknown:
        raise UsageError(f"batch() got unknown option(s): {', '.join(sorted(unknown))}.")
    if not sources and manifest is None:
        raise UsageError("batch needs inputs (paths, globs, folders) or --manifest FILE.")
    if jobs is not None and jobs < 1:
        raise UsageError("--jobs must be at least 1.")
    out = Path(out_dir) if out_dir is not None else None
    items = plan_items([str(s) for s in sources], manifest=Path(manifest) if manifest else None,
                       direction=direction, out_dir=out, options=options)
    if not items:
        given = ", ".join(f"'{s}'" for s in sources[:5]) or f"manifest '{manifest}'"
        raise UsageError(f"batch found no checkpoint to convert in {given}; name .pt, "
                         ".safetensors or index files, folders holding them, or globs that "
                         "match some.")
    parsed = parse_shard(shard)
    items = select_shard(items, parsed)
    if on_plan is not None:
        on_plan(len(items))
    if options.get("rules") or any(it.option_dict().get("rules") for it in items):
        for it in items:  # a bad rules file is a usage error before any work
            if it.option_dict().get("rules"):
                from .selection import load_rules

                load_rules(Path(it.option_dict()["rules"]))
    report = run_batch(items, jobs=jobs, out_dir=out, force=force, overwrite=overwrite,
                       fail_fast=fail_fast, verify=verify, allow_global=tuple(allow_global),
                       shard=shard or "", on_result=on_result, page=html is not None)
    if html is not None:
        write_batch_page(Path(html), report, sources, manifest=manifest, direction=direction,
                         out_dir=out_dir, jobs=jobs, shard=shard, force=force,
                         overwrite=overwrite, fail_fast=fail_fast, verify=verify, html=html,
                         **options)
    return report


def write_batch_page(path: Path, report: BatchReport, sources: Sequence[str | Path],
                     **options: Any) -> None:
    """The batch's verdict page: one row per item, each linking to its own section."""
    from .report import render_batch_summary
    from .verify.html import command_line, write_html

    sections = [r.section or {"title": r.source, "ok": not r.exit_code,
                              "verdict": f"{r.status}: {r.message or 'no verification ran'}",
                              "facts": [("source", r.source), ("destination", r.destination),
                                        ("direction", r.direction)],
                              "warnings": [], "plan": None, "verification": None}
                for r in report.items]
    verdict = render_batch_summary(report).removeprefix("linconvert: ")
    write_html(path, sections, command=command_line("batch", *sources, **options),
               batch={"ok": report.exit_code == 0, "verdict": verdict,
                      "items": [r.to_dict() for r in report.items]})

