"""`ParamLinear`: the hand-written `x @ W + b` layer of the seeds (imports torch)."""

from __future__ import annotations

import torch
from torch import nn


class ParamLinear(nn.Module):
    """A linear layer in the `param` layout: weight `in x out`, forward `x @ W + b`.

    This is seed 003's `CustomLinear`; `nn.Linear(in, out)` computes the same function with
    the transposed weight.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(in_features, out_features, **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        if self.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as `nn.Linear` does (kaiming-uniform on the out x in view)."""
        nn.init.kaiming_uniform_(self.weight.T, a=5**0.5)
        if self.bias is not None:
            bound = 1 / self.in_features**0.5 if self.in_features else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}"
