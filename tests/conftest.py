"""Shared fixtures: the tiny models, a CLI runner that goes through linconvert's one exit-code
handler, copies of the committed fixtures, and a seed."""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
sys.path.insert(0, str(FIXTURES))

import models  # noqa: E402  (fixtures/models.py: the tiny models)

from convert.cli import run  # noqa: E402

IN, OUT = 3, 5  # non-square: a missing transpose fails loudly
SQ = 4  # square: exercises the ambiguity handling


@dataclass
class Outcome:
    """What one CLI call did: exit code, stdout and stderr, kept apart."""

    exit_code: int
    stdout: str
    stderr: str


class Runner:
    """Runs `linconvert ARGS` in-process through `convert.cli.run` (the real handler)."""

    def __init__(self) -> None:
        self._runner = CliRunner()

    def __call__(self, *args: object) -> Outcome:
        with self._runner.isolation() as (out, err, _):
            code = run([str(a) for a in args])
            sys.stdout.flush()
            sys.stderr.flush()
        return Outcome(code, out.getvalue().decode(), err.getvalue().decode())


@pytest.fixture
def runner() -> Runner:
    return Runner()


@pytest.fixture
def seed() -> int:
    import torch

    torch.manual_seed(0)
    return 0


@pytest.fixture
def fixture_dir(tmp_path: Path) -> Path:
    """A writable copy of the committed fixtures."""
    out = tmp_path / "fixtures"
    out.mkdir()
    for p in FIXTURES.iterdir():
        if p.suffix in (".pt", ".safetensors"):
            shutil.copy(p, out / p.name)
    return out


@pytest.fixture
def tiny_models():
    """fixtures/models.py, for tests that build the tiny models directly."""
    return models
