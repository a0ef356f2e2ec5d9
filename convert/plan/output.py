"""The output plan: where DST is, in which format, every file it consists of, and refusals.

Everything here is decided from names, sizes and the file system's state before any tensor
byte is read, so `--dry-run` refuses exactly what the real run would (same exit code) and
names every file the real run writes. No torch here.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import CHECKPOINT_SUFFIXES, PT_SUFFIXES, SAFETENSORS_SUFFIX, source_kind
from ..dtypes import DTYPES, nbytes_of
from ..errors import OutputError, UsageError
from ..formats import dcp_folder
from ..layout import Layout
from ..provenance import METADATA_KEY
from ..selection import bias_key
from .entries import FilePlan, OutputPlan, Plan

DEFAULT_MAX_SHARD_SIZE = 5_000_000_000
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_FORMAT_OF_SUFFIX = {SAFETENSORS_SUFFIX: "safetensors", ".onnx": "onnx",
                     **{s: "pt" for s in PT_SUFFIXES}}
_SHARD_GLOB = "-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9].safetensors"


def parse_size(text: str | int) -> int:
    """Bytes from `5GB`, `300KB` (decimal, as huggingface_hub) or `2GiB`."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    unit = m[2].upper() if m else ""
    if unit in ("K", "M", "G", "T"):
        unit += "B"
    if not m or unit not in _UNITS or float(m[1]) <= 0:
        raise UsageError(f"--max-shard-size '{text}' is not a size; write e.g. 5GB or 300MB.")
    return int(float(m[1]) * _UNITS[unit])


@dataclass(frozen=True)
class Output:
    """DST as the user asked for it: a `.safetensors` file, a sharded set, `.pt` or `.onnx`."""

    path: Path
    format: str  # "safetensors", "pt" or "onnx"
    overwrite: bool = False
    max_shard_size: int | None = None  # set: sharded safetensors
    folder: bool = False  # path is a folder: Hugging Face names inside it


def _strip_layout(stem: str) -> str:
    for tag in (".linear", ".param"):
        if stem.endswith(tag):
            return stem[: -len(tag)]
    return stem


def resolve_output(src: Path, dst: Path | str | None, target: Layout, *, fmt: str | None = None,
                   max_shard_size: str | int | None = None, overwrite: bool = False) -> Output:
    """Where a conversion writes, per DESIGN.md's rules for DST, and in which format."""
    if fmt is not None and fmt not in ("safetensors", "pt", "onnx"):
        raise UsageError(f"--format '{fmt}' is not one of safetensors, pt, onnx.")
    shard = parse_size(max_shard_size) if max_shard_size is not None else None
    src_kind = source_kind(src)
    if dst is None:
        if src_kind == "dcp":  # read-only: a file beside the folder, safetensors unless --format
            folder = dcp_folder(src)
            suffix = {"pt": ".pt", "onnx": ".onnx"}.get(fmt or "", SAFETENSORS_SUFFIX)
            dst_path = folder.parent / f"{_strip_layout(folder.name)}.{target}{suffix}"
        elif src_kind in ("folder", "index"):
            base = src if src_kind == "folder" else src.parent
            if fmt == "pt":
                raise UsageError(f"a folder source '{src}' is written as a sharded safetensors "
                                 "folder; name a .pt file with -o to write one file.")
            return Output(base.parent / f"{_strip_layout(base.name)}.{target}", "safetensors",
                          overwrite, shard or DEFAULT_MAX_SHARD_SIZE, folder=True)
        else:
            suffix = src.suffix.lower() if src.suffix.lower() in CHECKPOINT_SUFFIXES else ""
            if fmt:
                suffix = {"safetensors": SAFETENSORS_SUFFIX, "onnx": ".onnx"}.get(fmt) or (
                    suffix if suffix in PT_SUFFIXES else ".pt")
            suffix = suffix or SAFETENSORS_SUFFIX
            stem = src.name[: -len(src.suffix)] if src.suffix else src.name
            stem = _strip_layout(stem.removesuffix(".weights") if src.suffix.lower() == ".h5"
                                 else stem)
            dst_path = src.parent / f"{stem}.{target}{suffix}"
    else:
        text = os.fspath(dst)
        dst_path = Path(text)
        if text == "-":
            raise UsageError("DST '-' (standard output) is not supported; name a file.")
        if text.endswith(("/", os.sep)) or dst_path.is_dir() or not dst_path.suffix:
            if fmt == "pt":
                raise UsageError(f"-o '{text}' is a folder, which holds sharded safetensors; "
                                 "name a .pt file to write pt.")
            return Output(dst_path, "safetensors", overwrite, shard or DEFAULT_MAX_SHARD_SIZE,
                          folder=True)
        suffix = dst_path.suffix.lower()
        if suffix not in _FORMAT_OF_SUFFIX:
            raise UsageError(f"-o '{text}' has an unknown suffix '{dst_path.suffix}'; use "
                             ".safetensors, .pt/.pth/.bin, .onnx, or a folder.")
        if fmt and fmt != _FORMAT_OF_SUFFIX[suffix]:
            raise UsageError(f"--format {fmt} contradicts -o '{text}'; drop one of them.")
    out_fmt = _FORMAT_OF_SUFFIX[dst_path.suffix.lower()]
    if shard is not None and out_fmt != "safetensors":
        raise UsageError("--max-shard-size applies to safetensors output only.")
    return Output(dst_path, out_fmt, overwrite, shard)


def split_shards(sizes: list[int], max_size: int) -> list[list[int]]:
    """Indices grouped into shards of at most MAX_SIZE bytes (a bigger tensor gets its own)."""
    shards: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, n in enumerate(sizes):
        if current and total + n > max_size:
            shards.append(current)
            current, total = [], 0
        current.append(i)
        total += n
    if current or not shards:
        shards.append(current)
    return shards


def shard_names(output: Output, n: int) -> tuple[list[Path], Path]:
    """Hugging Face's names for N shards and their index."""
    folder, stem = _folder_and_stem(output)
    names = [folder / f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return names, folder / f"{stem}.safetensors.index.json"


def _folder_and_stem(output: Output) -> tuple[Path, str]:
    if output.folder:
        return output.path, "model"
    return output.path.parent, output.path.name.removesuffix(".safetensors")


@dataclass(frozen=True)
class SourceFacts:
    """What the output planner needs to know about the source (no tensor data)."""

    path: Path
    files: tuple[Path, ...]
    specs: dict[str, Any]  # key -> spec with .shape and .dtype
    non_tensors: tuple[str, ...] = ()
    extras: tuple[str, ...] = ()
    metadata: tuple[tuple[str, str], ...] = ()
    folder: Path | None = None
    keeps_extras: bool = True  # a .pt output keeps the extras (torch.save sources)


def source_facts(ckpt: Any) -> SourceFacts:
    """The facts of an opened checkpoint (a `convert.checkpoint.Checkpoint`)."""
    meta = getattr(ckpt, "metadata", {}) or {}
    return SourceFacts(ckpt.path, tuple(ckpt.files), dict(ckpt.specs),
                       tuple(map(str, getattr(ckpt, "non_tensors", {}))),
                       tuple(getattr(ckpt, "extras", ()) or ()),
                       tuple((k, v) for k, v in meta.items() if k != METADATA_KEY),
                       getattr(ckpt, "folder", None), getattr(ckpt, "keeps_extras", True))


def plan_output(plan: Plan, source: SourceFacts, output: Output, *, whole_model: bool = False,
                external_data: bool = False, opset: int | None = None) -> Plan:
    """PLAN with its output plan: every file, the shard of every key, and every refusal that
    needs no tensor data.

    Raises:
        UsageError: DST is SRC; a tensor or entry the format cannot hold; an ONNX graph with no
            layer to hold, or two layers of one name; an opset onnxruntime cannot run.
        OutputError: DST exists without --overwrite; its folder does not exist; a folder DST
            holds another checkpoint's index.
    """
    _refuse_same_path(source, output)
    notes: list[str] = []
    if output.format == "safetensors":
        files = _safetensors_files(plan, source, output)
        if source.extras:
            notes.append(_extras_note(source, "safetensors"))
    elif output.format == "pt":
        files = (FilePlan(output.path, "tensors", tuple(e.key for e in plan.entries),
                          _total(plan.entries)),)
        if source.extras and not source.keeps_extras:
            notes.append(_extras_note(source, ".pt"))
    else:
        if opset is not None:
            from ..formats.onnx import check_opset

            check_opset(opset)
        files, external, more = _onnx_files(plan, source, output, whole_model, external_data)
        notes += more
        external_data = external
    meta: tuple[tuple[str, str], ...] = ()
    if output.format == "safetensors":
        meta = (*source.metadata, ("format", "pt"))
    side = _side_files(source, output) if output.folder else ()
    out = OutputPlan(output.format, output.path, files, output.overwrite, output.folder,
                     output.max_shard_size, meta, external_data,
                     ("model" if whole_model else "layers") if output.format == "onnx" else "",
                     side, tuple(notes))
    _refuse_existing(out, output)
    return dataclasses.replace(plan, output=out, warnings=(*plan.warnings, *notes))


def _extras_note(source: SourceFacts, written: str) -> str:
    """The note that a training checkpoint's entries beside its state dict are left out."""
    shown = ", ".join(repr(e) for e in source.extras[:6])
    more = f" and {len(source.extras) - 6} more" if len(source.extras) > 6 else ""
    fix = (" (write .pt to keep them)" if source.keeps_extras
           else "; linconvert converts this format's state dict only")
    return (f"'{source.path}' is a training checkpoint; its entries {shown}{more} are not kept "
            f"in {written}{fix}.")


def _total(entries: Any) -> int:
    return sum(nbytes_of(e.dtype, e.shape) for e in entries)


def _refuse_same_path(source: SourceFacts, output: Output) -> None:
    src = source.path
    same = os.path.abspath(src) == os.path.abspath(output.path) or _same_file(src, output.path)
    if same or any(_same_file(f, output.path) for f in source.files):
        raise UsageError(f"SRC and DST are the same path '{src}'; linconvert never replaces its "
                         "source: name another DST with -o.")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _safetensors_files(plan: Plan, source: SourceFacts,
                       output: Output) -> tuple[FilePlan, ...]:
    bad = [e for e in plan.entries if e.dtype not in DTYPES]
    if bad:
        raise UsageError(f"'{bad[0].source}' is {bad[0].dtype}, which safetensors cannot store; "
                         "write .pt instead, or --drop it.")
    if source.non_tensors:
        raise UsageError(f"the state dict of '{source.path}' holds non-tensor entries "
                         f"({', '.join(map(repr, source.non_tensors[:5]))}) that safetensors "
                         "cannot store; write .pt instead.")
    entries = plan.entries
    if output.max_shard_size is None:
        return (FilePlan(output.path, "tensors", tuple(e.key for e in entries),
                         _total(entries)),)
    groups = split_shards([nbytes_of(e.dtype, e.shape) for e in entries], output.max_shard_size)
    paths, index = shard_names(output, len(groups))
    files = [FilePlan(p, "tensors", tuple(entries[i].key for i in g),
                      _total(entries[i] for i in g)) for g, p in zip(groups, paths)]
    files.append(FilePlan(index, "index", tuple(e.key for e in entries), _total(entries)))
    for f in paths:
        if any(_same_file(s, f) for s in source.files):
            raise UsageError(f"shard '{f}' would replace a file of SRC '{source.path}'; "
                             "linconvert never replaces its source: name another DST with -o.")
    return tuple(files)


def onnx_layers(plan: Plan) -> list[Any]:
    """The ONNX layer graph's layers: one per converted weight, with its bias where the source
    has one (formats.onnx.OnnxLayer values)."""
    from ..formats.onnx import OnnxLayer

    target_of = {e.source: e.key for e in plan.entries}
    shapes = {e.source: e.source_shape for e in plan.entries}
    layers = []
    for e in plan.layer_weights:
        if len(e.shape) != 2:  # a stack of experts has no one-node ONNX form here
            continue
        prefix, _, _ = e.key.rpartition(".")
        out_f, in_f = e.shape if plan.layout is Layout.LINEAR else e.shape[::-1]
        bias = None
        b = bias_key(e.source, shapes)
        if b is not None and shapes[b] == (out_f,):
            bias = target_of[b]
        layers.append(OnnxLayer(prefix or e.key, e.key, bias, plan.layout.value, in_f, out_f,
                                e.dtype))
    return layers


def _onnx_files(plan: Plan, source: SourceFacts, output: Output, whole_model: bool,
                external_data: bool) -> tuple[tuple[FilePlan, ...], bool, list[str]]:
    from ..formats.onnx import EXTERNAL_THRESHOLD, data_name, elem_type

    notes = []
    if whole_model:
        keys = tuple(e.key for e in plan.entries)
    else:
        layers = onnx_layers(plan)
        if not layers:
            raise UsageError(f"no converted linear layer in '{source.path}' to put in an ONNX "
                             "graph.")
        names = [x.name for x in layers]
        if len(set(names)) != len(names):
            raise UsageError("two converted weights share a layer name in the ONNX graph; "
                             "rename them apart with --rename.")
        held = {k for x in layers for k in (x.weight, x.bias) if k}
        keys = tuple(e.key for e in plan.entries if e.key in held)
        left_out = [e.key for e in plan.entries if e.key not in held]
        if left_out:
            shown = ", ".join(f"'{k}'" for k in left_out[:6])
            more = f" and {len(left_out) - 6} more" if len(left_out) > 6 else ""
            notes.append(
                f"the ONNX layer graph holds the converted linear layers only; {shown}{more} "
                "have no node to run and are not in it (write safetensors for the checkpoint, "
                "or pass --model and --input-shape to export the whole model).")
    held_keys = set(keys)
    for e in plan.entries:
        if e.key in held_keys:
            elem_type(e.dtype, e.key)
    if source.non_tensors:
        notes.append(f"ONNX holds tensors only: the non-tensor entries "
                     f"{', '.join(map(repr, source.non_tensors[:5]))} of '{source.path}' are "
                     "not in it.")
    held_entries = [e for e in plan.entries if e.key in held_keys]
    total = _total(held_entries)
    external = external_data or total > EXTERNAL_THRESHOLD
    files = []
    if external:
        files.append(FilePlan(output.path.parent / data_name(output.path), "external data",
                              keys, total))
    files.append(FilePlan(output.path, "graph", () if external else keys,
                          0 if external else total))
    return tuple(files), external, notes


def _side_files(source: SourceFacts, output: Output) -> tuple[tuple[Path, Path], ...]:
    """A folder source's other files (config.json, tokenizer files), copied beside the output;
    one that exists there is kept unless --overwrite."""
    if source.folder is None:
        return ()
    skip = {p.resolve() for p in source.files}
    out = []
    for p in sorted(source.folder.iterdir()):
        if (not p.is_file() or p.name.startswith(".") or p.resolve() in skip
                or p.name.endswith(".index.json") or p.suffix.lower() in CHECKPOINT_SUFFIXES):
            continue
        dst = output.path / p.name
        if dst.exists() and not output.overwrite:
            continue
        out.append((p, dst))
    return tuple(out)


def _refuse_existing(out: OutputPlan, output: Output) -> None:
    if out.sharded:
        folder, stem = _folder_and_stem(output)
        if folder.is_dir():
            ours = f"{stem}.safetensors.index.json"
            others = sorted(p.name for p in folder.glob("*.index.json") if p.name != ours)
            if others and output.folder:
                raise OutputError(f"folder '{folder}' holds another checkpoint's index "
                                  f"'{others[0]}'; writing '{ours}' beside it would make the "
                                  "folder ambiguous: choose an empty folder with -o.")
            existing = [folder / ours] + sorted(folder.glob(f"{stem}{_SHARD_GLOB}"))
        else:
            existing = []
    else:
        existing = [f.path for f in out.files]
        if out.format == "onnx":  # a stale data file beside a new model would mislead too
            from ..formats.onnx import data_name

            existing.append(output.path.parent / data_name(output.path))
    existing = [p for p in existing if p.exists()]
    if existing and not output.overwrite:
        raise OutputError(f"'{existing[0]}' exists; pass --overwrite to replace it, or choose "
                          "another DST with -o.")
    parent = output.path if output.folder else output.path.parent
    if not output.folder and not parent.is_dir():
        raise OutputError(f"cannot write '{output.path}': folder '{parent}' does not exist.")
