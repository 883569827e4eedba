"""Task arithmetic: θ = θ0 + λ Σ w_k τ_k with τ_k = θ_k − θ0.

The per-model weights are *not* normalised: λ alone sets the overall step size
(λ = 0.3 is the usual data-free default).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from core.combine import weighted_task_sum
from core.pieces import Fixed, Identity, Sum
from methods.task_vector import TaskVectorMerge


def task_arithmetic(
    base: Tensor,
    experts: Sequence[Tensor],
    scaling: float = 0.3,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """θ0 + λ Σ w_k τ_k."""
    return base + scaling * weighted_task_sum(base, experts, weights)


class TaskArithmetic(TaskVectorMerge):
    """Plugin for :func:`task_arithmetic`: :class:`core.pieces.Identity` transform,
    :class:`core.pieces.Sum` combine, :class:`core.pieces.Fixed` coefficients.

    Options: ``scaling`` (λ, any finite number, default 0.3); ``weights`` — null (1.0
    each), a list in pool order, or a mapping by expert name (missing names get 1.0).
    Weights multiply the task vectors and are not normalised (``normalize: true``
    divides Σ w_k τ_k by Σ w_k, mergekit's option); ``weight_product: rounded`` rounds
    each w_k·τ_k before the sum as mergekit does (default ``fused``: one fused
    multiply-add per term). With both at mergekit's values the merge is mergekit's
    ``task_arithmetic`` bit for bit, for any weights (tests/peers).
    """

    name = "task_arithmetic"

    def __init__(
        self,
        scaling: float = 0.3,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        normalize: bool = False,
        weight_product: str = "fused",
    ) -> None:
        super().__init__(
            Identity(),
            Sum(normalize, weight_product, where="method"),
            Fixed(scaling, weights, where="method"),
        )
