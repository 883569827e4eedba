"""Combines: how processed task vectors v_k (trimmed, dropped, masked) become one update.

- sum: θ0 + λ Σ_k w_k v_k (task arithmetic and its sparsified variants);
- disjoint mean (TIES steps 2–4): elect γ = sign(Σ_k v_k) (unweighted, as TIES'
  Algorithm 1; ``weighted_vote`` elects sign(Σ_k w_k v_k), mergekit's), keep each
  expert's agreeing non-zero entries, and divide their weighted sum by the agreeing
  weight, not by K;
- :func:`agreeing_entries`: the elected-sign masks alone (AdaMerging++ then learns the
  weights of a plain sum over them).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

SIGN_VOTES = ("unweighted", "weighted")


def weighted_sum(
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
    base: Tensor, experts: Iterable[Tensor], weights: Sequence[float] | None = None
) -> Tensor:
    """Σ w_k (θ_k − θ0), one difference in memory at a time (equal weights 1.0 when
    ``None``)."""
    experts = list(experts)
    return weighted_sum(base, (t - base for t in experts), len(experts), weights, "experts")


def sum_combine(
    base: Tensor,
    vectors: Sequence[Tensor],
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """θ0 + λ Σ_k w_k v_k over already processed task vectors (trimmed, dropped, masked):
    the linear counterpart of :func:`ties_combine`."""
    vectors = list(vectors)
    return base + scaling * weighted_sum(base, vectors, len(vectors), weights, "task vectors")


def elect_sign(trimmed: Sequence[Tensor]) -> Tensor:
    """γ = sign(Σ_k τ̂_k), elementwise and unweighted (0 where the sum is 0)."""
    total = torch.zeros_like(trimmed[0])
    for t in trimmed:
        total.add_(t)
    return torch.sign(total)


def disjoint_merge(
    trimmed: Sequence[Tensor], sign: Tensor, weights: Sequence[float] | None = None
) -> Tensor:
    """Σ_k w_k τ̂_k m_k / Σ_k w_k m_k with m_k = [sign(τ̂_k) == γ and τ̂_k ≠ 0]; 0 where no
    expert (with weight > 0) agrees. Equal weights: divide by the agreeing count, not K."""
    ws = [1.0] * len(trimmed) if weights is None else [float(w) for w in weights]
    if len(ws) != len(trimmed):
        raise ValueError(f"got {len(ws)} weights for {len(trimmed)} task vectors")
    num = torch.zeros_like(sign)
    den = torch.zeros_like(sign)
    for w, t in zip(ws, trimmed, strict=True):
        agree = ((torch.sign(t) == sign) & (t != 0)).to(t.dtype)
        num.add_(t * agree, alpha=w)
        den.add_(agree, alpha=w)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)


def ties_combine(
    base: Tensor,
    trimmed: Sequence[Tensor],
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
    weighted_vote: bool = False,
) -> Tensor:
    """Steps 2–4 on already trimmed (or DARE-processed) task vectors: θ0 + λ · merged.
    ``weighted_vote`` elects sign(Σ w_k τ̂_k) (mergekit's) instead of sign(Σ τ̂_k)."""
    trimmed = list(trimmed)
    if weighted_vote and weights is not None:
        sign = elect_sign([float(w) * t for w, t in zip(weights, trimmed, strict=True)])
    else:
        sign = elect_sign(trimmed)
    return base + scaling * disjoint_merge(trimmed, sign, weights)


def agreeing_entries(trimmed: Sequence[Tensor]) -> list[Tensor]:
    """τ̂_k ⊙ m_k with γ = sign(Σ τ̂_k) and m_k = [sign(τ̂_k) = γ and τ̂_k ≠ 0]: each
    vector's entries that agree with the unweighted elected sign (TIES' disjoint masks)."""
    sign = elect_sign(trimmed)
    return [
        torch.where((torch.sign(t) == sign) & (t != 0), t, torch.zeros_like(t)) for t in trimmed
    ]
