"""The only code that reads or writes checkpoint bytes, one module per format."""

from typing import Any


def import_extra(module: str, reading: str, extra: str) -> Any:
    """Import an optional dependency, or a usage error (exit 2) with the pip command."""
    import importlib

    from ..errors import UsageError

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UsageError(f"reading {reading} needs the {module} package: pip install "
                         f"'linconvert[{extra}]' (in a clone of linconvert: pip install -e "
                         f"'.[{extra}]').") from e
