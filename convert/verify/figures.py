"""The figures ports are gated on: cosine similarity, top-1 agreement, KL divergence of the
softmaxes, and a side's distance from a reference run. All in float64, on the CPU."""

from __future__ import annotations

import math
from typing import Any

from .report import Distance


def _as_float64(t: Any) -> Any:
    import torch

    return t.detach().to("cpu", torch.float64)


def cosine_similarity(actual: Any, expected: Any) -> float:
    """Cosine of the angle between the two tensors taken as flat vectors (finite elements of
    both); 1 when both are zero, 0 when only one is."""
    a, b = _as_float64(actual).reshape(-1), _as_float64(expected).reshape(-1)
    finite = a.isfinite() & b.isfinite()
    a, b = a[finite], b[finite]
    na, nb = float(a.norm()), float(b.norm())
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return max(-1.0, min(1.0, float(a @ b) / (na * nb)))


def distance(actual: Any, expected: Any) -> Distance:
    """ACTUAL's max abs error and cosine similarity against EXPECTED."""
    a, b = _as_float64(actual), _as_float64(expected)
    diff = (a - b).abs()
    diff = diff[diff.isfinite()]
    return Distance(float(diff.max()) if diff.numel() else 0.0, cosine_similarity(a, b))


def _rows(t: Any) -> Any:
    """T as rows of logits over its last dimension."""
    t = _as_float64(t)
    return t.reshape(-1, t.shape[-1]) if t.ndim else t.reshape(1, 1)


def top1_agreement(actual: Any, expected: Any) -> float:
    """The fraction of rows (every position but the last dimension) whose argmax agrees."""
    a, b = _rows(actual), _rows(expected)
    if a.shape[0] == 0:
        return 1.0
    return float((a.argmax(-1) == b.argmax(-1)).double().mean())


def kl_divergence(actual: Any, expected: Any) -> float:
    """KL(softmax(EXPECTED) || softmax(ACTUAL)) per row, in nats, averaged over the rows."""
    import torch

    a, b = _rows(actual), _rows(expected)
    if a.shape[0] == 0:
        return 0.0
    log_p, log_q = torch.log_softmax(b, -1), torch.log_softmax(a, -1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    kl = float(terms.sum(-1).mean())
    return math.inf if math.isnan(kl) else max(kl, 0.0)  # >= 0; rounding may dip below
