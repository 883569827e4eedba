"""Karcher mean / multi-SLERP: a weighted mean of ≥ 2 models on the unit sphere, tensor by
tensor, with the norms averaged separately (mergekit's ``karcher`` and ``multislerp``
merge methods; Karcher 1977 for the Riemannian centre of mass; multislerp after
goddard.blog/posts/multislerp-wow-what-a-cool-idea).

Per tensor, with x_k the flattened tensors, n_k = ‖x_k‖, u_k = x_k / n_k and weights w_k
normalised to sum 1:

- ``karcher`` (default): the weighted Fréchet mean u of the u_k by fixed-point iteration.
  Start at the normalised weighted arithmetic mean of the u_k; each step takes the log map
  T = Σ_k w_k · θ_k / sin θ_k · (u_k − cos θ_k · u), θ_k = arccos(u·u_k), and the exp map
  u ← cos‖T‖ · u + sin‖T‖ · T/‖T‖ (renormalised), stopping when ‖T‖ < ``tol`` or after
  ``max_iter`` steps. θ = (Σ_k w_k n_k) · u.
- ``multislerp``: one step at the normalised weighted Euclidean mean m of the u_k, with the
  tangent projection instead of the log map: T = Σ_k w_k (u_k − (u_k·m) m),
  θ = (Σ_k w_k n_k) · (cos‖T‖ · m + sin‖T‖ · T/‖T‖).

Defaults: ``variant: karcher``, the pool's experts, equal weights, ``max_iter`` 10 and
``tol`` 1e-5 (mergekit's karcher defaults), ``origin: zero``.

Choices the sources leave open, decided here (mergekit's conventions unless stated):
- Which models: ``models`` names ≥ 2 different pool members ("base" allowed); null means
  every expert, in pool order. ``weights`` (null, a list in ``models`` order or a mapping
  by member name) are normalised to sum 1; mergekit's ``karcher`` has no weights (equal),
  its ``multislerp`` normalises them, as here.
- Karcher, small tensors: a tensor with n_k ≤ ``tol`` (mergekit compares the norm with the
  same ``tol``) takes no part in the direction (the remaining weights are renormalised
  for it) but its norm still counts in Σ w_k n_k; if every tensor is that small the
  result is zero. If the initial mean has norm < ``tol`` the first remaining unit vector
  is the start. A term with θ_k < ``tol`` is skipped (it is at u).
- Karcher, differs from mergekit: a term with θ_k > π − ``tol`` (antipodal to u, log map
  undefined; mergekit divides by sin π ≈ 0 and produces non-finite values) is skipped
  too, and the report counts such terms.
- Karcher stopping: ‖T‖ is checked before each step, so up to ``max_iter`` steps are taken
  and the last one is not re-checked; a tensor that never reached ‖T‖ < ``tol`` counts as
  not converged in the report.
- Multislerp: unit vectors are x_k / (n_k + 1e-8) and ‖T‖ gets + 1e-8 before the exp map
  (mergekit's eps). If ‖m‖ < 1e-8 (weights balancing antipodal points) the result is the
  linear Σ_k w_k x_k for any number of models (mergekit does this for two and raises for
  more).
- ``origin: base`` measures everything around the base (x_k = θ_k − θ0, θ0 added back),
  which is what mergekit's ``multislerp`` does when a base model is given; it then
  excludes "base" from ``models``. ``origin: zero`` (mergekit's ``karcher``) uses the raw
  weights.
- Arithmetic in float32 as the tensors arrive; the scalar angles and factors are computed
  in float64 from float32 dot products (mergekit keeps them as float32 tensors).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from core.options import (
    check_choice,
    check_finite,
    check_int,
    check_weights_option,
    resolve_weights,
)
from methods.base import MergeMethod

VARIANTS = ("karcher", "multislerp")
ORIGINS = ("zero", "base")
MULTISLERP_EPS = 1e-8


@dataclass
class KarcherInfo:
    """How one Karcher mean went: steps taken, convergence, skipped antipodal terms."""

    iterations: int = 0
    converged: bool = True
    antipodal: int = 0


def _normalised(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"weights must have a positive sum, got {list(weights)}")
    return [float(w) / total for w in weights]


def karcher_mean(
    tensors: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    max_iter: int = 10,
    tol: float = 1e-5,
) -> tuple[Tensor, KarcherInfo]:
    """Weighted Karcher mean direction of ``tensors`` scaled by their weighted mean norm."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("the Karcher mean needs at least one tensor")
    w = _normalised([1.0] * len(tensors) if weights is None else weights)
    info = KarcherInfo()
    flat = [t.flatten() for t in tensors]
    norms = [float(torch.linalg.vector_norm(f)) for f in flat]
    scale = sum(a * n for a, n in zip(w, norms, strict=True))
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0]), info
    a = _normalised([w[i] for i in valid])
    units = [flat[i] / norms[i] for i in valid]

    u = torch.zeros_like(units[0])
    for ai, ui in zip(a, units, strict=True):
        u.add_(ui, alpha=ai)
    nu = float(torch.linalg.vector_norm(u))
    u = units[0].clone() if nu < tol else u / nu

    info.converged = False
    for _ in range(max_iter):
        step = torch.zeros_like(u)
        antipodal = 0
        for ai, ui in zip(a, units, strict=True):
            dot = min(1.0, max(-1.0, float(torch.dot(u, ui))))
            theta = math.acos(dot)
            if theta < tol:
                continue
            if theta > math.pi - tol:
                antipodal += 1
                continue
            step.add_(ui - dot * u, alpha=ai * theta / math.sin(theta))
        info.antipodal = max(info.antipodal, antipodal)
        nt = float(torch.linalg.vector_norm(step))
        if nt < tol:
            info.converged = True
            break
        u = math.cos(nt) * u + (math.sin(nt) / nt) * step
        info.iterations += 1
        nu = float(torch.linalg.vector_norm(u))
        if nu > tol:
            u = u / nu
    return (scale * u).view_as(tensors[0]), info


def multislerp(tensors: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """One tangent-space step at the weighted Euclidean mean on the sphere (mergekit's
    ``multislerp``), scaled by the weighted mean norm."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("multislerp needs at least one tensor")
    w = _normalised([1.0] * len(tensors) if weights is None else weights)
    flat = [t.flatten() for t in tensors]
    norms = [float(torch.linalg.vector_norm(f)) for f in flat]
    units = [f / (n + MULTISLERP_EPS) for f, n in zip(flat, norms, strict=True)]
    mean = torch.zeros_like(units[0])
    for wi, ui in zip(w, units, strict=True):
        mean.add_(ui, alpha=wi)
    nm = float(torch.linalg.vector_norm(mean))
    if nm < MULTISLERP_EPS:
        out = torch.zeros_like(flat[0])
        for wi, f in zip(w, flat, strict=True):
            out.add_(f, alpha=wi)
        return out.view_as(tensors[0])
    mean = mean / nm
    tangent = torch.zeros_like(mean)
    for wi, ui in zip(w, units, strict=True):
        tangent.add_(ui - float(torch.dot(ui, mean)) * mean, alpha=wi)
    nt = float(torch.linalg.vector_norm(tangent)) + MULTISLERP_EPS
    scale = sum(wi * n for wi, n in zip(w, norms, strict=True))
    result = math.cos(nt) * mean + (math.sin(nt) / nt) * tangent
    return (scale * result).view_as(tensors[0])


class KarcherMerge(MergeMethod):
    """Plugin for :func:`karcher_mean` / :func:`multislerp`. Options: ``variant``
    (``karcher`` or ``multislerp``), ``models`` (null: every expert; else ≥ 2 pool members,
    "base" allowed), ``weights`` (null, list in ``models`` order or mapping by member),
    ``max_iter`` (≥ 1) and ``tol`` (> 0) for ``karcher``, ``origin`` (``zero`` or
    ``base``)."""

    name = "karcher"

    def __init__(
        self,
        variant: str = "karcher",
        models: Sequence[str] | None = None,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        max_iter: int = 10,
        tol: float = 1e-5,
        origin: str = "zero",
    ) -> None:
        self.variant = check_choice(variant, "method.variant", VARIANTS)
        if models is not None and (isinstance(models, str) or len(list(models)) < 2):
            raise ValueError(f"method.models must name at least two pool members, got {models!r}")
        self.models_option = None if models is None else [str(m) for m in models]
        self.weights_option = check_weights_option(weights)
        self.max_iter = check_int(max_iter, "method.max_iter", minimum=1)
        self.tol = check_finite(tol, "method.tol")
        if self.tol <= 0:
            raise ValueError(f"method.tol must be > 0, got {tol!r}")
        self.origin = check_choice(origin, "method.origin", ORIGINS)
        self.models: list[str] = []
        self.weight_of: dict[str, float] = {}
        self._infos: list[KarcherInfo] = []

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        known = ["base", *self.expert_names]
        models = list(self.expert_names) if self.models_option is None else self.models_option
        unknown = [m for m in models if m not in known]
        if unknown or len(set(models)) != len(models):
            raise ValueError(f"method.models={models} must name different pool members of {known}")
        if len(models) < 2:
            raise ValueError(
                f"Karcher / multi-SLERP merges at least two models but the pool has "
                f"{len(self.expert_names)} experts {self.expert_names}; name them with "
                "method.models=[a,b,...] (pool members, 'base' included)"
            )
        if self.origin == "base" and "base" in models:
            raise ValueError(
                "method.origin=base measures task vectors around the base, so method.models "
                f"cannot include 'base' (got {models})"
            )
        self.models = list(models)
        weights = _normalised(resolve_weights(self.weights_option, self.models))
        self.weight_of = dict(zip(self.models, weights, strict=True))
        self._infos = []

    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        xs = [base if m == "base" else experts[m] for m in self.models]
        if self.origin == "base":
            xs = [x - base for x in xs]
        weights = [self.weight_of[m] for m in self.models]
        if self.variant == "karcher":
            merged, info = karcher_mean(xs, weights, self.max_iter, self.tol)
            self._infos.append(info)
        else:
            merged = multislerp(xs, weights)
        return merged + base if self.origin == "base" else merged

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "variant": self.variant,
            "models": self.models,
            "weights": self.weight_of,
            "origin": self.origin,
        }
        if self.variant == "karcher":
            its = [i.iterations for i in self._infos]
            out |= {
                "max_iter": self.max_iter,
                "tol": self.tol,
                "tensors": len(its),
                "iterations_max": max(its, default=0),
                "iterations_mean": sum(its) / len(its) if its else 0.0,
                "not_converged": sum(not i.converged for i in self._infos),
                "antipodal_terms_skipped": sum(i.antipodal for i in self._infos),
            }
        return out
