"""Hugging Face sharded checkpoints: `*.index.json` with `weight_map` (and `metadata`)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CorruptInputError, UnsafeInputError
from .safetensors import DuplicateKeyError, open_regular, shorten, unique_object

INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
MAX_INDEX_BYTES = 100_000_000
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
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_INDEX_BYTES:
                raise CorruptInputError(f"shard index '{path}' has {size} bytes, more than the "
                                        f"{MAX_INDEX_BYTES} an index of weight names needs; "
                                        "check that this is the file you meant.")
            text = f.read().decode("utf-8")
        obj = json.loads(text, object_pairs_hook=unique_object)
    except DuplicateKeyError as e:
        raise CorruptInputError(f"shard index '{path}' names '{e.args[0]}' twice, so it cannot "
                                "say which shard holds it; fix or regenerate the index.") from e
    except RecursionError as e:
        raise CorruptInputError(f"shard index '{path}' is JSON nested too deeply to be an "
                                "index.") from e
    except OSError as e:
        raise CorruptInputError(f"cannot read shard index '{path}': {e.strerror or e}.") from e
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptInputError(f"shard index '{path}' is not valid JSON ({shorten(str(e))}); "
                                "fix or regenerate it.") from e
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
    shards: dict[Path, list[str]] = {}
    for key, name in obj["weight_map"].items():
        if not isinstance(name, str) or not name or "\x00" in name:
            raise CorruptInputError(f"shard index '{path}' maps '{shorten(key)}' to "
                                    f"{shorten(repr(name))}, not a file name.")
        shard = folder / name
        real = Path(os.path.realpath(shard))
        inside = real.is_relative_to(real_folder) or (blobs is not None and
                                                      real.is_relative_to(blobs))
        if Path(name).is_absolute() or ".." in Path(name).parts or not inside:
            raise UnsafeInputError(f"shard index '{path}' names '{shorten(name)}' for "
                                   f"'{shorten(key)}', which resolves outside its folder; "
                                   "linconvert reads shards only inside the index's folder: "
                                   "move them there.")
        weight_map[key] = shard
        shards.setdefault(shard, []).append(key)
    if not weight_map:
        raise CorruptInputError(f"shard index '{path}' has an empty weight_map.")
    missing = [s for s in shards if not s.is_file()]
    if missing:
        keys = [k for s in missing for k in shards[s]]
        raise CorruptInputError(f"shard index '{path}' names shard(s) "
                                f"{_listing([s.name for s in missing])}, which are missing (or "
                                f"not regular files), so {_listing(keys)} cannot be read; "
                                "download the missing shards.")
    return ShardIndex(path, weight_map, tuple(shards), total, metadata)


def check_shard_keys(index: ShardIndex, shard: Path, keys: list[str]) -> None:
    """Every key the index gives SHARD is in it, and it holds no key the index puts elsewhere."""
    want = {k for k, s in index.weight_map.items() if s == shard}
    have = set(keys)
    if want - have:
        lacking = want - have
        it = "it" if len(lacking) == 1 else "them"
        raise CorruptInputError(f"shard index '{index.path}' puts {_listing(lacking)} in "
                                f"'{shard.name}', which lacks {it}; the shard is incomplete or "
                                "the index is stale: re-download the shard or regenerate the "
                                "index.")
    if have - want:
        elsewhere = sorted(k for k in have - want if k in index.weight_map)
        where = (f" (the index puts {_listing(elsewhere)} in another shard)" if elsewhere
                 else "")
        raise CorruptInputError(f"shard '{shard.name}' holds {_listing(have - want)}, which its "
                                f"index '{index.path}' does not map there{where}; the index "
                                "is stale: regenerate it.")


def _listing(keys: set[str] | list[str], limit: int = 10) -> str:
    """KEYS sorted and quoted, at most LIMIT of them, with the count of the rest."""
    keys = sorted(keys)
    text = ", ".join(f"'{shorten(k)}'" for k in keys[:limit])
    return text + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# --- writing ----------------------------------------------------------------------------------

_PARTIAL_SHARD = ("-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]"
                  ".safetensors.partial")


def remove_stale_partials(index_path: Path) -> None:
    """A killed sharded write leaves `.STEM-0000i-of-0000n.safetensors.partial` files whose n
    may differ from this run's: remove every one of this output's."""
    stem = index_path.name.removesuffix(".safetensors.index.json")
    for p in index_path.parent.glob(f".{stem}{_PARTIAL_SHARD}"):
        p.unlink(missing_ok=True)


def shards_named_by(index_path: Path) -> set[str]:
    """Shard file names an existing index names (plain names inside its folder only)."""
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map", {})
    except (OSError, ValueError, AttributeError):
        return set()
    return {n for n in weight_map.values() if isinstance(n, str) and "/" not in n
            and n.endswith(".safetensors") and not n.startswith(".")}


def write_index(index_path: Path, weight_map: dict[str, str], total_size: int, *,
                overwrite: bool) -> None:
    """Hugging Face's index (`metadata.total_size`, `weight_map`), written atomically."""
    from .atomic import AtomicFile

    text = json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map},
                      indent=2)
    with AtomicFile(index_path, overwrite=overwrite) as f:
        f.write((text + "\n").encode())
        f.commit()
