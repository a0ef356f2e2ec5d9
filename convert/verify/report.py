"""The verification report: one `CheckResult` per check, gathered in a `VerifyReport`.

Its JSON form is `to_dict`; the text table and JUnit XML are in `convert.report`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import NotEquivalentError


@dataclass
class CheckResult:
    """One line of the report: a layer, a tensor, an output, or a key without a partner."""

    name: str
    source: str
    kind: str  # "layer", "tensor", "output", "missing", "unexpected"
    passed: bool
    dtype: str = ""
    shape: tuple[int, ...] = ()
    max_abs_err: float | None = None
    rel_err: float | None = None
    atol_needed: float | None = None
    bit_exact: bool | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "kind": self.kind,
                "passed": self.passed, "dtype": self.dtype, "shape": list(self.shape),
                "max_abs_err": self.max_abs_err, "rel_err": self.rel_err,
                "atol_needed": self.atol_needed, "bit_exact": self.bit_exact,
                "message": self.message}


@dataclass
class VerifyReport:
    """The outcome of a verification: every check, and what was proven."""

    source: str
    destination: str
    device: str
    proven: str  # "plan" (per layer) or "equivalence" (whole model)
    pairing: str  # where the pairs came from
    results: list[CheckResult] = field(default_factory=list)
    seed: int = 0
    batch_size: int = 0
    atol: float | None = None
    rtol: float | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def equivalent(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if not r.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "destination": self.destination, "device": self.device,
                "equivalent": self.equivalent, "proven": self.proven, "pairing": self.pairing,
                "seed": self.seed, "batch_size": self.batch_size,
                "atol": self.atol, "rtol": self.rtol, "warnings": self.warnings,
                "failures": [r.name for r in self.failures],
                "results": [r.to_dict() for r in self.results]}

    def raise_if_different(self) -> None:
        """NotEquivalentError (exit 1) naming the failing checks."""
        if self.failures:
            raise NotEquivalentError(f"'{self.destination}' is not equivalent to "
                                     f"'{self.source}': {describe_failures(self.failures)}; "
                                     "nothing was written.", self)


def describe_failures(failures: Sequence[Any], most: int = 5) -> str:
    """`'name' (message), ...` for the first MOST failed checks, and how many more there are."""
    names = ", ".join(f"'{r.name}' ({r.message})" for r in failures[:most])
    return names + (f" and {len(failures) - most} more" if len(failures) > most else "")
