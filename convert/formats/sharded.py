"""Hugging Face sharded checkpoints: `*.index.json` with `weight_map` (and `metadata`)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorruptInputError, UnsafeInputError

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SNAPSHOT = re.compile(r"^(?P<repo>.*/models--[^/]+)/snapshots/[^/]+$")


@dataclass(frozen=True)
class ShardIndex:
    """A validated index: key -> shard path, shards in order of first appearance."""

    path: Path
    weight_map: dict[str, Path]
    shards: tuple[Path, ...]
    total_size: int | None
    metadata: dict[str, object]


def read_index(path: Path) -> ShardIndex:
    """Read an index and check every shard it names exists inside its folder.

    Raises:
        CorruptInputError: malformed JSON or weight_map, a missing shard.
        UnsafeInputError: a shard name that resolves outside the index's folder.
    """
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CorruptInputError(f"cannot read shard index '{path}' ({e}).") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("weight_map"), dict):
        raise CorruptInputError(f"shard index '{path}' has no 'weight_map' object.")
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise CorruptInputError(f"shard index '{path}': 'metadata' is not an object.")
    total = metadata.get("total_size")
    if total is not None and (not isinstance(total, int) or isinstance(total, bool) or total < 0):
        raise CorruptInputError(f"shard index '{path}': metadata.total_size is not a count of "
                                "bytes.")
    folder = path.parent
    real_folder = Path(os.path.realpath(folder))
    snapshot = _SNAPSHOT.match(real_folder.as_posix())
    blobs = Path(snapshot["repo"]) / "blobs" if snapshot else None
    weight_map: dict[str, Path] = {}
    shards: dict[Path, None] = {}
    for key, name in obj["weight_map"].items():
        if not isinstance(name, str) or not name or "\x00" in name:
            raise CorruptInputError(f"shard index '{path}' maps '{key}' to {name!r}, not a file "
                                    "name.")
        shard = folder / name
        real = Path(os.path.realpath(shard))
        inside = real.is_relative_to(real_folder) or (blobs is not None and
                                                      real.is_relative_to(blobs))
        if Path(name).is_absolute() or not inside:
            raise UnsafeInputError(f"shard index '{path}' names '{name}' for '{key}', which "
                                   "resolves outside its folder; refusing to read it.")
        if shard not in shards and not shard.is_file():
            raise CorruptInputError(f"shard index '{path}' names shard '{name}' (for '{key}'), "
                                    "which is missing.")
        weight_map[key] = shard
        shards[shard] = None
    if not weight_map:
        raise CorruptInputError(f"shard index '{path}' has an empty weight_map.")
    return ShardIndex(path, weight_map, tuple(shards), total, metadata)


def check_shard_keys(index: ShardIndex, shard: Path, keys: list[str]) -> None:
    """Every key the index gives SHARD is in it, and it holds no key the index puts elsewhere."""
    want = {k for k, s in index.weight_map.items() if s == shard}
    have = set(keys)
    if want - have:
        missing = sorted(want - have)
        raise CorruptInputError(f"shard index '{index.path}' puts '{missing[0]}' in "
                                f"'{shard.name}', which lacks it ({len(missing)} key(s) missing).")
    if have - want:
        extra = sorted(have - want)
        raise CorruptInputError(f"shard '{shard.name}' holds '{extra[0]}', which its index "
                                f"'{index.path.name}' does not map there ({len(extra)} key(s)).")
