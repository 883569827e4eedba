"""SLERP: spherical linear interpolation of two models, tensor by tensor (Shoemake 1985).

Per tensor, with a, b the two models' flattened values and â, b̂ their unit vectors:
Ω = arccos(â·b̂), θ = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b. When |â·b̂| > 0.9995 the
two are nearly colinear and the interpolation is linear, (1−t)·a + t·b.

Choices the method leaves open, decided here:
- Which two models: ``models`` names two pool members ("base" or expert names); left
  null, the pool must hold exactly two experts and those are used (``t`` runs from the
  first to the second). The pool's base is otherwise unused.
- The angle is measured between the raw weights (not task vectors), as mergekit's
  ``slerp`` does; a zero-norm tensor is left unnormalised (norm threshold 1e-8) and the
  colinearity threshold is 0.9995, both mergekit's values.
- Arithmetic in float32 (as the tensors arrive); the angle and the two factors are
  computed in float64 from the float32 dot product, then applied in float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from core.options import check_unit_interval
from methods.base import MergeMethod

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp(t: float, a: Tensor, b: Tensor) -> Tensor:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1) of two same-shape tensors."""
    na, nb = float(a.norm()), float(b.norm())
    ua = a / na if na > NORM_EPS else a
    ub = b / nb if nb > NORM_EPS else b
    dot = float((ua * ub).sum())
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * a + t * b
    omega = math.acos(dot)
    s = math.sin(omega)
    return (math.sin((1 - t) * omega) / s) * a + (math.sin(t * omega) / s) * b


class SLERP(MergeMethod):
    """Plugin for :func:`slerp`. Options: ``t`` in [0, 1] (default 0.5); ``models``: the
    two members to interpolate, e.g. ``[math, code]`` or ``[base, math]`` (default: the
    pool's two experts)."""

    name = "slerp"

    def __init__(self, t: float = 0.5, models: Sequence[str] | None = None) -> None:
        self.t = check_unit_interval(t, "method.t")
        if models is not None and (isinstance(models, str) or len(list(models)) != 2):
            raise ValueError(f"method.models must name exactly two pool members, got {models!r}")
        self.models_option = None if models is None else [str(m) for m in models]
        self.models: list[str] = []

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        if self.models_option is None:
            if len(self.expert_names) != 2:
                raise ValueError(
                    f"SLERP interpolates two models but the pool has {len(self.expert_names)} "
                    f"experts {self.expert_names}; name two with method.models=[a,b] "
                    "(pool members, 'base' included)"
                )
            self.models = list(self.expert_names)
            return
        known = ["base", *self.expert_names]
        unknown = [m for m in self.models_option if m not in known]
        if unknown or self.models_option[0] == self.models_option[1]:
            raise ValueError(
                f"method.models={self.models_option} must name two different pool members "
                f"of {known}"
            )
        self.models = list(self.models_option)

    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        a, b = (base if m == "base" else experts[m] for m in self.models)
        return slerp(self.t, a, b)

    def report(self) -> dict[str, Any]:
        return {"models": self.models, "t": self.t}
