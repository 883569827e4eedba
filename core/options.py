"""Config-option validators shared by every method: each returns the checked value and
raises ``ValueError`` naming the option (``method.scaling``, ...) and what it must be."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def resolve_weights(
    weights: Mapping[str, float] | Sequence[float] | None,
    expert_names: Sequence[str],
    what: str = "method.weights",
) -> list[float]:
    """Per-expert weights in pool order; ``None`` means 1.0 each.

    Accepts a mapping by expert name (missing names get 1.0) or a list in pool order.
    Raises ``ValueError`` naming the problem for unknown names, wrong lengths, or
    negative / non-finite weights.
    """
    names = list(expert_names)
    if weights is None:
        return [1.0] * len(names)
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(
                f"{what} names unknown experts {unknown}; the pool's experts are {names}"
            )
        out = [float(weights.get(n, 1.0)) for n in names]
    else:
        out = [float(w) for w in weights]
        if len(out) != len(names):
            raise ValueError(
                f"{what} has {len(out)} entries but the pool has {len(names)} experts "
                f"{names}; give one weight per expert or a mapping by name"
            )
    bad = [w for w in out if not math.isfinite(w) or w < 0]
    if bad:
        raise ValueError(f"{what} must be finite and >= 0, got {out}")
    if sum(out) == 0:
        raise ValueError(f"{what} are all zero; at least one expert needs weight > 0")
    return out


def check_unit_interval(
    value: float, what: str, *, open_low: bool = False, open_high: bool = False
) -> float:
    """Validate a config value in [0, 1] (ends optionally open) and return it as float."""
    v = float(value)
    low_ok = v > 0 if open_low else v >= 0
    high_ok = v < 1 if open_high else v <= 1
    if not (low_ok and high_ok and math.isfinite(v)):
        lo = "(" if open_low else "["
        hi = ")" if open_high else "]"
        raise ValueError(f"{what} must be in {lo}0, 1{hi}, got {value}")
    return v


def check_finite(value: float, what: str) -> float:
    """Validate a finite real config value (e.g. a scaling λ) and return it as float."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a finite number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return v


def check_choice(value: str, what: str, allowed: Sequence[str]) -> str:
    """Validate that a config value is one of ``allowed`` and return it."""
    if value not in allowed:
        raise ValueError(f"{what} must be one of {list(allowed)}, got {value!r}")
    return value


def check_weights_option(
    weights: Mapping[str, float] | Sequence[float] | None, what: str = "method.weights"
) -> dict[str, float] | list[float] | None:
    """Early shape/value check of a ``weights`` option (names are checked later by
    ``resolve_weights`` in ``setup``); returns a plain dict / list / ``None``."""
    if weights is None:
        return None
    if isinstance(weights, Mapping):
        items = {str(k): v for k, v in weights.items()}
    elif isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
        items = dict(enumerate(weights))
    else:
        raise ValueError(
            f"{what} must be null, a list in pool order or a mapping by expert name, "
            f"got {weights!r}"
        )
    out: dict = {}
    for key, w in items.items():
        v = check_finite(w, f"{what}[{key!r}]")
        if v < 0:
            raise ValueError(f"{what} must be finite and >= 0, got {v} for {key!r}")
        out[key] = v
    return out if isinstance(weights, Mapping) else list(out.values())


def check_int(value: Any, what: str, minimum: int | None = None) -> int:
    """An integer config value (``minimum`` or more; an integral float such as 3.0 counts)
    returned as int; errors name the option."""
    try:
        ok = not isinstance(value, bool) and int(value) == value
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok or (minimum is not None and int(value) < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{what} must be an integer{bound}, got {value!r}")
    return int(value)


def check_bool(value: Any, what: str) -> bool:
    """A true/false config option (named in the error)."""
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {value!r}")
    return value
