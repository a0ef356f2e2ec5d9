"""The command line of the run in progress, for the reports that name what made them (a verdict
page). Its own module so that the command line's start imports nothing else."""

from __future__ import annotations

from contextvars import ContextVar

COMMAND: ContextVar[str | None] = ContextVar("linconvert_command", default=None)
