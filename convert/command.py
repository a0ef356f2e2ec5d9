"""The command line of the run in progress, for the reports that name what made them (a verdict
page). Its own module so that the command line's start imports nothing else."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

COMMAND: ContextVar[str | None] = ContextVar("linconvert_command", default=None)

# Whether a conversion verifies in a second process started before planning (which imports
# torch while this one streams; see convert.verify.worker). The command line's single
# conversions set it; a migration script or a batch, which may convert many files in one
# process and import torch once, verifies in its own process.
VERIFY_ELSEWHERE: ContextVar[bool] = ContextVar("linconvert_verify_elsewhere", default=False)

# That second process, when the command line started it as it started (before importing what
# plans a conversion), for the conversion to take instead of starting its own.
EARLY_VERIFIER: ContextVar[Any] = ContextVar("linconvert_early_verifier", default=None)
