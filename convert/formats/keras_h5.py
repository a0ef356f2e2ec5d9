"""Keras 3 weights: `.weights.h5` files and `.keras` archives (a zip with the weights file and
`config.json`), read with h5py.

Keras 3 stores each layer's variables by index (`layers/dense_1/vars/0`) under a group named
after the layer's class, with the user's layer name as the `name` attribute of `vars`. Keys are
`LAYER_NAME.VARIABLE_NAME` (nested layers joined with dots); variable names come from
`config.json` where there is one (which says the class and, for normalization layers, which of
gamma/beta exist), else from the built-in class the group is named after. A variable that
cannot be named keeps its index (`fc1.2`), and a note says so.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import zipfile
from pathlib import Path
from typing import Any

from ..errors import CorruptInputError
from . import import_extra

MAX_CONFIG_BYTES = 64 << 20


def import_h5py() -> Any:
    return import_extra("h5py", "Keras weights", "keras")


_BUILT_IN = ("Dense", "EinsumDense", "Embedding", "LayerNormalization", "BatchNormalization",
             "GroupNormalization", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose",
             "Conv2DTranspose")
_BY_SNAKE = {c.lower(): c for c in _BUILT_IN}


def _class_of_group(group_name: str) -> str:
    """`layer_normalization_2` -> `LayerNormalization`, `conv1d` -> `Conv1D` (Keras names
    groups after the layer's class)."""
    base = re.sub(r"_\d+$", "", group_name)
    return _BY_SNAKE.get(base.replace("_", ""), base)


def variable_names(cls: str, count: int, config: dict[str, Any] | None) -> list[str] | None:
    """Names of a built-in layer's variables in storage order, or None if unknown."""
    cfg = config or {}
    if cls in ("Dense", "EinsumDense"):
        names = ["kernel", "bias"]
    elif cls == "Embedding":
        names = ["embeddings"]
    elif cls in ("LayerNormalization", "BatchNormalization", "GroupNormalization"):
        scale, center = cfg.get("scale"), cfg.get("center")
        if scale is None or center is None:  # no config: only the full set is unambiguous
            names = ["gamma", "beta"]
            if cls == "BatchNormalization":
                names += ["moving_mean", "moving_variance"]
            return names if count == len(names) else None
        names = (["gamma"] if scale else []) + (["beta"] if center else [])
        if cls == "BatchNormalization":
            names += ["moving_mean", "moving_variance"]
    elif cls in ("Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose"):
        names = ["kernel", "bias"]
    else:
        return None
    return names[:count] if count <= len(names) else None


def _layer_configs(config: Any) -> dict[str, dict[str, Any]]:
    """User layer name -> {"class_name", "config"} from a .keras config.json, nested too."""
    out: dict[str, dict[str, Any]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            cfg = node.get("config")
            if isinstance(node.get("class_name"), str) and isinstance(cfg, dict) and \
                    isinstance(cfg.get("name"), str):
                out.setdefault(cfg["name"], {"class_name": node["class_name"], "config": cfg})
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(config)
    return out


class KerasWeights:
    """An open Keras weights file: datasets by key, read on demand."""

    def __init__(self, path: Path):
        h5py = import_h5py()
        self.path = path
        self.notes: list[str] = []
        self._zip: zipfile.ZipFile | None = None
        config: Any = None
        try:
            if path.suffix.lower() == ".keras":
                self._zip = zipfile.ZipFile(path)
                names = {i.filename: i for i in self._zip.infolist()}
                if "model.weights.h5" not in names:
                    raise CorruptInputError(f"'{path}' is not a Keras archive: it has no "
                                            "model.weights.h5.")
                info = names["model.weights.h5"]
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CorruptInputError(f"'{path}': model.weights.h5 is compressed; Keras "
                                            "stores it uncompressed, so the archive was "
                                            "altered.")
                if "config.json" in names:
                    if names["config.json"].file_size > MAX_CONFIG_BYTES:
                        raise CorruptInputError(f"'{path}': config.json is implausibly large.")
                    config = json.loads(self._zip.read("config.json"))
                handle: Any = self._zip.open("model.weights.h5")
                handle = io.BufferedReader(handle) if not handle.seekable() else handle
                self._h5 = h5py.File(handle, "r")
            else:
                self._h5 = h5py.File(path, "r")
        except CorruptInputError:
            self.close()
            raise
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as e:
            self.close()
            first = str(e).splitlines()[0] if str(e) else ""
            raise CorruptInputError(f"'{path}' is not a readable Keras weights file "
                                    f"({type(e).__name__}: {first}).") from e
        self._configs = _layer_configs(config) if config is not None else {}
        self.datasets: dict[str, Any] = {}
        try:
            self._collect(self._h5.get("layers"), "")
        except (OSError, ValueError, KeyError) as e:
            self.close()
            raise CorruptInputError(f"'{path}' has a damaged weights tree ({e}).") from e
        if not self.datasets:
            self.close()
            raise CorruptInputError(f"'{path}' holds no layer weights.")

    def _collect(self, layers: Any, prefix: str) -> None:
        h5py = import_h5py()
        if layers is None:
            return
        for group_name in layers:
            group = layers[group_name]
            if not isinstance(group, h5py.Group):
                continue
            vars_group = group.get("vars")
            name = group_name
            if isinstance(vars_group, h5py.Group) and "name" in vars_group.attrs:
                raw = vars_group.attrs["name"]
                name = raw.decode() if isinstance(raw, bytes) else str(raw)
            key_prefix = f"{prefix}{name}"
            if isinstance(vars_group, h5py.Group) and len(vars_group):
                indices = sorted((k for k in vars_group if k.isdigit()), key=int)
                info = self._configs.get(name)
                cls = info["class_name"] if info else _class_of_group(group_name)
                names = variable_names(cls, len(indices), info["config"] if info else None)
                if names is None:
                    self.notes.append(f"variables of layer '{key_prefix}' ({cls}) keep their "
                                      "indices: linconvert does not know their names")
                    names = indices
                for idx, var in zip(indices, names):
                    ds = vars_group[idx]
                    if not isinstance(ds, h5py.Dataset):
                        raise CorruptInputError(f"'{self.path}': {group.name}/vars/{idx} is not "
                                                "a dataset.")
                    self.datasets[f"{key_prefix}.{var}"] = ds
            if "layers" in group:
                self._collect(group["layers"], f"{key_prefix}.")

    def spec(self, key: str) -> tuple[tuple[int, ...], str]:
        from ..dtypes import dtype_from_name

        ds = self.datasets[key]
        dtype = dtype_from_name(str(ds.dtype))
        if dtype is None:
            raise CorruptInputError(f"'{self.path}': '{key}' has dtype {ds.dtype}, which "
                                    "linconvert does not convert.")
        return tuple(int(d) for d in ds.shape), dtype

    def read(self, key: str) -> Any:
        import numpy as np

        try:
            return np.ascontiguousarray(self.datasets[key][()])
        except (OSError, ValueError) as e:
            raise CorruptInputError(f"'{self.path}': cannot read '{key}' ({e}).") from e

    def close(self) -> None:
        h5 = getattr(self, "_h5", None)
        if h5 is not None:
            with contextlib.suppress(OSError, ValueError):
                h5.close()
        if self._zip is not None:
            self._zip.close()
