"""Which Source a path is, and opening it: a file, a sharded index, or a folder holding one.

Opening a checkpoint reads headers only (safetensors) or maps the file without reading tensor
data (`.pt` through `mmap=True`); the Sources themselves live with their formats in
`convert/formats/`. `Checkpoint` is the Source interface under the name the rest of the
pipeline uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import CorruptInputError
from .formats import is_dcp, sharded, torch_pt
from .formats import safetensors as st
from .formats.source import ArraySource, TensorSpec
from .formats.source import Source as Checkpoint

__all__ = ["Checkpoint", "TensorSpec", "open_checkpoint", "open_written", "source_kind"]

PT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
CHECKPOINT_SUFFIXES = (SAFETENSORS_SUFFIX, *PT_SUFFIXES)


def _sniff(path: Path) -> str:
    try:
        with st.open_regular(path) as f:
            head = f.read(16)
    except IsADirectoryError:
        return "folder"
    except OSError as e:
        raise CorruptInputError(f"cannot read '{path}': {e.strerror or e}.") from e
    if st.looks_like_safetensors(head):
        return "safetensors"
    if torch_pt.looks_like_torch(head):
        return "pt"
    return ""


def source_kind(path: Path) -> str:
    """"safetensors", "pt", "index", "folder", "dcp", "flax" or "keras" for PATH; exit 4
    otherwise."""
    if is_dcp(path):
        return "dcp"
    if path.is_dir():
        return "folder"
    if path.name.endswith(".index.json"):
        return "index"
    suffix = path.suffix.lower()
    if suffix == ".msgpack":
        return "flax"
    if suffix in (".h5", ".keras"):
        return "keras"
    if suffix == SAFETENSORS_SUFFIX:
        return "safetensors"
    if suffix in PT_SUFFIXES:
        return "pt"
    kind = _sniff(path)
    if not kind:
        raise CorruptInputError(f"'{path}' is not a checkpoint: its suffix is not one of "
                                f"{', '.join(CHECKPOINT_SUFFIXES)}, .index.json and its first "
                                "bytes are neither safetensors nor torch.save.")
    return kind


def find_in_folder(folder: Path) -> Path:
    """The checkpoint a folder holds: an index first, else its one checkpoint file."""
    for name in sharded.INDEX_NAMES:
        if (folder / name).is_file():
            return folder / name
    indexes = sorted(folder.glob("*.index.json"))
    if len(indexes) == 1:
        return indexes[0]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES
                   and not p.name.startswith("."))
    if len(files) == 1:
        return files[0]
    found = ", ".join(p.name for p in (indexes or files)) or "none"
    raise CorruptInputError(f"folder '{folder}' holds no single checkpoint to read (candidates: "
                            f"{found}); name the file or index instead.")


def open_checkpoint(path: Path | str, *, state_dict_key: str | None = None,
                    allow_globals: Sequence[str] = ()) -> Checkpoint:
    """Open any supported source lazily.

    Args:
        path: a `.safetensors`, `.pt/.pth/.bin` file, a `*.index.json`, a folder with one, or
            a torch.distributed.checkpoint folder (or its `.metadata`).
        state_dict_key: dotted path of the state dict inside a `.pt` training checkpoint or a
            DCP folder.
        allow_globals: `module.Name` pickle globals the user trusts.

    Raises:
        CorruptInputError, UnsafeInputError, UsageError.
    """
    path = Path(path)
    folder = None
    target = path
    kind = source_kind(path)
    if kind == "folder":
        folder = path
        target = find_in_folder(path)
        kind = source_kind(target)
    if kind == "dcp":
        from .formats import dcp

        ckpt = dcp.DcpSource(path, state_dict_key, allow_globals)
    elif kind in ("flax", "keras"):
        ckpt = _open_framework(target, kind)
    elif kind == "index":
        ckpt = _open_index(target, state_dict_key, allow_globals)
    elif kind == "safetensors":
        if state_dict_key:
            from .errors import UsageError

            raise UsageError(f"--state-dict-key does not apply to '{target}': safetensors holds "
                             "a flat state dict.")
        ckpt = st.SafetensorsSource(path, [st.read_header(target)])
    else:
        ckpt = torch_pt.TorchSource(path, [target], state_dict_key, allow_globals)
    ckpt.folder = folder
    return ckpt


def _open_index(index_path: Path, state_dict_key: str | None,
                allow_globals: Sequence[str]) -> Checkpoint:
    index = sharded.read_index(index_path)
    kinds = {source_kind(s) for s in index.shards}
    if len(kinds) != 1:
        raise CorruptInputError(f"shard index '{index_path}' mixes shard formats.")
    ckpt: Checkpoint
    if kinds == {"safetensors"}:
        headers = [st.read_header(s) for s in index.shards]
        for h in headers:
            sharded.check_shard_keys(index, h.path, list(h.tensors))
        ckpt = st.SafetensorsSource(index_path, headers)
        total = sum(s.nbytes for s in ckpt.specs.values())
        if index.total_size is not None and index.total_size != total:
            ckpt.close()
            raise CorruptInputError(f"shard index '{index_path}' says total_size "
                                    f"{index.total_size} but its shards hold {total} bytes of "
                                    "tensors.")
    else:
        ckpt = torch_pt.TorchSource(index_path, index.shards, state_dict_key, allow_globals)
        for f, sd in zip(index.shards, ckpt.state_dicts):
            sharded.check_shard_keys(index, f, list(sd))
    ckpt.sharded = True
    return ckpt


def _open_framework(path: Path, kind: str) -> Checkpoint:
    if kind == "flax":
        from .formats.flax_msgpack import read_flax

        arrays, extras = read_flax(path)
        specs = {k: TensorSpec(a.shape, a.dtype) for k, a in arrays.items()}
        return ArraySource(path, "flax msgpack", specs, lambda k: arrays[k].data,
                               extras=extras)
    from .formats.keras_h5 import KerasWeights

    weights = KerasWeights(path)
    try:
        specs = {k: TensorSpec(*weights.spec(k)) for k in weights.datasets}
    except CorruptInputError:
        weights.close()
        raise
    return ArraySource(path, "keras", specs, weights.read, weights.close,
                           notes=weights.notes)


def open_written(paths: Sequence[Path], fmt: str, display: Path, *,
                 state_dict_key: str | None = None,
                 allow_globals: Sequence[str] = ()) -> Checkpoint:
    """Open files just written (temporary names, so no suffix rules) as one checkpoint."""
    if fmt == "safetensors":
        return st.SafetensorsSource(display, [st.read_header(p) for p in paths])
    return torch_pt.TorchSource(display, list(paths), state_dict_key, allow_globals)
