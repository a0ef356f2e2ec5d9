"""`MODULE:FACTORY` options: the user's own code, imported and called to build a model."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

from .errors import UsageError


def load_factory(spec: str, option: str = "--model") -> Any:
    """Import MODULE (cwd first on sys.path, or a `.py` path) and return its FACTORY callable."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{option} '{spec}' must be written MODULE:FACTORY (e.g. "
                         "mymodels:build_mlp or path/to/models.py:build_mlp).")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise UsageError(f"{option} '{spec}': file '{path}' does not exist.")
            name = f"_linconvert_user_{abs(hash(str(path.resolve())))}"
            loaded = sys.modules.get(name)
            if loaded is None:
                mod_spec = importlib.util.spec_from_file_location(name, path)
                if mod_spec is None or mod_spec.loader is None:
                    raise UsageError(f"{option} '{spec}': cannot import '{path}'.")
                loaded = importlib.util.module_from_spec(mod_spec)
                sys.modules[name] = loaded
                mod_spec.loader.exec_module(loaded)
            module = loaded
        else:
            if os.getcwd() not in sys.path[:1]:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"{option} '{spec}': cannot import '{module_name}' ({e}).") from e
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise UsageError(f"{option} '{spec}': '{module_name}' has no attribute '{attr}'.")
    if not callable(factory):
        raise UsageError(f"{option} '{spec}': '{attr}' is not callable.")
    return factory


def build_model(spec: str, option: str = "--model", *, device: str | None = None) -> Any:
    """Call the factory (on DEVICE, e.g. "meta", if given) and check it returns an nn.Module."""
    import torch

    factory = load_factory(spec, option)
    if device is not None:
        with torch.device(device):
            model = factory()
    else:
        model = factory()
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"{option} '{spec}' returned a {type(model).__name__}, not an "
                         "nn.Module.")
    return model
