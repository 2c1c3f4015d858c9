"""Parameter counts and the solver that sizes a family to a parameter target.

Counts come from building the model on PyTorch's meta device (shapes only, no memory, no arithmetic),
so they are exact for any family, a user's included, and take milliseconds even at 110M parameters.

`solve` turns the family's `scale(width)` knob: `scale(w)` gives the family's preferred shape at width w
(e.g. the Transformer's d_model = w with heads and blocks ~ w / 64, as in its presets). It bisects the
width for the target, whose count grows with w. Where a shape change jumps over the target (the
Transformer adding a block, say), it also keeps the shape on either side of the jump and moves only the
width field (the first field `scale` returns, e.g. d_model), which closes the gap. The closest
candidate wins, preferring the family's own shapes when they are within tolerance; if none is within
it, a UserError says what the nearest size is.
"""

from __future__ import annotations

import math
import re
import typing
from functools import lru_cache
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from picollm.errors import UserError
from picollm.models.registry import build_model, get_family
from picollm.schema import coerce

TOLERANCE = 0.02
MAX_WIDTH = 1 << 14

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_count(text: str | int | float) -> int:
    """'3.2M' -> 3_200_000; also '110M', '500K', '7e6', '1.5B', '1_000_000' and plain numbers."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9][0-9_,]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*",
                             str(text))
        if match is None:
            raise UserError(f"parameter count {text!r} is not a number; write e.g. 3.2M, 110M, 500K or 7e6")
        value = float(match.group(1).replace("_", "").replace(",", "")) * _SUFFIXES[match.group(2).lower()]
    if not math.isfinite(value) or value < 1:
        raise UserError(f"parameter count {text!r} must be a positive number, e.g. 3.2M")
    return int(round(value))


def count_parameters(spec: dict[str, Any], non_embedding: bool = False) -> int:
    """Parameters of the model `{"family": ..., **fields}` would have, built on the meta device."""
    family = get_family(str(spec.get("family")))
    # the classes are part of the key: a family registered again under the same name counts afresh
    return _counts(_freeze(spec), family.config_cls, family.model_cls)[1 if non_embedding else 0]


def _freeze(spec: dict[str, Any]) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in spec.items()))


class _SkipInit(TorchFunctionMode):
    """Skips in-place initialisers on meta tensors: they do nothing there but are slow to trace."""

    SKIP = frozenset({"normal_", "uniform_", "zero_", "zeros_", "ones_", "fill_", "constant_", "copy_",
                      "kaiming_normal_", "kaiming_uniform_", "xavier_normal_", "xavier_uniform_",
                      "trunc_normal_", "orthogonal_", "erfinv_", "mul_", "add_", "clamp_"})

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in self.SKIP:
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def build_on_meta(spec: dict[str, Any]) -> Any:
    """The model `{"family": ..., **fields}` on the meta device: every shape, no memory, no arithmetic."""
    with torch.device("meta"), _SkipInit():
        return build_model(spec)


@lru_cache(maxsize=4096)
def _counts(frozen: tuple, config_cls: type, model_cls: type) -> tuple[int, int]:
    model = build_on_meta(dict(frozen))
    return model.num_parameters(), model.num_parameters(non_embedding=True)


def solve(family: str, target: int, vocab_size: int = 50257, non_embedding: bool = False,
          base: dict[str, Any] | None = None) -> dict[str, Any]:
    """Config fields `{"family": ..., **fields}` of `family` whose parameter count (total, or without the
    embeddings and output layer) is within 2% of `target` at `vocab_size`.

    `base` holds fields to keep (e.g. `{"k": 4, "input": "onehot"}` or `{"n_layers": 4}`); they win over
    the shape `scale` proposes, except the width field, which is what the solver sets. The result, like
    `preset_fields`, leaves vocab_size out: put the same vocab_size in the model config.
    """
    fam = get_family(family)
    if fam.scale is None:
        raise UserError(f"model family '{family}' registered no scale() knob, so it cannot be sized")
    if target < 1:
        raise UserError(f"the parameter target must be positive, got {target}")
    if vocab_size < 2:
        raise UserError(f"vocab size must be at least 2, got {vocab_size}")
    base = {k: v for k, v in (base or {}).items() if k not in ("family", "vocab_size")}
    hints = typing.get_type_hints(fam.config_cls)
    for key, value in base.items():
        if key not in hints:
            raise UserError(f"unknown {family} field '{key}'; allowed: {', '.join(sorted(hints))}")
        base[key] = coerce(value, hints[key], f"model.{key}")
    width_key = next(iter(fam.scale(1)))
    if width_key in base:
        raise UserError(f"'{width_key}' is what the solver sets for {family}; do not fix it")
    what = "non-embedding parameters" if non_embedding else "parameters"

    def fields_at(width: int, shape_of: int | None = None) -> dict[str, Any]:
        """scale(width), or scale(shape_of) with only the width field taken from scale(width)."""
        own = fam.scale(width)
        if shape_of is None or shape_of == width:
            return {**own, **base}
        return {**fam.scale(shape_of), width_key: own[width_key], **base}

    def error(fields: dict[str, Any]) -> float:
        return abs(count(fields) - target) / target  # type: ignore[operator]

    def count(fields: dict[str, Any]) -> int | None:
        try:
            return count_parameters({"family": family, "vocab_size": vocab_size, **fields}, non_embedding)
        except UserError:  # a width the shape does not allow (e.g. heads not dividing it)
            return None

    def valid_from(width: int, shape_of: int | None, step: int) -> int | None:
        """The nearest width from `width` in direction `step` whose shape is valid (within 256 widths)."""
        for v in range(width, width + 256 * step, step):
            if 1 <= v <= MAX_WIDTH and count(fields_at(v, shape_of)) is not None:
                return v
        return None

    def crossing(shape_of: int | None) -> int | None:
        """Smallest valid width whose count reaches the target (counts grow with the width)."""
        below, probe = 0, 1
        while True:  # gallop past the target, then bisect between the last two probes
            v = valid_from(probe, shape_of, 1)
            if v is None:
                return None
            if count(fields_at(v, shape_of)) >= target:  # type: ignore[operator]
                break
            below, probe = v, 2 * v
        best, lo, hi = v, below + 1, v - 1
        while lo <= hi:
            mid = (lo + hi) // 2
            v = valid_from(mid, shape_of, 1)
            if v is None or v > hi:
                hi = mid - 1
            elif count(fields_at(v, shape_of)) >= target:  # type: ignore[operator]
                best, hi = v, mid - 1
            else:
                lo = v + 1
        return best

    # 1. the family's own shapes: the width where the count crosses the target, and the one before
    w = crossing(None)
    if w is None:
        raise UserError(f"{family} cannot reach {target:,} {what}: no valid width up to {MAX_WIDTH:,} "
                        "gets there with the fields given")
    below = valid_from(w - 1, None, -1)
    own = [fields_at(v) for v in (w, below) if v is not None]
    scored = [(error(f), True, f) for f in own]
    # 2. across a jump between those shapes: keep each side's shape and move only the width
    if min(s[0] for s in scored) > TOLERANCE:
        for side in [v for v in (w, below) if v is not None]:
            x = crossing(side)
            for v in (x, valid_from((x or MAX_WIDTH + 1) - 1, side, -1)):
                if v is not None:
                    scored.append((error(fields_at(v, side)), False, fields_at(v, side)))

    good = [s for s in scored if s[0] <= TOLERANCE]
    if good:
        own_good = [s for s in good if s[1]]
        best = min(own_good or good, key=lambda s: s[0])
    else:
        nearest = min(scored, key=lambda s: s[0])
        achieved = count(nearest[2])
        raise UserError(
            f"{family} cannot reach {target:,} {what} within {TOLERANCE:.0%} at vocab size {vocab_size:,}: "
            f"the nearest is {achieved:,} ({nearest[0]:.1%} off); try another target or fix other fields")
    return {"family": family, **best[2]}
