"""linconvert: migrate checkpoints between the `param` (in x out) and `linear` (out x in) layouts.

The public API mirrors the command line; importing it does not import torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# `convert.verify` names two things: the subpackage of checks and the API function `verify`
# (convert.api, found lazily by `__getattr__`). Importing a subpackage binds it as an attribute
# of its parent, which would hide the function for good; so import the package here, before
# `__getattr__` exists, and unbind the name below. Later imports of `convert.verify.*` find the
# package in sys.modules and leave this module alone, so `convert.verify` stays the function.
from . import verify  # noqa: E402
from .errors import (  # noqa: E402
    ConvertError,
    CorruptInputError,
    NotEquivalentError,
    OutputError,
    UnsafeInputError,
    UsageError,
)
from .layout import Layout  # noqa: E402

del verify  # so that `convert.verify` is the API function (see above)

__all__ = [
    "ConvertError", "CorruptInputError", "Layout", "NotEquivalentError", "OutputError",
    "ParamLinear", "UnsafeInputError", "UsageError", "__version__", "inspect_checkpoint",
    "plan_conversion", "to_linear", "to_param", "export", "verify", "batch", "swap_modules",
]


def __getattr__(name: str) -> Any:
    if name == "ParamLinear":
        from .modules import ParamLinear

        return ParamLinear
    if name in ("to_linear", "to_param", "export", "inspect_checkpoint", "plan_conversion",
                "verify", "batch", "swap_modules"):
        from .api import public_api

        return public_api()[name]  # errors in the API's words, not the CLI's
    raise AttributeError(f"module 'convert' has no attribute '{name}'")
