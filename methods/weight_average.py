"""Weight averaging: θ = Σ w_k θ_k / Σ w_k (plain mean of the experts without weights).

The base model does not take part; only the experts are averaged.

``normalize`` decides where the division happens: ``before`` (default) adds each θ_k
scaled by w_k / Σ w_k (one fused multiply-add per term); ``after`` sums Σ w_k θ_k (fused,
w_k in the tensor's dtype) and then divides by Σ w_k summed in that dtype, which is
mergekit 0.1.5's ``linear`` bit for bit; ``none`` is that sum undivided (its
``normalize: false``). ``before`` and ``after`` differ by rounding only, and not at all
for two or four unit-weight experts (division by a power of two is exact).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from core.combine import weight_total, weighted_sum
from core.options import check_choice, check_weights_option, resolve_weights
from methods.base import MergeMethod

NORMALIZE = ("before", "after", "none")


def weight_average(
    tensors: Sequence[Tensor], weights: Sequence[float] | None = None, normalize: str = "before"
) -> Tensor:
    """Weighted mean Σ w_k t_k / Σ w_k of ``tensors`` (equal weights when ``None``);
    ``normalize`` as in the module docstring."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("weight_average needs at least one tensor")
    ws = [1.0] * len(tensors) if weights is None else [float(w) for w in weights]
    if len(ws) != len(tensors):
        raise ValueError(f"got {len(ws)} weights for {len(tensors)} tensors")
    total = sum(ws)
    if total <= 0:
        raise ValueError(f"weights must sum to > 0, got {ws}")
    scaled = [w / total for w in ws] if normalize == "before" else ws
    out = weighted_sum(tensors[0], tensors, len(tensors), scaled, "tensors")
    return out / weight_total(out, ws) if normalize == "after" else out


class WeightAverage(MergeMethod):
    """Plugin for :func:`weight_average`.

    Options: ``weights`` — null (1.0 each), a list in pool order, or a mapping by expert
    name (missing names get 1.0); resolved with ``resolve_weights`` in ``setup``.
    ``normalize``: ``before`` (default), ``after`` (mergekit's ``linear``) or ``none``.
    """

    name = "weight_average"
    chunked = True  # entry by entry, with constant weights

    def __init__(
        self,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        normalize: str = "before",
    ) -> None:
        self.weights_option = check_weights_option(weights)
        self.normalize = check_choice(normalize, "method.normalize", NORMALIZE)
        self.weights: list[float] = []
        self.expert_names: list[str] = []

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        self.weights = resolve_weights(self.weights_option, self.expert_names)
        self.weight_of = dict(zip(self.expert_names, self.weights, strict=True))

    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        weights = [self.weight_of[n] for n in experts]
        return weight_average(list(experts.values()), weights, self.normalize)

    def report(self) -> dict[str, Any]:
        return {"weights": dict(zip(self.expert_names, self.weights, strict=True))}
