"""The two ways a linear layer stores its weight."""

from __future__ import annotations

import enum


class Layout(str, enum.Enum):
    """`PARAM`: in x out, used as `x @ W + b`.  `LINEAR`: out x in, used as `x @ W.T + b`."""

    PARAM = "param"
    LINEAR = "linear"

    @property
    def other(self) -> Layout:
        """The opposite layout."""
        return Layout.LINEAR if self is Layout.PARAM else Layout.PARAM

    @property
    def command(self) -> str:
        """The command that converts into this layout."""
        return f"to-{self.value}"

    def __str__(self) -> str:
        return self.value
