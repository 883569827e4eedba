"""Combines: how processed task vectors v_k (trimmed, dropped, masked) become one update.

- sum: θ0 + λ Σ_k w_k v_k (task arithmetic and its sparsified variants);
- disjoint mean (TIES steps 2–4): elect γ = sign(Σ_k v_k) (unweighted, as TIES'
  Algorithm 1; ``weighted_vote`` elects sign(Σ_k w_k v_k), mergekit's), keep each
  expert's agreeing non-zero entries, and divide their weighted sum by the agreeing
  weight, not by K;
- :func:`agreeing_entries`: the elected-sign masks alone (AdaMerging++ then learns the
  weights of a plain sum over them).

Options that select mergekit 0.1.5's arithmetic (defaults: mergelab's, unchanged):

- ``premultiply``: each w_k·v_k is rounded to the tensor's dtype before the sum (mergekit's
  ``deltas.mul_(weights)`` then ``sum``) instead of ``acc.add_(v, alpha=w)``, a fused
  multiply-add on CPU (one rounding per term). Power-of-two weights round alike.
- ``normalize``: the sum's divisor. The sum divides by Σ w_k only with ``normalize``
  (mergekit's ``normalize: true``; skipped when |Σ w_k| < 1e-8, as mergekit does); the
  disjoint mean divides by the agreeing weight unless ``normalize=False`` (mergekit's
  ``dare_ties`` / ``breadcrumbs_ties`` default: the plain sum of the agreeing entries).
- ``zero_sign``: where the elected sum is exactly 0, γ = 0 (``zero``, no expert agrees)
  or γ = +1 (``positive``, mergekit's ``(sum >= 0) * 2 - 1``): then the positive entries
  there merge. Entries whose every v_k is 0 merge to 0 either way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

SIGN_VOTES = ("unweighted", "weighted")
ZERO_SIGNS = ("zero", "positive")
WEIGHT_PRODUCTS = ("fused", "rounded")
NORMALIZE_EPS = 1e-8  # mergekit's linear divisor: no division when |Σ w| is below


def weighted_sum(
    like: Tensor,
    vectors: Iterable[Tensor],
    n: int,
    weights: Sequence[float] | None,
    what: str,
    *,
    premultiply: bool = False,
) -> Tensor:
    """Σ_k w_k v_k over ``n`` vectors (taken one at a time, so a generator keeps one
    difference in memory); equal weights 1.0 when ``None``. ``premultiply`` rounds each
    w_k·v_k before adding it (mergekit's order) instead of a fused ``add_(v, alpha=w)``."""
    ws = [1.0] * n if weights is None else [float(w) for w in weights]
    if len(ws) != n:
        raise ValueError(f"got {len(ws)} weights for {n} {what}")
    acc = torch.zeros_like(like)
    for w, v in zip(ws, vectors, strict=True):
        if premultiply:
            acc.add_(w * v)
        else:
            acc.add_(v, alpha=w)
    return acc


def weight_total(like: Tensor, weights: Sequence[float]) -> Tensor:
    """Σ_k w_k summed in ``like``'s dtype, one term at a time (mergekit's divisor)."""
    total = torch.zeros((), dtype=like.dtype, device=like.device)
    for w in weights:
        total.add_(float(w))
    return total


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
    *,
    normalize: bool = False,
    premultiply: bool = False,
) -> Tensor:
    """θ0 + λ Σ_k w_k v_k over already processed task vectors (trimmed, dropped, masked):
    the linear counterpart of :func:`ties_combine`. ``normalize`` divides the sum by
    Σ_k w_k (not when |Σ w_k| < 1e-8); ``premultiply``: see :func:`weighted_sum`."""
    vectors = list(vectors)
    total = weighted_sum(
        base, vectors, len(vectors), weights, "task vectors", premultiply=premultiply
    )
    if normalize:
        divisor = weight_total(base, [1.0] * len(vectors) if weights is None else weights)
        if float(divisor.abs()) >= NORMALIZE_EPS:
            total = total / divisor
    return base + scaling * total


def elect_sign(trimmed: Sequence[Tensor], zero_sign: str = "zero") -> Tensor:
    """γ = sign(Σ_k τ̂_k), elementwise and unweighted; where the sum is 0, γ = 0
    (``zero_sign="zero"``) or +1 (``"positive"``, mergekit's)."""
    total = torch.zeros_like(trimmed[0])
    for t in trimmed:
        total.add_(t)
    sign = torch.sign(total)
    if zero_sign == "positive":  # +1 where the sum is ±0 (torch.where is slow on the CPU)
        return sign.add_(total.eq(0).to(total.dtype))
    return sign


def disjoint_merge(
    trimmed: Sequence[Tensor],
    sign: Tensor,
    weights: Sequence[float] | None = None,
    *,
    normalize: bool = True,
    premultiply: bool = False,
) -> Tensor:
    """Σ_k w_k τ̂_k m_k / Σ_k w_k m_k with m_k = [sign(τ̂_k) == γ and τ̂_k ≠ 0]; 0 where no
    expert (with weight > 0) agrees. Equal weights: divide by the agreeing count, not K.
    ``normalize=False``: the numerator alone; ``premultiply``: see :func:`weighted_sum`."""
    ws = [1.0] * len(trimmed) if weights is None else [float(w) for w in weights]
    if len(ws) != len(trimmed):
        raise ValueError(f"got {len(ws)} weights for {len(trimmed)} task vectors")
    num = torch.zeros_like(sign)
    den = torch.zeros_like(sign)
    for w, t in zip(ws, trimmed, strict=True):
        # m_k as sign(τ̂_k)·γ clamped at 0: 1 where both are the same ±1, else ±0 (a −0
        # adds like +0 here: num and den start at +0 and never become −0)
        agree = torch.sign(t).mul_(sign).clamp_min_(0)
        if premultiply:
            num.add_((w * t) * agree)
        else:
            num.add_(t * agree, alpha=w)
        if normalize:
            den.add_(agree, alpha=w)
    if not normalize:
        return num
    quotient = num / den.clamp_min(torch.finfo(den.dtype).tiny)
    if all(w >= 0 for w in ws):
        # den is 0 only where every term was ±0 (no agreeing expert, or weight 0), so num
        # is +0 there and so is the quotient: what the where below gives, without it
        return quotient
    return torch.where(den > 0, quotient, 0.0)


def ties_combine(
    base: Tensor,
    trimmed: Sequence[Tensor],
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
    weighted_vote: bool = False,
    *,
    normalize: bool = True,
    premultiply: bool = False,
    zero_sign: str = "zero",
) -> Tensor:
    """Steps 2–4 on already trimmed (or DARE-processed) task vectors: θ0 + λ · merged.
    ``weighted_vote`` elects sign(Σ w_k τ̂_k) (mergekit's) instead of sign(Σ τ̂_k);
    ``normalize``, ``premultiply`` and ``zero_sign``: see the module docstring."""
    trimmed = list(trimmed)
    if weighted_vote and weights is not None:
        sign = elect_sign([float(w) * t for w, t in zip(weights, trimmed, strict=True)], zero_sign)
    else:
        sign = elect_sign(trimmed, zero_sign)
    merged = disjoint_merge(trimmed, sign, weights, normalize=normalize, premultiply=premultiply)
    return base + scaling * merged


def agreeing_entries(trimmed: Sequence[Tensor]) -> list[Tensor]:
    """τ̂_k ⊙ m_k with γ = sign(Σ τ̂_k) and m_k = [sign(τ̂_k) = γ and τ̂_k ≠ 0]: each
    vector's entries that agree with the unweighted elected sign (TIES' disjoint masks)."""
    sign = elect_sign(trimmed)
    return [
        torch.where((torch.sign(t) == sign) & (t != 0), t, torch.zeros_like(t)) for t in trimmed
    ]
