"""SCE merging (Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models", arXiv
2408.07990): Select, Calculate, Erase, per tensor, with τ_k = θ_k − θ0.

1. **Select**: v = Var_k(τ_k) per entry (population variance over the K experts); keep
   the k = ⌊``select_topk`` · #{v ≠ 0}⌋ entries of largest v and zero every other entry
   in every τ_k (τ̂_k). ``select_topk: 1`` skips the step (every entry, even those of
   zero variance). k = 0 zeroes everything: the tensor stays at the base.
2. **Calculate**: η_k = mean(τ̂_k²) / Σ_j mean(τ̂_j²), one coefficient per expert and
   tensor (the mean is over the whole tensor, so it is ∝ the sum of squares of the
   selected entries); uniform 1/K when the denominator is 0 (all τ̂ zero) or below
   ``weight_eps``.
3. **Erase**: γ = +1 where Σ_k τ̂_k ≥ 0, else −1 (unweighted by η; a zero sum elects +1);
   expert k takes part in an entry where sign(τ̂_k) = γ (a zero entry never does).
4. θ = θ0 + λ · Σ_k η_k a_k τ̂_k / Σ_k η_k a_k (a_k = [k takes part]; 0 where no expert
   does), i.e. the η-weighted mean of the agreeing entries (``normalize: true``); with
   ``normalize: false`` the plain sum Σ_k η_k a_k τ̂_k. λ = ``scaling``, default 1 (SCE
   has no λ; 1 leaves it out).

This follows mergekit 0.1.5 (``mergekit/merge_methods/sce.py``: ``sce_merge``,
``sce_weight``, ``sce_mask``, and ``get_mask(method="sum")`` of
``generalized_task_arithmetic.py`` for the erase step), except where noted:
- Ties in the variance are broken by index (the lowest flat indices among equal
  variances are selected; mergekit's ``torch.topk`` leaves that open), and k is the floor
  of the exact decimal product (mergekit's ``int(count_nonzero * select_topk)`` is
  evaluated in float32).
- mergekit falls back to uniform η when |Σ_j mean(τ̂_j²)| < 1e-6. On real fine-tunes
  (RMS τ below 1e-3) that is most tensors, so the default here is the paper's formula
  (``weight_eps: 0``, uniform only for an all-zero tensor); ``weight_eps: 1e-6`` gives
  mergekit's behaviour.
- mergekit divides by Σ_k η_k a_k clamped below at 1e-6 (which shrinks entries where
  only experts with tiny η agree); here by the exact sum where it is > 0.
- The paper's released code (FuseAI ``FuseChat/mergekit/.../sce_merging.py``) uses the
  Select mask only to compute the η, then erases and merges the *unmasked* τ_k;
  ``select_scope: weights_only`` gives that, ``task_vectors`` (default) mergekit's.
- Defaults: ``select_topk`` 0.1 (τ = 10%, the released ``fusechat-sce.yml``; mergekit's
  default 1.0 selects everything). No per-model weights: the η are the weights.

The Select step alone is the transform piece :class:`VarianceSelect`
(``method/transform=variance_select`` puts it before any combine and coefficients).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from core.combine import disjoint_merge
from core.options import check_bool, check_choice, check_finite, check_unit_interval
from core.pieces import Transform
from methods.base import MergeMethod

SELECT_SCOPES = ("task_vectors", "weights_only")


def floor_fraction(fraction: float, n: int) -> int:
    """⌊fraction · n⌋ on the exact decimal value of ``fraction`` (0.7 · 10 = 7)."""
    frac = Fraction(repr(float(fraction)))
    return (frac.numerator * n) // frac.denominator


def sce_select_mask(taus: Sequence[Tensor], select_topk: float) -> Tensor:
    """Boolean mask of the ⌊select_topk · #{var ≠ 0}⌋ entries with the largest variance
    across ``taus`` (population variance; equal variances: lower flat index first)."""
    stacked = torch.stack(list(taus))
    if select_topk >= 1:
        return torch.ones(stacked.shape[1:], dtype=torch.bool, device=stacked.device)
    var = torch.var(stacked, dim=0, unbiased=False).reshape(-1)
    k = floor_fraction(select_topk, int(torch.count_nonzero(var)))
    mask = torch.zeros(var.shape, dtype=torch.bool, device=var.device)
    if k > 0:
        n = var.numel()
        threshold = torch.kthvalue(var, n - k + 1).values  # the k-th largest, > 0
        mask = var > threshold
        ties = torch.nonzero(var == threshold).flatten()
        mask[ties[: k - int(mask.sum())]] = True
    return mask.reshape(stacked.shape[1:])


def sce_weights(taus: Sequence[Tensor], weight_eps: float = 0.0) -> list[float]:
    """η_k = mean(τ_k²) / Σ_j mean(τ_j²) (float64 sums); 1/K when the sum is 0 or below
    ``weight_eps``."""
    sq = [float(torch.sum(t.double().square())) / max(t.numel(), 1) for t in taus]
    total = sum(sq)
    if total <= 0 or total < weight_eps:
        return [1.0 / len(sq)] * len(sq)
    return [s / total for s in sq]


def sce_erase_sign(taus: Sequence[Tensor]) -> Tensor:
    """γ = +1 where Σ_k τ_k ≥ 0, else −1 (unweighted; a zero sum elects +1)."""
    total = torch.zeros_like(taus[0])
    for t in taus:
        total.add_(t)
    return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)


def sce_merge(
    base: Tensor,
    experts: Sequence[Tensor],
    *,
    select_topk: float = 0.1,
    scaling: float = 1.0,
    normalize: bool = True,
    select_scope: str = "task_vectors",
    weight_eps: float = 0.0,
) -> tuple[Tensor, list[float], float]:
    """SCE on one tensor: (θ0 + λ · merged, the η in ``experts`` order, the fraction of
    entries selected)."""
    taus = [e - base for e in experts]
    select = sce_select_mask(taus, select_topk)
    selected = [t * select for t in taus]
    eta = sce_weights(selected, weight_eps)
    if select_scope == "task_vectors":
        taus = selected
    sign = sce_erase_sign(taus)
    if normalize:
        merged = disjoint_merge(taus, sign, eta)
    else:
        merged = torch.zeros_like(base)
        for w, t in zip(eta, taus, strict=True):
            agree = (torch.sign(t) == sign) & (t != 0)
            merged.add_(t * agree, alpha=w)
    fraction = float(select.float().mean()) if select.numel() else 1.0
    return base + scaling * merged, eta, fraction


class VarianceSelect(Transform):
    """The transform piece: every τ_k zeroed outside :func:`sce_select_mask` (the entries of
    largest variance across the experts, ⌊``select_topk`` · #{var ≠ 0}⌋ of them)."""

    def __init__(self, select_topk: float = 0.1, *, where: str = "method.transform") -> None:
        self.select_topk = check_unit_interval(select_topk, f"{where}.select_topk", open_low=True)

    def apply(self, name: str, taus: Mapping[str, Tensor]) -> dict[str, Tensor]:
        select = sce_select_mask(list(taus.values()), self.select_topk)
        return {e: t * select for e, t in taus.items()}


class SCE(MergeMethod):
    """Plugin for :func:`sce_merge` (see the module docstring). Options: ``select_topk``
    (fraction of non-zero-variance entries selected, (0, 1]; 1 skips Select),
    ``scaling`` λ, ``normalize`` (true: η-weighted mean of the agreeing entries; false:
    their η-weighted sum), ``select_scope`` (``task_vectors``: the Select mask zeroes the
    task vectors, mergekit; ``weights_only``: it only feeds the η, the FuseChat code),
    ``weight_eps`` (η uniform below this sum of mean squares; mergekit 1e-6).
    ``report()`` gives every tensor's η and the selected fraction of all entries."""

    name = "sce"

    def __init__(
        self,
        select_topk: float = 0.1,
        scaling: float = 1.0,
        normalize: bool = True,
        select_scope: str = "task_vectors",
        weight_eps: float = 0.0,
    ) -> None:
        self.select_topk = check_unit_interval(select_topk, "method.select_topk", open_low=True)
        self.scaling = check_finite(scaling, "method.scaling")
        self.normalize = check_bool(normalize, "method.normalize")
        self.select_scope = check_choice(select_scope, "method.select_scope", SELECT_SCOPES)
        self.weight_eps = check_finite(weight_eps, "method.weight_eps")
        if self.weight_eps < 0:
            raise ValueError(f"method.weight_eps must be >= 0, got {weight_eps!r}")
        self.eta: dict[str, dict[str, float]] = {}
        self._selected = 0.0
        self._numel = 0

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        if len(self.expert_names) < 2:
            raise ValueError(
                f"SCE selects entries by their variance across experts; with "
                f"{len(self.expert_names)} expert every variance is 0 and the merge is the "
                "base: give the pool at least two experts"
            )
        self.eta = {}
        self._selected = 0.0
        self._numel = 0

    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        merged, eta, fraction = sce_merge(
            base,
            list(experts.values()),
            select_topk=self.select_topk,
            scaling=self.scaling,
            normalize=self.normalize,
            select_scope=self.select_scope,
            weight_eps=self.weight_eps,
        )
        self.eta[name] = dict(zip(experts, eta, strict=True))
        self._selected += fraction * base.numel()
        self._numel += base.numel()
        return merged

    def report(self) -> dict[str, Any]:
        return {
            "select_topk": self.select_topk,
            "select_scope": self.select_scope,
            "selected_fraction": self._selected / self._numel if self._numel else None,
            "eta": self.eta,
        }
