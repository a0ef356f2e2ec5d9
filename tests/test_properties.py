"""Property tests: random state dicts go to-linear and back to-param bit for bit, through .pt
and .safetensors, and every conversion verifies equivalent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hst
from safetensors.torch import load_file, save_file

import convert
from convert.checkpoint import open_checkpoint

FLOATS = [torch.float32, torch.float16, torch.float64, torch.bfloat16]
OTHERS = [torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool]
# Leaf names that are never bias evidence, so the selection below decides every matrix.
LEAVES = ["proj", "w0", "kernel_", "table", "mix", "g"]

dims = hst.sampled_from([0, 1, 1, 2, 3, 4, 5, 7])


@hst.composite
def state_dicts(draw) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(state dict, keys to transpose): nested keys, 0- and 1-size dimensions, square and
    non-square matrices, float and integer and bool tensors; at least one matrix selected."""
    seed = draw(hst.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    paths = draw(hst.lists(
        hst.lists(hst.sampled_from(["enc", "dec", "h", "0", "1", "attn", "mlp"]), max_size=3),
        min_size=1, max_size=6))
    sd: dict[str, torch.Tensor] = {}
    selected: list[str] = []
    for i, path in enumerate(paths):
        key = ".".join([*path, f"{draw(hst.sampled_from(LEAVES))}{i}"])
        kind = draw(hst.sampled_from(["matrix", "matrix", "square", "vector", "scalar", "3d"]))
        dtype = draw(hst.sampled_from(FLOATS + OTHERS))
        if kind == "square":
            n = draw(dims)
            shape: tuple[int, ...] = (n, n)
        elif kind == "matrix":
            shape = (draw(dims), draw(dims))
        elif kind == "vector":
            shape = (draw(dims),)
        elif kind == "scalar":
            shape = ()
        else:
            shape = (draw(dims), draw(dims), draw(dims))
        sd[key] = _tensor(shape, dtype, g)
        if len(shape) == 2 and dtype in FLOATS and draw(hst.booleans()):
            selected.append(key)
    if not selected:  # a conversion with nothing to transpose is exit 2 by design
        n_in, n_out = draw(dims), draw(dims)
        sd["lin.proj"] = _tensor((n_in, n_out), draw(hst.sampled_from(FLOATS)), g)
        selected.append("lin.proj")
    return sd, selected


def _tensor(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if not dtype.is_floating_point:
        return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g,
                             dtype=torch.int64).to(dtype)
    t = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if t.numel() > 3:  # special values travel bit for bit too
        flat = t.view(-1)
        flat[0], flat[1], flat[2] = float("nan"), float("-inf"), -0.0
    return t


def _save(sd: dict[str, torch.Tensor], path: Path) -> None:
    if path.suffix == ".pt":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))


def _load(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".pt":
        return torch.load(path, weights_only=True)
    return load_file(path)


def _order(path: Path) -> list[str]:
    """Keys in file order as linconvert reads them (safetensors' own loader orders tensors
    that share an offset, the empty ones, differently from run to run)."""
    with open_checkpoint(path) as ckpt:
        return list(ckpt.specs)


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)


suffixes = hst.sampled_from([".pt", ".safetensors"])


_SETTINGS = {"deadline": None,
             "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}


@settings(max_examples=100, **_SETTINGS)
@given(case=state_dicts(), src_fmt=suffixes, mid_fmt=suffixes, back_fmt=suffixes)
def test_to_linear_then_to_param_is_bit_exact(tmp_path_factory, case, src_fmt, mid_fmt,
                                              back_fmt):
    _round_trip(tmp_path_factory.mktemp("prop"), case, src_fmt, mid_fmt, back_fmt)


@pytest.mark.fuzz
@settings(max_examples=2000, **_SETTINGS)
@given(case=state_dicts(), src_fmt=suffixes, mid_fmt=suffixes, back_fmt=suffixes)
def test_to_linear_then_to_param_is_bit_exact_long(tmp_path_factory, case, src_fmt, mid_fmt,
                                                   back_fmt):
    _round_trip(tmp_path_factory.mktemp("prop"), case, src_fmt, mid_fmt, back_fmt)


def _round_trip(folder: Path, case: tuple[dict[str, torch.Tensor], list[str]], src_fmt: str,
                mid_fmt: str, back_fmt: str) -> None:
    """to-linear then to-param: verified both times, the middle transposed exactly as
    selected, the end equal to the start bit for bit (NaN payloads, -0.0 and key order too)."""
    sd, selected = case
    src, mid, back = (folder / f"src{src_fmt}", folder / f"lin{mid_fmt}",
                      folder / f"back{back_fmt}")
    _save(sd, src)
    order = _order(src)  # safetensors' writer sorts keys; the output keeps SRC's order
    others = [k for k, t in sd.items() if t.dim() == 2 and t.dtype in FLOATS
              and k not in selected]
    options = {"layers": selected, "exclude": others}

    lin = convert.to_linear(src, mid, **options)
    assert lin.verification is not None and lin.verification.equivalent
    assert sorted(a.source for a in lin.plan.transposed) == sorted(selected)
    written = _load(mid)
    assert _order(mid) == order
    for k, t in sd.items():
        want = t.t() if k in selected else t
        assert written[k].dtype == t.dtype and written[k].shape == want.shape, k
        assert torch.equal(_bits(written[k]), _bits(want)), k

    # safetensors carries provenance, so the way back needs no options; .pt needs them again
    again = convert.to_param(mid, back, **({} if mid_fmt == ".safetensors" else options))
    assert again.verification is not None and again.verification.equivalent
    restored = _load(back)
    assert _order(back) == order
    for k, t in sd.items():
        assert restored[k].dtype == t.dtype and restored[k].shape == t.shape, k
        assert torch.equal(_bits(restored[k]), _bits(t)), k
