"""Task arithmetic: θ = θ0 + λ Σ w_k τ_k with τ_k = θ_k − θ0.

The per-model weights are *not* normalised: λ alone sets the overall step size
(λ = 0.3 is the usual data-free default).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from core.options import check_finite, check_weights_option, resolve_weights
from methods.base import MergeMethod


def _weighted_sum(
    like: Tensor, vectors: Iterable[Tensor], n: int, weights: Sequence[float] | None, what: str
) -> Tensor:
    """Σ_k w_k v_k over ``n`` vectors (taken one at a time, so a generator keeps one
    difference in memory); equal weights 1.0 when ``None``."""
    ws = [1.0] * n if weights is None else [float(w) for w in weights]
    if len(ws) != n:
        raise ValueError(f"got {len(ws)} weights for {n} {what}")
    acc = torch.zeros_like(like)
    for w, v in zip(ws, vectors, strict=True):
        acc.add_(v, alpha=w)
    return acc


def weighted_task_sum(
    base: Tensor, experts: Sequence[Tensor], weights: Sequence[float] | None = None
) -> Tensor:
    """Σ w_k (θ_k − θ0) (equal weights 1.0 when ``None``)."""
    experts = list(experts)
    return _weighted_sum(base, (t - base for t in experts), len(experts), weights, "experts")


def sum_combine(
    base: Tensor,
    vectors: Sequence[Tensor],
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """θ0 + λ Σ_k w_k v_k over already processed task vectors (trimmed, dropped, masked):
    the linear counterpart of :func:`methods.ties.ties_combine`."""
    vectors = list(vectors)
    return base + scaling * _weighted_sum(base, vectors, len(vectors), weights, "task vectors")


def task_arithmetic(
    base: Tensor,
    experts: Sequence[Tensor],
    scaling: float = 0.3,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """θ0 + λ Σ w_k τ_k."""
    return base + scaling * weighted_task_sum(base, experts, weights)


class TaskArithmetic(MergeMethod):
    """Plugin for :func:`task_arithmetic`.

    Options: ``scaling`` (λ, any finite number, default 0.3); ``weights`` — null (1.0
    each), a list in pool order, or a mapping by expert name (missing names get 1.0).
    Weights multiply the task vectors and are not normalised.
    """

    name = "task_arithmetic"

    def __init__(
        self,
        scaling: float = 0.3,
        weights: Mapping[str, float] | Sequence[float] | None = None,
    ) -> None:
        self.scaling = check_finite(scaling, "method.scaling")
        self.weights_option = check_weights_option(weights)
        self.weights: list[float] = []
        self.expert_names: list[str] = []

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        self.weights = resolve_weights(self.weights_option, self.expert_names)
        self.weight_of = dict(zip(self.expert_names, self.weights, strict=True))

    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        return task_arithmetic(
            base, list(experts.values()), self.scaling, [self.weight_of[n] for n in experts]
        )

    def report(self) -> dict[str, Any]:
        return {"weights": dict(zip(self.expert_names, self.weights, strict=True))}
