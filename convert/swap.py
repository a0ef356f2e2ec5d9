"""Live modules: swap a model's param-layout layers for `nn.Linear` (or back), in place.

`swap_modules(model, "linear")` replaces every `ParamLinear`, Hugging Face `Conv1D` and
user-named param-layout class (weight `in x out`, forward `x @ W + b`) by the `nn.Linear`
computing the same function; `"param"` turns every plain `nn.Linear` into a `ParamLinear`.
Tools that only recognise `nn.Linear` (dynamic quantization, LoRA libraries) then see those
layers. Everything is checked before the model is touched: what can be converted, ties, and
(unless `verify=False`) each new module's forward pass against the old one's; any refusal
leaves the model as it was.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .dtypes import dtype_from_torch
from .errors import NotEquivalentError, UsageError
from .layout import Layout
from .selection import Pattern
from .verify.report import CheckResult


@dataclass(frozen=True)
class SwappedModule:
    """One module replaced: where it sits, what it was and became, and how it verified."""

    name: str  # the qualified module name (the first, where the module is registered twice)
    old_class: str
    new_class: str
    old_shape: tuple[int, ...]  # the weight's shape before the swap
    new_shape: tuple[int, ...]
    dtype: str
    device: str
    also_named: tuple[str, ...] = ()  # other names of the same module object
    check: CheckResult | None = None  # the forward-pass check; None with verify=False

    @property
    def passed(self) -> bool:
        return self.check is None or self.check.passed

    @property
    def message(self) -> str:
        return self.check.message if self.check is not None else ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "old_class": self.old_class, "new_class": self.new_class,
                "old_shape": list(self.old_shape), "new_shape": list(self.new_shape),
                "dtype": self.dtype, "device": self.device, "also_named": list(self.also_named),
                "check": self.check.to_dict() if self.check is not None else None}


@dataclass(frozen=True)
class SwapReport:
    """What `swap_modules` swapped (or, raised with `NotEquivalentError`, would have)."""

    layout: Layout  # the layout the swapped modules are in now
    modules: tuple[SwappedModule, ...]
    applied: bool  # False where verification failed and the model was left unchanged
    verified: bool
    seed: int = 0
    batch_size: int = 8
    atol: float | None = None
    rtol: float | None = None

    @property
    def failures(self) -> list[SwappedModule]:
        return [m for m in self.modules if not m.passed]

    @property
    def equivalent(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"layout": self.layout.value, "applied": self.applied,
                "verified": self.verified, "equivalent": self.equivalent,
                "seed": self.seed, "batch_size": self.batch_size, "atol": self.atol,
                "rtol": self.rtol, "failures": [m.name for m in self.failures],
                "modules": [m.to_dict() for m in self.modules]}


@dataclass
class _Candidate:
    """A module to swap, its names and places, and its replacement once built."""

    module: Any
    names: list[str]
    new: Any = None


def swap_modules(model: Any, to: Layout | str, *, modules: Sequence[type] | type = (),
                 include: Sequence[str] | str = (), exclude: Sequence[str] | str = (),
                 verify: bool = True,
                 atol: float | None = None, rtol: float | None = None, seed: int = 0,
                 batch_size: int = 8) -> SwapReport:
    """Convert MODEL's linear layers to layout TO in place, weights transposed.

    Args:
        model: an `nn.Module`; its submodules are replaced, the model object itself is kept.
        to: `"linear"`: every `ParamLinear`, transformers' `Conv1D` and instance of a class in
            MODULES becomes `nn.Linear`; `"param"`: every `nn.Linear` (exactly that class, not
            a subclass) becomes `ParamLinear`.
        modules: the user's own param-layout classes (a `weight` of shape `in x out`, an
            optional `bias`, forward `x @ W + b`), for `to="linear"`.
        include, exclude: globs (or `re:` patterns) on qualified module names (`h.*.attn.*`).
        verify: run each old and new module on the same seeded random batch (on the module's
            device, in its dtype; float16/bfloat16 layers in float32, as the per-layer checks
            do) and require the same outputs and a bit-exact transpose.
        atol, rtol: override the per-dtype tolerances of `verify` (README: Verification).

    Weights are transposed on their own device and dtype, `requires_grad` is kept, biases are
    the same Parameter objects; parameters tied among swapped weights stay tied.

    Returns:
        A `SwapReport` naming each swapped module with its classes, shapes and errors.

    Raises:
        UsageError: an unknown TO, nothing to swap, a module that cannot be converted, or a
            swapped weight tied to a parameter that would not be transposed with it.
        NotEquivalentError: verification failed (`.report` holds the SwapReport).
        In every case the model is left unchanged.
    """
    import torch

    layout = _layout(to)
    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"swap_modules: model must be an nn.Module, not {type(model).__name__}.")
    if verify and batch_size < 1:
        raise UsageError(f"swap_modules: batch_size={batch_size} runs nothing; use 1 or more "
                         "(or verify=False).")
    # one class or one pattern stands for a list of one
    modules = (modules,) if isinstance(modules, type) else tuple(modules)
    include = (include,) if isinstance(include, str) else include
    exclude = (exclude,) if isinstance(exclude, str) else exclude
    if modules and layout is not Layout.LINEAR:
        raise UsageError("modules= names param-layout classes to turn into nn.Linear, so it "
                         "needs to='linear'; to='param' converts every nn.Linear.")
    for cls in modules:
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise UsageError(f"modules= takes nn.Module classes; {cls!r} is not one.")
    candidates = _find(model, layout, modules, [Pattern(p, "include") for p in include],
                       [Pattern(p, "exclude") for p in exclude], verify)
    _check_ties(model, candidates)
    new_weights: dict[int, Any] = {}
    for c in candidates:
        c.new = _replacement(c.module, layout, new_weights)
    records = [_verify(c, seed, batch_size, atol, rtol) if verify else _record(c)
               for c in candidates]
    report = SwapReport(layout, tuple(records), all(r.passed for r in records), verify,
                        seed, batch_size, atol, rtol)
    if report.failures:
        from .verify.report import describe_failures

        raise NotEquivalentError(f"swap_modules: the new {_target_name(layout)} of "
                                 f"{describe_failures(report.failures)} does not compute what "
                                 "the module it replaces does; the model was not changed.",
                                 report)
    for c in candidates:
        for name in c.names:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, c.new)
    return report


def _layout(to: Layout | str) -> Layout:
    try:
        return Layout(to)
    except ValueError:
        raise UsageError(f"swap_modules: to={to!r} is not a layout; use to='linear' or "
                         "to='param'.") from None


def _target_name(layout: Layout) -> str:
    return "nn.Linear" if layout is Layout.LINEAR else "ParamLinear"


def _class_name(obj: Any) -> str:
    """`nn.Linear`, `ParamLinear`, or a class of another package with its module."""
    cls = type(obj)
    if cls.__module__.startswith("torch.nn."):
        return f"nn.{cls.__qualname__}"
    if cls.__module__.startswith("convert."):
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_source(module: Any, layout: Layout, modules: tuple[type, ...]) -> bool:
    """Whether MODULE is a layer that swapping to LAYOUT replaces."""
    from torch import nn

    from .selection import _owner_layout

    if layout is Layout.PARAM:
        return type(module) is nn.Linear  # a subclass may compute something else
    return _owner_layout(module, "weight") is Layout.PARAM or isinstance(module, modules)


def _find(model: Any, layout: Layout, modules: tuple[type, ...], include: list[Pattern],
          exclude: list[Pattern], verify: bool) -> list[_Candidate]:
    """The modules to swap, in model order, each with every name it is registered under."""
    found: dict[int, _Candidate] = {}
    chosen: dict[int, list[bool]] = {}
    used = {id(p): False for p in (*include, *exclude)}
    for name, module in model.named_modules(remove_duplicate=False):
        if not _is_source(module, layout, modules):
            continue
        if not name:
            raise UsageError(f"swap_modules: the model itself is a {type(module).__name__}; "
                             "it replaces a model's submodules in place, so wrap it "
                             "(nn.Sequential(model)) or build the new layer directly.")
        hits = [p for p in include if p.matches(name)]
        misses = [p for p in exclude if p.matches(name)]
        for p in (*hits, *misses):
            used[id(p)] = True
        chosen.setdefault(id(module), []).append((not include or bool(hits)) and not misses)
        found.setdefault(id(module), _Candidate(module, [])).names.append(name)
    unused = [str(p) for p in (*include, *exclude) if not used[id(p)]]
    if unused:
        raise UsageError(f"swap_modules: {', '.join(unused)} matches no "
                         f"{_source_names(layout, modules)} module of the model.")
    for key, decisions in chosen.items():
        if len(set(decisions)) > 1:
            names = found[key].names
            raise UsageError(f"swap_modules: module '{names[0]}' is also registered as "
                             f"'{names[1]}', and include/exclude select one name but not the "
                             "other; select both or neither.")
    picked = [found[k] for k, decisions in chosen.items() if decisions[0]]
    if not picked:
        why = (" (all excluded by include/exclude)" if found else "")
        raise UsageError(f"swap_modules: nothing to swap to '{layout.value}' in "
                         f"{type(model).__name__}: no {_source_names(layout, modules)} "
                         f"module{why}.")
    for c in picked:
        _check_convertible(c.module, c.names[0], layout, verify)
    return picked


def _source_names(layout: Layout, modules: tuple[type, ...]) -> str:
    if layout is Layout.PARAM:
        return "nn.Linear"
    return ", ".join(["ParamLinear", "Conv1D", *(m.__name__ for m in modules)])


def _check_convertible(module: Any, name: str, layout: Layout, verify: bool) -> None:
    """UsageError unless MODULE is exactly a weight (and bias) that the swap can carry over."""
    from torch import nn

    what = f"swap_modules: module '{name}' ({type(module).__name__})"
    weight = module._parameters.get("weight")
    if not isinstance(weight, nn.Parameter) or weight.ndim != 2 \
            or not weight.is_floating_point():
        raise UsageError(f"{what} has no 2-D float Parameter 'weight' (a parametrization or a "
                         "quantized weight?), so it cannot be converted; exclude it.")
    out_features = weight.shape[1] if layout is Layout.LINEAR else weight.shape[0]
    bias = module._parameters.get("bias")
    if bias is not None and (bias.ndim != 1 or bias.shape[0] != out_features
                             or bias.dtype != weight.dtype):
        raise UsageError(f"{what} has a bias of shape {tuple(bias.shape)} ({bias.dtype}) where "
                         f"its weight {tuple(weight.shape)} needs [{out_features}] "
                         f"({weight.dtype}), so it cannot be converted; exclude it.")
    others = [n for n, _ in module.named_parameters(recurse=True, remove_duplicate=False)
              if n not in ("weight", "bias")]
    others += [n for n, _ in module.named_buffers(recurse=True, remove_duplicate=False)]
    others += [n for n, _ in module.named_children()]
    if others:
        raise UsageError(f"{what} also holds '{others[0]}', which {_target_name(layout)} would "
                         "not keep, so it cannot be converted; exclude it.")
    if module._forward_hooks or module._forward_pre_hooks or module._backward_hooks \
            or module._backward_pre_hooks:
        raise UsageError(f"{what} has hooks, which its replacement would not keep; remove "
                         "them first or exclude it.")
    if verify and weight.device.type == "meta":
        raise UsageError(f"{what} is on the meta device, with no data to verify; pass "
                         "verify=False.")


def _check_ties(model: Any, candidates: list[_Candidate]) -> None:
    """UsageError if a swapped weight is also a parameter that would not be transposed."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    swapped = {f"{n}.weight" for c in candidates for n in c.names}
    for c in candidates:
        own = f"{c.names[0]}.weight"
        for other in names.get(id(c.module.weight), ()):
            if other not in swapped:
                raise UsageError(f"swap_modules: '{own}' is tied to '{other}', which would not "
                                 f"be transposed with it; exclude=['{c.names[0]}'] (or untie "
                                 "them); the model was not changed.")


def _transposed(weight: Any) -> Any:
    """WEIGHT's transpose as a new Parameter, on its device and dtype, `requires_grad` kept."""
    import torch
    from torch import nn

    with torch.no_grad():
        new = nn.Parameter(weight.t().contiguous(), requires_grad=weight.requires_grad)
    if weight.grad is not None:
        new.grad = weight.grad.t().contiguous()
    return new


def _replacement(module: Any, layout: Layout, new_weights: dict[int, Any]) -> Any:
    """The layer in LAYOUT computing what MODULE does; a weight tied among swapped modules
    becomes one new Parameter (NEW_WEIGHTS: old Parameter's id -> new one)."""
    from torch import nn

    from .modules import ParamLinear

    weight, bias = module.weight, module._parameters.get("bias")
    in_f, out_f = weight.shape if layout is Layout.LINEAR else weight.shape[::-1]
    cls = nn.Linear if layout is Layout.LINEAR else ParamLinear
    new = cls(in_f, out_f, bias=bias is not None, device="meta", dtype=weight.dtype)
    if id(weight) not in new_weights:
        new_weights[id(weight)] = _transposed(weight)
    new.weight = new_weights[id(weight)]
    if bias is not None:
        new.bias = bias
    new.train(module.training)
    return new


def _record(c: _Candidate, check: CheckResult | None = None) -> SwappedModule:
    old, new = c.module.weight, c.new.weight
    return SwappedModule(c.names[0], _class_name(c.module), _class_name(c.new),
                         tuple(old.shape), tuple(new.shape), dtype_from_torch(old.dtype),
                         str(old.device), tuple(c.names[1:]), check)


def _verify(c: _Candidate, seed: int, batch_size: int, atol: float | None,
            rtol: float | None) -> SwappedModule:
    """C's old and new module on one seeded random batch, and the weight's transpose bits.

    Half-precision layers run in float32, as the per-layer checks do (`_COMPUTE_DTYPE`): the
    upcast is exact, so the check measures the weights, not how two fp16 kernels round.
    """
    import torch
    from torch.func import functional_call

    from .dtypes import torch_dtype
    from .verify.layers import (
        _COMPUTE_DTYPE,
        _transposed_bits_equal,
        compare_outputs,
        ieee_float32,
        tolerance_for,
    )

    old_w, new_w = c.module.weight, c.new.weight
    compute = _COMPUTE_DTYPE.get(dtype_from_torch(old_w.dtype), "F32")
    dtype = torch_dtype(compute)
    in_f = new_w.shape[1] if isinstance(c.new, torch.nn.Linear) else new_w.shape[0]
    check = CheckResult(c.names[0], _class_name(c.module), "layer", False, compute,
                        tuple(new_w.shape),
                        bit_exact=_transposed_bits_equal(old_w.detach(), new_w.detach()))
    gen = torch.Generator().manual_seed(seed + zlib.crc32(c.names[0].encode()))
    x = torch.randn(batch_size, in_f, generator=gen, dtype=torch.float64).to(old_w.device, dtype)

    def run(module: Any) -> Any:
        params = {k: p.detach().to(dtype) for k, p in module._parameters.items()
                  if p is not None}
        return functional_call(module, params, (x,))

    try:
        with torch.no_grad(), ieee_float32():
            expected, actual = run(c.module), run(c.new)
    except (RuntimeError, TypeError, ValueError) as e:  # not a layer of an [N, in] batch
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        check.message = f"its forward on a {batch_size}x{in_f} batch raised: {first}"
        return _record(c, check)
    if not isinstance(expected, torch.Tensor):
        check.message = f"its forward returned a {type(expected).__name__}, not a tensor"
        return _record(c, check)
    r_tol, a_tol = tolerance_for(compute, atol, rtol)
    check.passed, check.max_abs_err, check.rel_err, check.atol_needed, check.message = \
        compare_outputs(actual, expected, in_f, r_tol, a_tol)
    if not check.bit_exact:
        check.passed = False
        check.message = "weight is not the bit-exact transpose of the old one" + (
            f"; {check.message}" if check.message else "")
    return _record(c, check)
