"""Runs a plan: each entry's pieces from a Source into a Sink, the one place tensors change.

A transpose is byte work and needs no torch: it permutes whole-byte elements whatever the float
dtype, so it runs in numpy on unsigned views of the element width, 16 source rows at a time
(on a 1024 x 4096 float32 matrix here: 6.7 ms, against 13 ms in 64 x 64 tiles and 18 ms for
one strided copy or torch's `.t().contiguous()`). Untouched tensors the
Source can hand over as a file range go to the Sink as a copy, never decoded. The source's
SHA-256 is computed on a second thread while streaming; the Sink patches it into provenance at
the end. `.pt` output is streamed too, in torch.save's own format (formats/pt_writer.py): the
pickle first, from shapes alone, then each storage's bytes by the same loop; a training
checkpoint's extras (an EMA copy, optimizer moments) are transposed one tensor at a time as
their records are written.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from . import __version__
from .checkpoint import Checkpoint
from .digest import SourceHash, hash_files
from .dtypes import DTYPES, nbytes_of, swapped
from .formats import safetensors as st
from .formats.atomic import output_error, partial_path
from .formats.safetensors import read_range
from .formats.torch_pt import TorchSource
from .plan import Plan
from .plan.entries import by_member
from .provenance import METADATA_KEY, SHA_PLACEHOLDER, Provenance

STRIP = 16  # source rows per step: each writes one 64-byte line per output row (float32)
_UINT = {1: "u1", 2: "<u2", 4: "<u4", 8: "<u8"}


@dataclass
class ExecutionResult:
    """What was written."""

    files: list[Path]
    keys_written: int
    bytes_written: int
    source_sha256: str
    seconds: float
    warnings: list[str] = field(default_factory=list)
    verification: Any = None  # the VerifyReport of a verified ONNX write


def transpose_bytes(src: Any, rows: int, cols: int, itemsize: int, out: bytearray) -> memoryview:
    """The bytes of the cols x rows transpose of SRC (rows x cols elements of ITEMSIZE bytes)."""
    import numpy as np

    n = rows * cols * itemsize
    if n == 0:  # an empty matrix (2**40 x 0 too): nothing to move, and no 2**34 empty tiles
        return memoryview(out)[:0]
    a = np.frombuffer(src, dtype=np.uint8, count=n).view(_UINT[itemsize]).reshape(rows, cols)
    b = np.frombuffer(out, dtype=np.uint8, count=n).view(_UINT[itemsize]).reshape(cols, rows)
    for i in range(0, rows, STRIP):  # 1.5-2.5x faster here than 64 x 64 tiles, any width
        b[:, i:i + STRIP] = a[i:i + STRIP, :].T
    return memoryview(out)[:n]


def provenance_for(plan: Plan, ckpt: Checkpoint, sha: str = SHA_PLACEHOLDER) -> Provenance:
    """The record a safetensors or ONNX output carries."""
    return Provenance(
        layout=plan.layout,
        keys={e.key: (e.source, e.transpose) for e in plan.entries},
        pieces={e.key: tuple(p.record for p in e.pieces)
                for e in plan.entries
                if len(e.pieces) > 1 or e.pieces[0].index is not None or e.pieces[0].rows},
        dropped=plan.dropped,
        source_name=ckpt.path.name,
        source_sha256=sha,
        options_hash=plan.options_hash,
        tool_version=__version__,
        tied=plan.tied,
        operation=plan.operation,
    )


BeforeCommit = Callable[[list[Path]], None]


Progress = Callable[[int, int], None]  # (bytes done, bytes in all)


class Watcher(Protocol):
    """Follows a safetensors output while it is written (a verifier in another process)."""

    def begin(self, paths: list[Path]) -> None:
        """The files being written, under their temporary names; their headers are written."""

    def written(self, file: int, size: int) -> None:
        """FILE (an index into the paths) now holds its first SIZE bytes."""


def apply_plan(plan: Plan, ckpt: Checkpoint, before_commit: BeforeCommit | None = None, *,
               progress: Progress | None = None,
               streamed: Callable[[], None] | None = None,
               watcher: Watcher | None = None) -> ExecutionResult:
    """Write what PLAN says (its entries, into the files of its output plan), tensor by tensor;
    publish them only when complete.

    BEFORE_COMMIT, if given, gets the fsynced temporary files (in output order) and may raise
    to stop the publication (verify-after-convert); nothing is left behind then. PROGRESS, if
    given, hears the bytes written after each tensor. STREAMED, if given, is called once every
    tensor is written, before the files are finished and fsynced (verification starts its
    import of torch there: earlier, the import's hold on the GIL slows the streaming loop).
    WATCHER, if given, hears of a safetensors output's files as they grow.

    Raises:
        CorruptInputError: the source changed or could not be read.
        OutputError: the destination could not be written.
    """
    if plan.output is None:
        raise RuntimeError("apply_plan needs a plan with its output planned (plan_output)")
    start = time.perf_counter()
    if plan.output.format == "pt":
        result = _write_pt(plan, ckpt, before_commit, progress, streamed)
    else:
        result = _write_safetensors(plan, ckpt, before_commit, progress, streamed, watcher)
    if plan.output.side_files:
        copy_side_files(plan.output.side_files)
    result.seconds = time.perf_counter() - start
    return result


def stream_entries(plan: Plan, ckpt: Checkpoint, sink: Any,
                   progress: Progress | None = None) -> None:
    """The one loop: each entry's pieces from the source into the sink, transposed where the
    piece says; untouched ones the source can hand over as a file range are copied."""
    largest = max((_member_bytes(e.dtype, p.shape) for e in plan.entries for p in e.pieces
                   if p.transpose), default=0)
    inbuf, outbuf = bytearray(largest), bytearray(largest)
    total = sum(nbytes_of(e.dtype, e.shape) for e in plan.entries) if progress else 0
    done = 0
    for e in plan.entries:
        if progress is not None:
            progress(done, total)
            done += nbytes_of(e.dtype, e.shape)
        if e.pieces[0].rows is not None:  # a split's part or a merge: join, then write (a
            for group in by_member(e.pieces):  # merge into a stack: member by member)
                sink.write(e.key, _joined(group, e.dtype, e.transpose, ckpt))
            continue
        for piece in e.pieces:  # one, or the members of a stack in order
            _stream_piece(e.key, e.dtype, piece, ckpt, sink, inbuf, outbuf)
    if progress is not None:
        progress(total, total)


def _joined(pieces: Sequence[Any], dtype: str, transpose: bool, ckpt: Checkpoint) -> memoryview:
    """The bytes of row ranges of fused or part tensors: the ranges joined along the sources'
    output dim, then transposed where the entry says (one part, or one fused tensor, in memory:
    never more than the tensor being written and its source)."""
    import numpy as np

    itemsize = DTYPES[dtype].itemsize
    blocks = []
    for p in pieces:
        shape = p.shape if p.index is None else p.shape[1:]
        start = 0 if p.index is None else p.index * nbytes_of(dtype, shape)
        if len(shape) <= 2 and (p.axis == -2 or len(shape) == 1):
            # rows of a matrix (a linear-layout source) or a range of a vector lie together:
            # read just them
            row = nbytes_of(dtype, shape[1:]) if len(shape) == 2 else itemsize
            length = (p.rows[1] - p.rows[0]) * row
            raw = ckpt.read_part(p.source, start + p.rows[0] * row, length, bytearray(length))
            part = (p.rows[1] - p.rows[0], *shape[1:])
            blocks.append(np.frombuffer(raw, dtype=np.uint8, count=length)
                          .view(_UINT[itemsize]).reshape(part))
            continue
        if p.index is None:
            raw = ckpt.read_bytes(p.source, bytearray(nbytes_of(dtype, p.shape)))
        else:  # one member of a stack: its bytes only
            size = nbytes_of(dtype, shape)
            raw = ckpt.read_part(p.source, start, size, bytearray(size))
        arr = np.frombuffer(raw, dtype=np.uint8).view(_UINT[itemsize]).reshape(shape)
        cut = [slice(None)] * arr.ndim
        cut[p.axis] = slice(*p.rows)
        blocks.append(arr[tuple(cut)])
    out = np.concatenate(blocks, axis=pieces[0].axis)
    if transpose:
        out = np.swapaxes(out, -1, -2)
    return memoryview(np.ascontiguousarray(out).reshape(-1).view(np.uint8))


def _stream_piece(key: str, dtype: str, piece: Any, ckpt: Checkpoint, sink: Any,
                  inbuf: bytearray, outbuf: bytearray) -> None:
    """One piece: the whole source tensor, or member INDEX of a source stack; a transposed
    piece goes matrix by matrix, so no more than one expert is in memory."""
    shape = piece.shape if piece.index is None else piece.shape[1:]
    start = 0 if piece.index is None else piece.index * nbytes_of(dtype, shape)
    length = nbytes_of(dtype, shape)
    if piece.transpose:
        rows, cols = shape[-2:]
        matrix = _member_bytes(dtype, shape)
        for m in range(_members(shape)):
            data = ckpt.read_part(piece.source, start + m * matrix, matrix, inbuf)
            sink.write(key, transpose_bytes(data, rows, cols, DTYPES[dtype].itemsize, outbuf))
        ckpt.release(piece.source)
        return
    loc = ckpt.raw_range(piece.source)
    if loc is not None:
        sink.copy(key, loc[0], loc[1] + start, length)
    elif piece.index is None:
        sink.write(key, memoryview(ckpt.read_bytes(piece.source, inbuf)))
        ckpt.release(piece.source)
    else:
        sink.write(key, memoryview(ckpt.read_part(piece.source, start, length,
                                                  bytearray(length))))


def _members(shape: tuple[int, ...]) -> int:
    """How many matrices a weight of SHAPE holds (1 for a matrix; E for an [E, r, c] stack)."""
    n = 1
    for d in shape[:-2]:
        n *= d
    return n


def _member_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    return nbytes_of(dtype, tuple(shape[-2:]))


def _write_safetensors(plan: Plan, ckpt: Checkpoint, before_commit: BeforeCommit | None,
                       progress: Progress | None = None,
                       streamed: Callable[[], None] | None = None,
                       watcher: Watcher | None = None) -> ExecutionResult:
    out = plan.output
    assert out is not None
    by_key = {e.key: e for e in plan.entries}
    files = [(f.path, [(k, by_key[k].dtype, by_key[k].shape) for k in f.keys])
             for f in out.tensor_files]
    if out.folder:
        out.path.mkdir(parents=True, exist_ok=True)
    base = dict(out.metadata)

    def metadata_for(prov: Provenance) -> Callable[[list[str]], dict[str, str]]:
        return lambda keys: {**base, METADATA_KEY: prov.to_json(keys)}

    hasher = hash_sources(ckpt)
    total = sum(nbytes_of(e.dtype, e.shape) for e in plan.entries)
    # Direct I/O where no verification reads the files back now: from the page cache that is
    # a memory copy; from the disk, past it, it was slower than the page cache saved (the
    # 12-layer benchmark verified: 2.6-3.5 s with direct I/O, 2.1-2.6 s without).
    with st.SafetensorsSink(files, out.index, metadata_for(provenance_for(plan, ckpt)),
                            overwrite=out.overwrite,
                            direct_io=before_commit is None and watcher is None) as sink:
        if watcher is not None:
            watcher.begin(sink.tmp_paths)
            for i, w in enumerate(sink.writers):  # each header is in its file now
                watcher.written(i, w.position)
            sink.on_written = watcher.written
        stream_entries(plan, ckpt, sink, progress)
        if streamed is not None:
            streamed()
        sink.sync_data()
        sha = hasher.result()
        staged = sink.finish(metadata_for(provenance_for(plan, ckpt, sha)))
        if before_commit is not None:
            before_commit(staged)
        sink.commit(total)
    return ExecutionResult([f.path for f in out.files], len(plan.entries), total, sha, 0.0, [])


def copy_side_files(pairs: Sequence[tuple[Path, Path]]) -> None:
    """Copy a folder source's other files (config.json, tokenizer files) beside the output."""
    for src, dst in pairs:
        tmp = partial_path(dst)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise output_error(dst, e) from e


# --- .pt ------------------------------------------------------------------------------------

def _write_pt(plan: Plan, ckpt: Checkpoint, before_commit: BeforeCommit | None,
              progress: Progress | None = None,
              streamed: Callable[[], None] | None = None) -> ExecutionResult:
    """torch.save's format, streamed: data.pkl from the plan, then each storage's record."""
    from .formats.pt_writer import PtWriter, pickle_checkpoint

    output = plan.output
    assert output is not None
    hasher = hash_sources(ckpt)
    root, warnings = _pt_root(plan, ckpt)
    data, records = pickle_checkpoint(root, _torch() if isinstance(ckpt, TorchSource) else None)
    with PtWriter(output.path, overwrite=output.overwrite) as w:
        w.start(data)
        _write_records(plan, ckpt, records, w, progress)
        if streamed is not None:
            streamed()
        sha = hasher.result()
        staged = w.finish()
        if before_commit is not None:
            before_commit([staged])
        w.commit(sync=False)
    total = sum(nbytes_of(e.dtype, e.shape) for e in plan.entries)
    return ExecutionResult([output.path], len(plan.entries), total, sha, 0.0, warnings)


def _pt_root(plan: Plan, ckpt: Checkpoint) -> tuple[Any, list[str]]:
    """What torch.save would be given: the converted state dict (the source's own tensors where
    a `.pt` source's are kept, so ties and shared storages stay shared; a TensorRef where the
    plan makes the bytes), in its place in a training checkpoint, beside its extras."""
    from .formats import torch_pt

    is_torch = isinstance(ckpt, TorchSource)
    new_sd: dict[str, Any] = {}
    done: dict[str, Any] = {}
    tie_of = {k: g[0] for g in plan.tied for k in g}
    for e in plan.written:
        if _restructured(e):
            new_sd[e.key] = _planned_tensor(e, ckpt)
            continue
        head = tie_of.get(e.source)
        if head is not None and head in done:
            new_sd[e.key] = done[head]
            continue
        t = ckpt.tensor(e.source) if is_torch and not e.transpose else _planned_tensor(e, ckpt)
        new_sd[e.key] = t
        if head is not None:
            done[head] = t
    if not is_torch:
        return new_sd, []
    for k, v in ckpt.non_tensors.items():
        new_sd[plan_target(plan, k)] = v
    expected = len(plan.written) + len(ckpt.non_tensors)
    if len(new_sd) != expected:
        raise RuntimeError(f"built {len(new_sd)} keys for {plan.source}, planned {expected}")
    if len(ckpt.roots) == 1 and ckpt.key_paths[0]:
        root = torch_pt.replace_at(ckpt.roots[0], ckpt.key_paths[0], new_sd)
        return _convert_extras(plan, ckpt, root, _later)
    return new_sd, []


def _restructured(e: Any) -> bool:
    """A stack, a member of one, a part of a fused tensor or a merge."""
    return len(e.pieces) > 1 or e.pieces[0].index is not None or bool(e.pieces[0].rows)


def _planned_tensor(e: Any, ckpt: Checkpoint) -> Any:
    """A TensorRef for entry E, its bytes streamed from the plan (made in memory instead for
    a dtype only torch names, which the byte loop cannot size)."""
    from .formats.pt_writer import TensorRef, storage_for, transposed_stride

    d = DTYPES.get(e.dtype)
    if d is None or d.torch_name is None:
        return _later(lambda: _assemble(e, ckpt.tensor), e.dtype, e.shape)
    return TensorRef(storage_for(d.torch_name, d.itemsize, e.shape, e), e.shape,
                     transposed_stride(e.shape) if e.transpose else ())


def _later(make: Callable[[], Any], dtype: Any, shape: tuple[int, ...]) -> Any:
    """A TensorRef whose tensor MAKE builds only when its record is written (.pt extras)."""
    from .dtypes import torch_dtype
    from .formats.pt_writer import TensorRef, storage_for

    d = dtype if not isinstance(dtype, str) else torch_dtype(dtype)
    return TensorRef(storage_for(str(d).removeprefix("torch."), d.itemsize, shape, make), shape)


def _now(make: Callable[[], Any], dtype: Any, shape: tuple[int, ...]) -> Any:
    """The tensor itself (a state dict in memory)."""
    return make()


def _write_records(plan: Plan, ckpt: Checkpoint, records: list[Any], w: Any,
                   progress: Progress | None) -> None:
    """Each storage's record, in the pickle's order: the planned entries through the one loop
    (in one pass, so its buffers are made once), and between them, as their turn comes, a
    `.pt` source's storages copied whole and extras made one at a time."""
    from .formats.pt_writer import StorageRef
    from .plan import Entry

    planned = {id(r): r.storage.source for r in records
               if isinstance(r.storage, StorageRef) and isinstance(r.storage.source, Entry)}
    sink = _RecordSink(w, records, planned, lambda r: _write_record(ckpt, r, w))
    stream_entries(replace(plan, entries=tuple(planned.values())), ckpt, sink, progress)
    sink.close()


def _write_record(ckpt: Checkpoint, r: Any, w: Any) -> None:
    """A record the plan does not stream: an extra, made now, or a `.pt` source's storage."""
    from .formats.pt_writer import StorageRef

    w.begin(f"data/{r.key}", r.nbytes)
    if isinstance(r.storage, StorageRef):
        t = r.storage.source()
        if t.numel():
            w.write(_tensor_bytes(t))
    else:
        loc = ckpt.storage_range(r.storage)  # type: ignore[attr-defined]
        if loc is not None and loc[2] is not None:
            w.copy_whole(loc[0], loc[1], r.nbytes, loc[2])
        elif loc is not None:
            w.copy(loc[0], loc[1], r.nbytes)
        elif r.nbytes:
            w.write(_tensor_bytes(r.storage))
    w.end()


def _torch() -> Any:
    import torch

    return torch


def _tensor_bytes(t: Any) -> Any:
    """The bytes of a contiguous tensor, or of a whole torch storage, without a copy."""
    import torch

    if isinstance(t, torch.Tensor):
        return t.reshape(-1).view(torch.uint8).numpy()
    return torch.empty(0, dtype=torch.uint8).set_(t).numpy()


class _RecordSink:
    """stream_entries' sink for a `.pt` archive: each entry's bytes are its record; the records
    before it that the loop does not make (WRITE_OTHER's) are written as its turn comes."""

    def __init__(self, w: Any, records: list[Any], planned: dict[int, Any],
                 write_other: Callable[[Any], None]):
        self.w = w
        self.records = records
        self.planned = planned
        self.write_other = write_other
        self.next = 0
        self.open: str | None = None

    def _at(self, key: str) -> None:
        while self.open != key:
            self._advance(key)

    def _advance(self, key: str | None) -> None:
        if self.open is not None:
            self.w.end()
            self.open = None
        if self.next == len(self.records):
            raise RuntimeError(f"the plan streamed '{key}', which the .pt archive has no "
                               "record for")
        r = self.records[self.next]
        self.next += 1
        entry = self.planned.get(id(r))
        if entry is None:
            self.write_other(r)
            return
        self.w.begin(f"data/{r.key}", r.nbytes)
        self.open = entry.key

    def write(self, key: str, data: Any) -> None:
        self._at(key)
        self.w.write(data)

    def copy(self, key: str, fd: int, offset: int, length: int) -> None:
        self._at(key)
        self.w.copy(fd, offset, length)

    def close(self) -> None:
        """End the last record, and write the rest (and those the loop had no bytes for)."""
        while self.next < len(self.records):
            self._advance(None)
        if self.open is not None:
            self.w.end()
            self.open = None


def plan_target(plan: Plan, key: str) -> str:
    """The destination name of KEY under PLAN's renames (for entries outside the plan)."""
    from .selection import Rename

    for r in plan.selection.get("rename", []):
        key, _ = Rename(r[0], r[1]).apply(key)
    return key


def _convert_state_dict(plan: Plan, get: Any, ckpt: Checkpoint | None,
                        made: Any = _now) -> dict[str, Any]:
    """A new state dict: transposed tensors made contiguous (by MADE: now, or as a .pt
    record is written), ties kept as one tensor."""
    out: dict[str, Any] = {}
    done: dict[str, Any] = {}
    tie_of = {k: g[0] for g in plan.tied for k in g}
    for a in plan.written:
        if _restructured(a):
            out[a.target] = made(lambda a=a: _assemble(a, get), a.dtype, a.shape)
            continue
        head = tie_of.get(a.source)
        if head is not None and head in done:
            out[a.target] = done[head]
            continue
        t = get(a.source)
        if a.transpose:
            t = made(lambda t=t, a=a: _transposed(t, ckpt, a.source), t.dtype,
                     swapped(tuple(t.shape)))
        out[a.target] = t
        if head is not None:
            done[head] = t
    return out


def _transposed(t: Any, ckpt: Checkpoint | None, key: str) -> Any:
    """T with its last two dims swapped, contiguous; the source's pages released."""
    out = t.detach().transpose(-2, -1).contiguous()
    if ckpt is not None:
        ckpt.release(key)
    return out


def _assemble(entry: Any, get: Any) -> Any:
    """An entry made of several pieces (a stack of members) or of one member of a stack."""
    import torch

    def taken(p: Any) -> Any:
        t = get(p.source).detach()
        if p.index is not None:
            t = t[p.index]
        return t if p.rows is None else t.narrow(p.axis, p.rows[0], p.rows[1] - p.rows[0])

    if entry.pieces[0].rows is not None:  # a split's part or a merge: join the row ranges
        axis = entry.pieces[0].axis
        groups = [torch.cat([taken(p) for p in g], dim=axis) for g in by_member(entry.pieces)]
        out = groups[0] if entry.pieces[0].member is None else torch.stack(groups)
    else:
        parts = [taken(p) for p in entry.pieces]
        out = parts[0] if len(parts) == 1 else torch.stack(parts)
    return (out.transpose(-2, -1) if entry.transpose else out).contiguous()


def _convert_extras(plan: Plan, ckpt: TorchSource, root: Any,
                    made: Any = _now) -> tuple[Any, list[str]]:
    """EMA copies get the same plan; optimizer moments follow their weights when certain."""
    if not isinstance(root, Mapping):
        return root, []
    warnings: list[str] = []
    sd = ckpt.state_dicts[0]
    out = dict(root)
    for name, value in root.items():
        if name == ckpt.key_paths[0][0] or not isinstance(value, Mapping):
            continue
        if set(value) == set(sd) and all(
            getattr(value[k], "shape", None) == getattr(sd[k], "shape", None) for k in sd
        ):
            out[name] = ema = _convert_state_dict(plan, value.__getitem__, None, made)
            for k in ckpt.non_tensors:  # as in the state dict itself
                ema[plan_target(plan, k)] = value[k]
        elif isinstance(value.get("state"), Mapping) and isinstance(value.get("param_groups"),
                                                                     list):
            out[name], w = _convert_optimizer(plan, str(name), value, made)
            warnings += w
    return out, warnings


def _indices_from_model(plan: Plan, groups: list[Any]) -> dict[Any, str]:
    """index -> source key, when the reference model's parameters, in order, match the state
    dict's keys one to one (then the optimizer's indices are certain)."""
    if not plan.model_parameters:
        return {}
    source_of = {a.target: a.source for a in plan.written}
    params = set(plan.model_parameters)
    in_order = [a.target for a in plan.written if a.target in params]
    indices = [i for g in groups if isinstance(g, Mapping) for i in g.get("params", [])]
    if in_order != list(plan.model_parameters) or sorted(indices) != list(range(len(in_order))):
        return {}
    return {i: source_of[in_order[i]] for i in indices}


def _convert_optimizer(plan: Plan, name: str, opt: Mapping[str, Any],
                       made: Any = _now) -> tuple[Any, list[str]]:
    by_source = {a.source: a for a in plan.actions}
    transposed = {a.source: a for a in plan.transposed}
    if not transposed:
        return opt, []
    groups = opt["param_groups"]
    names: dict[Any, str] = {}
    for g in groups:
        if isinstance(g, Mapping) and "param_names" in g and "params" in g:
            names.update(zip(g["params"], g["param_names"]))
    if not names:
        names = _indices_from_model(plan, groups)
    state = opt["state"]
    if names and set(names.values()) <= set(by_source):
        new_state = {}
        for idx, entry in state.items():
            a = transposed.get(names.get(idx, ""))
            if a is not None and isinstance(entry, Mapping):
                entry = {k: (made(lambda v=v: _transposed(v, None, ""), v.dtype,
                                  swapped(tuple(v.shape)))
                             if getattr(v, "shape", None) is not None
                             and tuple(v.shape) == a.source_shape
                             else v) for k, v in entry.items()}
            new_state[idx] = entry
        new_groups = []
        for g in groups:
            g = dict(g)
            if "param_names" in g:
                g["param_names"] = [by_source[n].target or n for n in g["param_names"]]
            new_groups.append(g)
        return {**opt, "state": new_state, "param_groups": new_groups}, []
    shapes = {a.source_shape for a in transposed.values()}
    stale = [str(idx) for idx, entry in state.items() if isinstance(entry, Mapping) and any(
        tuple(getattr(v, "shape", ())) in shapes for v in entry.values())]
    if not stale:
        return opt, []
    return opt, [f"optimizer state '{name}' entries {', '.join(stale[:10])} hold moments shaped "
                 "like transposed weights but name no parameters (no param_names, and no --model "
                 "whose parameters match the keys in order), so they were kept as they are and "
                 "no longer match; re-create the optimizer after loading."]


# --- bytes for other writers (ONNX) ---------------------------------------------------------

def written_bytes(plan: Plan, ckpt: Checkpoint, keys: set[str]) -> Any:
    """Yield (entry, bytes) for the entries of KEYS, made as the plan says (for ONNX)."""
    class Collect:
        def __init__(self) -> None:
            self.data = bytearray()

        def write(self, key: str, data: Any) -> None:
            self.data += data

        def copy(self, key: str, fd: int, offset: int, length: int) -> None:
            self.data += read_range(fd, offset, length)

    for e in plan.entries:
        if e.key in keys:
            sink = Collect()
            stream_entries(replace(plan, entries=(e,)), ckpt, sink)
            yield e, bytes(sink.data)


def converted_state_dict(plan: Plan, ckpt: Checkpoint) -> dict[str, Any]:
    """The converted state dict as torch tensors (for a whole-model export)."""
    return _convert_state_dict(plan, ckpt.tensor, ckpt)


def hash_sources(ckpt: Checkpoint) -> SourceHash:
    """The source's files hashing on a second thread (the command line's early hash where it
    is of the same file); `.result()` joins it."""
    return hash_files(ckpt.files)
