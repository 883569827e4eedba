"""Weight averaging: θ = Σ w_k θ_k / Σ w_k (plain mean of the experts without weights).

The base model does not take part; only the experts are averaged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from core.options import check_weights_option, resolve_weights
from methods.base import MergeMethod


def weight_average(tensors: Sequence[Tensor], weights: Sequence[float] | None = None) -> Tensor:
    """Weighted mean Σ w_k t_k / Σ w_k of ``tensors`` (equal weights when ``None``)."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("weight_average needs at least one tensor")
    ws = [1.0] * len(tensors) if weights is None else [float(w) for w in weights]
    if len(ws) != len(tensors):
        raise ValueError(f"got {len(ws)} weights for {len(tensors)} tensors")
    total = sum(ws)
    if total <= 0:
        raise ValueError(f"weights must sum to > 0, got {ws}")
    out = torch.zeros_like(tensors[0])
    for w, t in zip(ws, tensors, strict=True):
        out.add_(t, alpha=w / total)
    return out


class WeightAverage(MergeMethod):
    """Plugin for :func:`weight_average`.

    Options: ``weights`` — null (1.0 each), a list in pool order, or a mapping by expert
    name (missing names get 1.0); resolved with ``resolve_weights`` in ``setup``.
    """

    name = "weight_average"

    def __init__(self, weights: Mapping[str, float] | Sequence[float] | None = None) -> None:
        self.weights_option = check_weights_option(weights)
        self.weights: list[float] = []
        self.expert_names: list[str] = []

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        self.weights = resolve_weights(self.weights_option, self.expert_names)
        self.weight_of = dict(zip(self.expert_names, self.weights, strict=True))

    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        return weight_average(list(experts.values()), [self.weight_of[n] for n in experts])

    def report(self) -> dict[str, Any]:
        return {"weights": dict(zip(self.expert_names, self.weights, strict=True))}
