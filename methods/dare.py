"""DARE (Yu et al. 2024): drop each task-vector entry with probability p, rescale the rest.

τ̃_k = τ_k ⊙ m_k / (1 − p) with m_k ~ Bernoulli(1 − p) elementwise (an entry is kept when
its uniform draw u ∈ [0, 1) satisfies u ≥ p, so p = 0 keeps everything). Then

- ``dare_linear``: θ = θ0 + λ Σ_k w_k τ̃_k (task arithmetic on the τ̃_k);
- ``dare_ties``: the τ̃_k replace TIES's trimmed task vectors, followed by TIES's
  unweighted sign election, weighted disjoint mean and θ0 + λ · merged
  (:func:`methods.ties.ties_combine`).

``rescale: l1`` replaces 1/(1 − p) by mergekit 0.1.5's per-tensor factor ‖τ‖₁ / ‖τ ⊙ m‖₁
(none when either norm is below 1e-7), so that its ``dare_linear`` / ``dare_ties`` can be
reproduced; the paper's 1/(1 − p) is the default.

Reproducible masks (:mod:`core.dropout`): the generator seed is derived from (run seed,
expert name, tensor name) by sha256, the uniforms drawn on CPU by a private generator, so
a mask never depends on execution order, device, parallelism or the global RNG. The drop
is the shared piece :class:`core.pieces.RandomDrop`, the combines
:class:`core.pieces.Sum` / :class:`core.pieces.DisjointMean`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from core.combine import sum_combine, ties_combine
from core.dropout import dare_rescale
from core.pieces import Combine, DisjointMean, Fixed, RandomDrop, Sum
from methods.task_vector import TaskVectorMerge


def dare_linear_merge(
    base: Tensor,
    experts: Sequence[Tensor],
    masks: Sequence[Tensor],
    drop_rate: float,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """θ0 + λ Σ_k w_k τ̃_k with τ̃_k = DARE(τ_k, masks[k])."""
    tilde = [dare_rescale(t - base, m, drop_rate) for t, m in zip(experts, masks, strict=True)]
    return sum_combine(base, tilde, scaling, weights)


def dare_ties_merge(
    base: Tensor,
    experts: Sequence[Tensor],
    masks: Sequence[Tensor],
    drop_rate: float,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """TIES sign election + disjoint merge on the DARE task vectors τ̃_k, then θ0 + λ·merged."""
    tilde = [dare_rescale(t - base, m, drop_rate) for t, m in zip(experts, masks, strict=True)]
    return ties_combine(base, tilde, scaling, weights)


class _DARE(TaskVectorMerge):
    """Shared plugin logic: options ``drop_rate`` (p ∈ [0, 1), default 0.5), ``scaling``
    (λ, default 1.0), ``weights`` (null, a list in pool order or a mapping by name) and
    ``rescale`` (``inverse_p`` default, ``l1``). ``report()``: ``weights`` and the masks'
    ``kept_fraction``."""

    def combine_piece(self) -> Combine:
        raise NotImplementedError

    def __init__(
        self,
        drop_rate: float = 0.5,
        scaling: float = 1.0,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        rescale: str = "inverse_p",
    ) -> None:
        super().__init__(
            RandomDrop(drop_rate, rescale, where="method"),
            self.combine_piece(),
            Fixed(scaling, weights, where="method"),
        )


class DARELinear(_DARE):
    """DARE + task arithmetic: θ0 + λ Σ_k w_k τ̃_k (see the module docstring)."""

    name = "dare_linear"

    def combine_piece(self) -> Combine:
        return Sum()


class DARETies(_DARE):
    """DARE + TIES: DARE drop/rescale replaces the TIES trim; unweighted sign vote,
    weighted disjoint mean, θ0 + λ · merged (see the module docstring)."""

    name = "dare_ties"

    def combine_piece(self) -> Combine:
        return DisjointMean(where="method")
