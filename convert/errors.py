"""One exception hierarchy; each class carries the exit code DESIGN.md gives it."""

from __future__ import annotations


class ConvertError(Exception):
    """Base of every error linconvert reports to a user (exit code 70 if raised bare)."""

    exit_code = 70


class NotEquivalentError(ConvertError):
    """Verification found a difference; `report` holds the full VerifyReport when known, and
    `conversion` the ConversionReport (its plan) of a conversion that failed its check."""

    exit_code = 1
    conversion: object = None

    def __init__(self, message: str, report: object = None):
        super().__init__(message)
        self.report = report


class UsageError(ConvertError):
    """A usage error, or a selection the tool will not guess."""

    exit_code = 2


class UnsafeInputError(ConvertError):
    """Input refused as unsafe: a pickle global outside the allow-list, an escaping path."""

    exit_code = 3


class CorruptInputError(ConvertError):
    """Input unreadable, corrupt or inconsistent."""

    exit_code = 4


class OutputError(ConvertError):
    """Output could not be written: exists without --overwrite, read-only, disk full."""

    exit_code = 5


class Terminated(BaseException):  # noqa: N818 - mirrors KeyboardInterrupt
    """Raised from the SIGTERM handler so that cleanup runs as for Ctrl-C."""


class BatchError(ConvertError):
    """A batch in which some item failed; the exit code is the worst item's."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
