"""The tensors that travel with a linear weight, and what a transpose of the weight does to them.

One table says, for each way a layer stores its weight (`P.weight`, prune's `P.weight_orig`,
weight norm's `P.weight_v` or `P.parametrizations.weight.original1`, `P.W`, `P.kernel`), the
names of its siblings and their roles. Selection (bias evidence), planning (which companions
are transposed with their weight) and verification (the layer's bias, its dequantization) all
read it. How a companion follows its weight is decided from its role and its shape:

| role       | shape (weight `[R, C]`, stacks `[E..., R, C]`) | when the weight is transposed |
|------------|------------------------------------------------|-------------------------------|
| bias       | `[out]`                                        | kept                          |
| scale      | a scalar (or one per stack member)             | kept                          |
| scale      | `[n]`, n one of R, C                           | kept (a per-channel vector)   |
| scale      | `[r, c]` tiling `[R, C]` in blocks (`[out, 1]`) | transposed (`[1, out]`)      |
| same-shape | `[R, C]`                                       | transposed (prune's mask)     |

spectral_norm's `weight_u` `[out]` and `weight_v` `[in]` beside `weight_orig` are per-channel
vectors: kept.

A 4-bit packed weight (`weight_packed`) cannot be transposed byte by byte, and a `weight_shape`
records the weight's shape as values: both are refused by name. No torch here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from fnmatch import fnmatchcase
from types import MappingProxyType


class Role(Enum):
    """What a sibling of a weight is to it."""

    BIAS = "bias"
    SCALE = "scale"  # a quantization scale or zero point, a weight norm's magnitude `g`
    SAME_SHAPE = "same-shape"  # prune's mask: an element for each of the weight's
    GRID = "grid"  # a scale known to be a block grid (a `[[companion]]` rule says so)
    VECTOR = "vector"  # a 1-D per-channel vector, kept
    SCALAR = "scalar"  # one value, kept


class Follows(Enum):
    """What a companion's bytes do when its weight is transposed."""

    TRANSPOSED = "transposed"
    KEPT = "kept"


# For each way a layer names its weight: the weight's name within the layer, and its siblings'.
_SCALES = ("weight_scale", "weight_scale_inv", "weight_zero_point", "weight_global_scale",
           "input_scale", "input_zero_point", "input_global_scale", "activation_scale")
LAYER_FORMS: Mapping[str, tuple[tuple[str, Role], ...]] = MappingProxyType({
    "weight": (("bias", Role.BIAS), *((n, Role.SCALE) for n in _SCALES)),
    "weight_orig": (("bias", Role.BIAS), ("weight_mask", Role.SAME_SHAPE),  # prune
                    ("weight_u", Role.SCALE), ("weight_v", Role.SCALE)),  # spectral_norm
    "weight_v": (("bias", Role.BIAS), ("weight_g", Role.SCALE)),  # weight_norm
    "parametrizations.weight.original1": (  # parametrizations.weight_norm
        ("bias", Role.BIAS), ("parametrizations.weight.original0", Role.SCALE)),
    "W": (("b", Role.BIAS),),
    "kernel": (("bias", Role.BIAS),),
})
# Names that say "this layer's weight is not stored as a plain matrix": refused where the
# weight would be transposed.
REFUSED = MappingProxyType({
    "weight_packed": "holds 4-bit values packed several to a byte (or to an int32), which a "
                     "byte-wise transpose would scramble",
    "weight_shape": "records the weight's shape as values, which a transpose does not rewrite",
})


def layer_of(key: str) -> tuple[str, str] | None:
    """(the layer's prefix with its dot, the weight's form) if KEY names a layer's weight."""
    for form in LAYER_FORMS:
        if key == form:
            return "", form
        if key.endswith("." + form):
            return key[:-len(form)], form
    return None


def siblings(key: str, role: Role) -> tuple[str, ...]:
    """The keys that would be KEY's siblings of ROLE (`P.weight` -> `P.bias`)."""
    found = layer_of(key)
    if found is None:
        return ()
    prefix, form = found
    return tuple(prefix + name for name, r in LAYER_FORMS[form] if r is role)


def bias_key(key: str, shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """KEY's bias sibling present in SHAPES, if any: 1-D for a matrix, `[E, n]` for a stack."""
    dims = len(shapes.get(key, (0, 0))) - 1
    return next((b for b in siblings(key, Role.BIAS) if len(shapes.get(b, ())) == dims), None)


def quantized_weight(key: str, dtype: str, shape: tuple[int, ...],
                     shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """An int8 / uint8 matrix with a quantization scale beside it: a quantized linear weight,
    moved as bytes like a float one."""
    return (dtype in ("I8", "U8") and len(shape) >= 2
            and any(c in shapes for c in siblings(key, Role.SCALE)))


@dataclass(frozen=True)
class CompanionRule:
    """`[[companion]]` in a rules file: keys matching KEY are companions of ROLE of the weight
    in their layer (BLOCK: a grid's block size, rows and columns, where it cannot be told)."""

    key: str
    role: Role
    block: tuple[int, int] | None = None
    origin: str = "rules file"
    shipped: bool = False

    def matches(self, key: str) -> bool:
        return fnmatchcase(key, self.key)

    def __str__(self) -> str:
        return f"{self.origin} '{self.key}'"


@dataclass(frozen=True)
class Companion:
    """A sibling of a weight, its role, and what it does when the weight is transposed."""

    key: str
    weight: str
    role: Role
    follows: Follows
    kind: str  # words: "block-scale grid 2x3", "per-channel vector", "scalar", "mask"
    block: tuple[int, int] | None = None  # a grid's block size (rows, columns) on the weight

    @property
    def evidence(self) -> str:
        return f"{self.kind} of '{self.weight}'"


class CompanionError(ValueError):
    """A companion whose shape contradicts its weight, or that fits no role (the message)."""


def _blocks(n: int, k: int) -> list[int]:
    """The block sizes B with ceil(N / B) == K (K blocks tile N), as a range's ends."""
    if k < 1 or k > max(n, 1):
        return []
    lo = -(-n // k)
    hi = (n - 1) // (k - 1) if k > 1 else max(n, 1)
    return [lo, hi] if lo <= hi else []


def block_size(n: int, k: int, preferred: Sequence[int] = (128, 64, 32, 16, 256)) -> int | None:
    """The block size that tiles N in K blocks: one of PREFERRED where it fits (FP8 checkpoints
    use 128), else the smallest that does; None if none does."""
    ends = _blocks(n, k)
    if not ends:
        return None
    if k == n:
        return 1
    if k == 1:
        return max(n, 1)
    return next((b for b in preferred if ends[0] <= b <= ends[1]), ends[0])


def classify(key: str, weight: str, role: Role, shape: tuple[int, ...],
             weight_shape: tuple[int, ...], block: tuple[int, int] | None = None) -> Companion:
    """How the companion KEY of WEIGHT follows it, from its role and shape.

    Raises:
        CompanionError: the shape contradicts the weight (a grid that does not tile it, a mask
            of another shape, a vector of another length).
    """
    lead, (rows, cols) = tuple(weight_shape[:-2]), weight_shape[-2:]
    dims = f"{'x'.join(map(str, weight_shape))}"
    described = "x".join(map(str, shape)) or "scalar"
    if role is Role.BIAS:
        return Companion(key, weight, role, Follows.KEPT, "bias")
    if role is Role.SAME_SHAPE:
        if tuple(shape) != tuple(weight_shape):
            raise CompanionError(f"'{key}' is {described} but its weight '{weight}' is {dims}: "
                                 "an element-wise companion (a mask) must have the weight's shape")
        return Companion(key, weight, role, Follows.TRANSPOSED, "same-shape companion (mask)")
    own = tuple(shape[len(lead):]) if tuple(shape[:len(lead)]) == lead else None
    if (math.prod(shape) == 1 or own in ((), (1,))) and role in (Role.SCALE, Role.SCALAR):
        return Companion(key, weight, role, Follows.KEPT, "scalar")
    if own is not None and len(own) == 1 and role in (Role.SCALE, Role.VECTOR):
        if own[0] not in (rows, cols):
            raise CompanionError(f"'{key}' is a vector of {own[0]} but its weight '{weight}' is "
                                 f"{dims}: a per-channel companion has one value per row or "
                                 "column")
        return Companion(key, weight, role, Follows.KEPT, "per-channel vector")
    if own is not None and len(own) == 2 and role in (Role.SCALE, Role.GRID):
        r, c = own
        if block is not None:
            fits = -(-rows // block[0]) == r and -(-cols // block[1]) == c
            b = block if fits else None
        else:
            br, bc = block_size(rows, r), block_size(cols, c)
            b = (br, bc) if br is not None and bc is not None else None
        if b is None:
            raise CompanionError(
                f"'{key}' is a {r}x{c} grid, which does not tile its weight '{weight}' "
                f"({dims}) in blocks of ceil({rows}/B) x ceil({cols}/B)"
                + (f" with the block {block[0]}x{block[1]} its rule gives" if block else "")
                + ": a scale that contradicts its weight")
        kind = ("per-channel scale" if (r, c) in ((rows, 1), (1, cols)) else
                f"block-scale grid ({b[0]}x{b[1]} blocks)")
        return Companion(key, weight, role, Follows.TRANSPOSED, kind, b)
    raise CompanionError(f"'{key}' is {described}, which is no {role.value} of its weight "
                         f"'{weight}' ({dims})")


def companion_map(shapes: Mapping[str, tuple[int, ...]], rules: Sequence[CompanionRule] = ()
                  ) -> dict[str, tuple[str, Role, tuple[int, int] | None]]:
    """companion key -> (its weight, role, block) for every layer weight in SHAPES: the table's
    names, and keys a `[[companion]]` rule names in a layer with a weight (a rule wins over
    the table: it may give a grid's block). Biases keep their own rules and are left out."""
    out: dict[str, tuple[str, Role, tuple[int, int] | None]] = {}
    weights_at: dict[str, str] = {}
    for w in shapes:
        found = layer_of(w)
        if found is None or len(shapes[w]) < 2:  # (spectral_norm's 1-D weight_v is no weight)
            continue
        prefix, form = found
        weights_at.setdefault(prefix, w)
        for name, role in LAYER_FORMS[form]:
            c = prefix + name
            if role is not Role.BIAS and c in shapes and c not in out and (
                    layer_of(c) is None or len(shapes[c]) < 2):
                out[c] = w, role, None
    for k in shapes if rules else ():
        rule = next((r for r in rules if r.matches(k)), None)
        w = weights_at.get(_prefix(k)) if rule is not None else None
        if rule is not None and w is not None and w != k:
            out[k] = w, rule.role, rule.block
    return out


def _prefix(key: str) -> str:
    """The layer a key belongs to: everything up to its last name part (`parametrizations.`
    parts belong to the layer they parametrize)."""
    found = layer_of(key)
    if found is not None:
        return found[0]
    for form in LAYER_FORMS:
        for name, _ in LAYER_FORMS[form]:
            if key == name or key.endswith("." + name):
                return key[:-len(name)]
    head, dot, _ = key.rpartition(".")
    return head + dot


def strangers(weight: str, shapes: Mapping[str, tuple[int, ...]],
              known: set[str]) -> list[str]:
    """WEIGHT's siblings (keys of its layer) outside KNOWN that share one of its last two dims:
    tensors nothing says how to treat when the weight is transposed."""
    found = layer_of(weight)
    if found is None or found[1] in ("W", "kernel"):  # hand-written and Flax/Keras layers:
        return []  # their siblings are other layers' tensors as often as not
    prefix = found[0]
    dims = set(shapes[weight][-2:]) - {1}
    out = []
    for k, shape in shapes.items():
        if k == weight or k in known or not k.startswith(prefix):
            continue
        rest = k[len(prefix):]
        if "." in rest and not rest.startswith("parametrizations."):
            continue
        if dims & set(shape):
            out.append(k)
    return out
