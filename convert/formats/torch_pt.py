"""torch.save files (`.pt`, `.pth`, `.bin`): loaded with `weights_only=True` only, never less.

`mmap=True` where the file is a zip archive (torch's format since 1.6), so tensor data stays on
disk until it is touched. Globals outside the allow-list are refused (exit 3) and named, with
the `--allow-global` escape; there is no fallback to `weights_only=False`.
"""

from __future__ import annotations

import importlib
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import CorruptInputError, UnsafeInputError, UsageError

ZIP_MAGIC = b"PK\x03\x04"
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module")


def looks_like_torch(head: bytes) -> bool:
    """Whether a file's first bytes start like torch.save output (zip, or legacy pickle)."""
    return head.startswith(ZIP_MAGIC) or head[:1] == b"\x80"


def resolve_globals(names: Sequence[str]) -> list[object]:
    """Import each `module.Name` the user allowed (their own option, never read from a file)."""
    out = []
    for spec in names:
        module, _, attr = spec.rpartition(".")
        if not module:
            raise UsageError(f"--allow-global '{spec}' must be written module.Name.")
        try:
            obj = importlib.import_module(module)
            for part in attr.split(":"):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise UsageError(f"--allow-global '{spec}' cannot be imported ({e}); check the "
                             "spelling and that its package is installed.") from e
        out.append(obj)
    return out


def load(path: Path, allow_globals: Sequence[str] = ()) -> object:
    """torch.load PATH with weights_only=True (and mmap=True for zip files).

    Raises:
        UnsafeInputError: the pickle needs a global outside the allow-list.
        CorruptInputError: the file is not a readable torch checkpoint.
    """
    import torch

    allowed = resolve_globals(allow_globals)
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == ZIP_MAGIC
    except OSError as e:
        raise CorruptInputError(f"cannot read '{path}': {e.strerror or e}.") from e
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path) if is_zip else []
        if unsafe or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            names = ", ".join(f"'{g}'" for g in unsafe) or _global_from_message(str(e))
            raise UnsafeInputError(
                f"'{path}' needs pickle globals outside the allow-list ({names}); if you trust "
                "this file and these classes, pass --allow-global for each."
            ) from e
        raise CorruptInputError(f"'{path}' is not a readable torch checkpoint ({e}).") from e
    # The weights_only unpickler raises many types on malformed input (DESIGN.md's stated
    # exception to "no bare Exception"): each means the file is unreadable, exit 4.
    except (RuntimeError, EOFError, IndexError, KeyError, ValueError, TypeError, OverflowError,
            AttributeError, zipfile.BadZipFile, UnicodeDecodeError, OSError, MemoryError) as e:
        raise CorruptInputError(
            f"'{path}' is not a readable torch checkpoint ({_first_line(e)})."
        ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _unsafe_globals(path: Path) -> list[str]:
    import torch

    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - only used to improve a message; the refusal stands
        return []


def _global_from_message(msg: str) -> str:
    for line in msg.splitlines():
        if "Unsupported global" in line:
            return line.split("GLOBAL", 1)[-1].split("was not", 1)[0].strip()
    return "an unlisted global"


def is_tensor_mapping(obj: object) -> bool:
    """A mapping of string keys holding at least one tensor."""
    import torch

    return isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values()) \
        and all(isinstance(k, str) for k in obj)


def find_state_dict(obj: object, path: Path,
                    state_dict_key: str | None) -> tuple[Mapping[str, object], tuple[str, ...]]:
    """The state dict inside a loaded checkpoint and the key path that reaches it.

    A flat mapping of tensors is the state dict itself; a training checkpoint holds it under
    `state_dict`, `model`, `model_state_dict` or `module`, or the dotted `state_dict_key`.
    """
    if state_dict_key:
        node = obj
        for i, part in enumerate(state_dict_key.split(".")):
            if not isinstance(node, Mapping) or part not in node:
                where = ".".join(state_dict_key.split(".")[:i]) or "the top level"
                keys = sorted(map(str, node)) if isinstance(node, Mapping) else []
                raise UsageError(f"'{path}' has no key '{part}' under {where} (keys there: "
                                 f"{', '.join(repr(k) for k in keys[:12]) or 'none'}); fix "
                                 "--state-dict-key.")
            node = node[part]
        if not is_tensor_mapping(node):
            raise UsageError(f"'{path}': '{state_dict_key}' is not a mapping of tensors; fix "
                             "--state-dict-key.")
        return node, tuple(state_dict_key.split("."))
    if not isinstance(obj, Mapping):
        raise CorruptInputError(f"'{path}' holds a {type(obj).__name__}, not a state dict or a "
                                "training checkpoint.")
    import torch

    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, ()
    for key in STATE_DICT_KEYS:
        if is_tensor_mapping(obj.get(key)):
            return obj[key], (key,)
    if is_tensor_mapping(obj):
        return obj, ()
    keys = ", ".join(repr(k) for k in list(obj)[:12])
    raise CorruptInputError(f"'{path}' has no state dict at its top level or under "
                            f"{', '.join(STATE_DICT_KEYS)} (keys: {keys}); name it with "
                            "--state-dict-key a.b.")


def replace_at(root: object, key_path: tuple[str, ...], value: object) -> object:
    """A copy of ROOT (copying only the mappings along KEY_PATH) with VALUE at KEY_PATH."""
    if not key_path:
        return value
    assert isinstance(root, Mapping)
    out = dict(root)
    out[key_path[0]] = replace_at(root[key_path[0]], key_path[1:], value)
    return out
