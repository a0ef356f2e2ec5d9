"""The only code that reads or writes checkpoint bytes, one module per format."""

from pathlib import Path
from typing import Any

# What names a torch.distributed.checkpoint (DCP) folder, here so that telling one apart
# imports nothing of its reader (formats/dcp.py).
METADATA_NAME = ".metadata"


def is_dcp(path: Path) -> bool:
    """Whether PATH is a DCP folder (it holds `.metadata`) or that `.metadata` file itself."""
    if path.name == METADATA_NAME:
        return path.is_file()
    return path.is_dir() and (path / METADATA_NAME).is_file()


def dcp_folder(path: Path) -> Path:
    """The folder of a DCP checkpoint named by its folder or its `.metadata`."""
    return path.parent if path.name == METADATA_NAME else path


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
