"""The README's examples run as written (issue 19), so a broken example fails CI.

Every ```console block of README.md, in order, is one session. A line starting with `$ ` is a
command (a line ending in a backslash continues it on the next line, as in a shell); the lines
after it, up to the next command or the end of the block, are what it prints, stdout and stderr
together as a terminal shows them. The session runs in a temporary folder holding a copy of
`fixtures/`: each command in its own `bash -c` (pipes and `cd` work within a command), in README
order (later commands see earlier outputs), with this interpreter's folder first on PATH (so
`linconvert` and `python` are the venv's), and with `$?` set to the previous command's exit
status (so `$ echo $?` shows it).

Expected and actual output are compared line by line after normalising only what must vary from
run to run or machine to machine:

- timings: `in 0.04 s` -> `in <t> s`;
- the temporary folder's absolute path -> `<tmp>`;
- the error figures of a `verify` table row (`max_abs`, `rel_err`, `atol_needed`): float
  rounding differs between CPUs, so a number there reads `<err>` (a `-` stays a `-`);
- and so that those figures may change a column's width: runs of two or more spaces count as
  two, runs of three or more dashes as three, trailing spaces and blank lines at either end of
  an output are ignored.

`python tests/test_readme.py` prints the session as it runs now, to update the README from.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"


@dataclass(frozen=True)
class Step:
    """One `$ ` command of a console block and the output the README shows for it."""

    command: str
    expected: tuple[str, ...]
    line: int  # the README line the command starts on


def fenced_blocks(text: str, info: str) -> Iterator[tuple[int, list[str]]]:
    """Yield (first line number, lines) of every ``` block whose info string is `info`."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].strip() == f"```{info}":
            start = i + 1
            end = start
            while end < len(lines) and lines[end].strip() != "```":
                end += 1
            if end == len(lines):
                raise AssertionError(f"README.md:{i + 1}: ```{info} block is never closed")
            yield start + 1, lines[start:end]
            i = end
        i += 1


def console_steps(text: str) -> list[Step]:
    """Every command of every ```console block, in README order."""
    steps: list[Step] = []
    for first, lines in fenced_blocks(text, "console"):
        command: list[str] = []
        expected: list[str] = []
        at = 0
        j = 0
        while j < len(lines):
            line = lines[j]
            if line.startswith("$ "):
                if command:
                    steps.append(Step("\n".join(command), tuple(expected), at))
                at = first + j
                command = [line[2:]]
                expected = []
                while command[-1].endswith("\\") and j + 1 < len(lines):
                    j += 1
                    command.append(lines[j])
            elif command:
                expected.append(line)
            elif line.strip():
                raise AssertionError(f"README.md:{first + j}: output before any `$ ` command")
            j += 1
        if command:
            steps.append(Step("\n".join(command), tuple(expected), at))
    return steps


TIMING = re.compile(r"\bin \d+(?:\.\d+)? s\b")
VERIFY_ROW = re.compile(r"^(?:ok|FAIL) {2,}\S")
NUMBER = re.compile(r"^(?:\d+(?:\.\d+)?(?:e[-+]\d+)?|inf|nan)$")
ERROR_COLUMNS = (5, 6, 7)  # result kind name dtype shape | max_abs rel_err atol_needed | ...


def normalise(text: str, workdir: Path | None = None) -> list[str]:
    """The lines of `text` with what may vary between runs and machines made constant."""
    if workdir is not None:
        for path in sorted({str(workdir.resolve()), str(workdir)}, key=len, reverse=True):
            text = text.replace(path, "<tmp>")
    out: list[str] = []
    for line in text.splitlines():
        line = TIMING.sub("in <t> s", line.rstrip())
        if VERIFY_ROW.match(line):
            cells = re.split(r" {2,}", line)
            for i in ERROR_COLUMNS:
                if i < len(cells) and NUMBER.match(cells[i]):
                    cells[i] = "<err>"
            line = "  ".join(cells)
        line = re.sub(r" {3,}", "  ", line)
        line = re.sub(r"-{4,}", "---", line)
        out.append(line)
    while out and not out[-1]:
        out.pop()
    while out and not out[0]:
        out.pop(0)
    return out


def session_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"  # stdout and stderr interleaved as they are written
    return env


def run_session(steps: list[Step], workdir: Path) -> Iterator[tuple[Step, str, int]]:
    """Run the steps in order in `workdir`; yield each with its output and exit status."""
    env = session_env()
    status = 0
    for step in steps:
        proc = subprocess.run(
            ["bash", "-c", f"(exit {status}); {step.command}"],
            cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=600,
        )
        status = proc.returncode
        yield step, proc.stdout, status


def prepare(workdir: Path) -> None:
    shutil.copytree(ROOT / "fixtures", workdir / "fixtures",
                    ignore=shutil.ignore_patterns("__pycache__"))


def test_the_readme_has_a_console_session():
    steps = console_steps(README.read_text(encoding="utf-8"))
    commands = " ".join(step.command for step in steps)
    assert len(steps) >= 5, "README.md has no console session to test"
    for word in ("inspect", "to-linear", "verify", "to-param", "square_nobias"):
        assert word in commands, f"the README's console session never runs {word!r}"


def test_the_readme_console_session_runs_as_written(tmp_path):
    steps = console_steps(README.read_text(encoding="utf-8"))
    prepare(tmp_path)
    for step, output, status in run_session(steps, tmp_path):
        expected = normalise("\n".join(step.expected))
        actual = normalise(output, tmp_path)
        if actual != expected:
            pytest.fail(
                f"README.md:{step.line}: `{step.command}` (exit {status}) printed other "
                "output than the README shows.\n--- README\n" + "\n".join(expected)
                + "\n--- actual\n" + "\n".join(actual),
                pytrace=False,
            )


# The set-up command ------------------------------------------------------------------------

def setup_section(text: str) -> str:
    match = re.search(r"^## Set up\n(.*?)(?=^## )", text, re.M | re.S)
    assert match, "README.md has no '## Set up' section"
    return match.group(1)


def setup_conversion() -> str:
    """The `linconvert ...` part of the first set-up command (after the installs)."""
    blocks = list(fenced_blocks(setup_section(README.read_text(encoding="utf-8")), "bash"))
    assert len(blocks) >= 2, "the Set up section has not its two ```bash commands"
    _, lines = blocks[0]
    command = " ".join(line.strip() for line in lines if line.strip())
    parts = [part.strip() for part in command.split("&&")]
    assert parts[0].startswith("python3 -m venv") and any("pip install" in p for p in parts)
    tail = [part for part in parts if part.startswith("linconvert ")]
    assert tail, "the first set-up command runs no linconvert job"
    assert parts[-len(tail):] == tail, "the set-up command's linconvert job is not its last part"
    return " && ".join(tail)


def test_the_setup_conversion_succeeds_when_pasted_twice(tmp_path):
    command = setup_conversion()
    assert "fixtures/" in command
    # It writes under /tmp; here that is this test's own folder, the command otherwise verbatim.
    local = command.replace("/tmp/", f"{tmp_path}/out/")
    (tmp_path / "out").mkdir()
    prepare(tmp_path)
    for attempt in (1, 2):
        proc = subprocess.run(["bash", "-c", local], cwd=tmp_path, env=session_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"paste {attempt} of `{command}`:\n{proc.stdout}"
    assert list((tmp_path / "out").iterdir()), f"`{command}` wrote nothing"


def test_ci_runs_the_readme_setup_conversion():
    command = setup_conversion()
    ci = CI_RUN.read_text(encoding="utf-8").splitlines()
    assert command in (line.strip() for line in ci), (
        f".ci/run does not run the README's set-up conversion verbatim: {command}")


def main() -> None:
    """Print the README's console session as it runs now (with its exit statuses)."""
    steps = console_steps(README.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        prepare(workdir)
        for step, output, status in run_session(steps, workdir):
            print(f"$ {step.command}    # README.md:{step.line}, exit {status}")
            print(output.replace(str(workdir), "<tmp>"), end="" if output.endswith("\n") else "\n")


if __name__ == "__main__":
    main()
