"""How the planner words what it found: quoted key lists, shapes, and notes for `-v`."""

from __future__ import annotations

from collections.abc import Sequence


def quoted(keys: Sequence[str], limit: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(f"'{k}'" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def describe(shape: tuple[int, ...], dtype: str) -> str:
    return f"{dtype} {'x'.join(map(str, shape)) or 'scalar'}"


class Note(str):
    """A message for `-v` only: a preset covers a family, and most of its rules miss any one
    model, so its skipped rules are no warning."""


def skipped_rules(rules: list[str], source: str) -> list[str]:
    """A preset's rules that match nothing here (a preset covers more than one model)."""
    if not rules:
        return []
    if len(rules) == 1:
        return [Note(f"{rules[0]} matches no key of '{source}'; skipped.")]
    return [Note(f"{len(rules)} preset rules match no key of '{source}' and were skipped: "
                 + ", ".join(rules) + ".")]
