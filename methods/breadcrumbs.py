"""Model Breadcrumbs (Davari & Belilovsky 2024, arXiv 2312.06795): sparsify each task
vector from both ends of its magnitude distribution, then add (or TIES-merge) them.

Per tensor and expert, with n entries ranked by |τk|: the ⌊γ·n⌋ largest (outliers) and
the smallest are masked so that ⌊d·n⌋ entries remain (d = ``density``); if d + γ > 1 the
outlier cut shrinks to 1 − d. Then θ = θ0 + λ Σ w_k m_k ⊙ τk (``breadcrumbs``), or TIES'
sign election and disjoint mean over the masked vectors (``breadcrumbs_ties``).

Choices the paper leaves open, decided here:
- Counts use ⌊·⌋ (mergekit's ``magnitude_outliers``), so they can be compared entry for
  entry; ties in |τ| are broken by a stable sort (lower flat index ranks lower).
- No rescaling of the survivors (the paper and mergekit rescale nothing).
- Defaults: density 0.9 and γ 0.01 (mergekit's γ; the paper sweeps both), λ = 0.3 for
  the sum as task arithmetic's default, λ = 1 with sign election as TIES'.

mergekit 0.1.5's other conventions are options: ``tie_break: sort`` ranks |τ| with
``torch.sort`` unstable as mergekit does (it differs from ``stable`` only among equal
magnitudes), ``rescale: l1`` is its ``rescale: true``, and the combine's ``normalize``
(``breadcrumbs_ties``: mergelab's default true is TIES' mean, mergekit's default false the
sum of the agreeing entries; ``breadcrumbs``: false, true divides by Σ w_k),
``weight_product``, ``sign_vote`` and ``zero_sign`` (:mod:`methods.ties`).

The mask is the transform piece :class:`BreadcrumbsMask`
(``method=task_vector method/transform=breadcrumbs`` composes it with any combine).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from core.combine import sum_combine, ties_combine
from core.dropout import l1_rescale
from core.options import check_bool, check_choice, check_unit_interval
from core.pieces import TRIM_RESCALES, Fixed, Transform, election_combine
from methods.task_vector import TaskVectorMerge

TIE_BREAKS = ("stable", "sort")


def breadcrumbs_mask(
    tau: Tensor, density: float, gamma: float, tie_break: str = "stable"
) -> Tensor:
    """Keep-mask of ``tau``: drop the ⌊γ·n⌋ largest |τ| and the smallest, keeping ⌊d·n⌋;
    equal magnitudes ranked by a stable sort, or by ``torch.sort``'s own order (``sort``,
    mergekit's call)."""
    n = tau.numel()
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool)
    keep = int(density * n)
    top = min(int(gamma * n), n - keep)
    bottom = n - keep - top
    if tie_break == "sort":
        order = torch.sort(tau.abs().reshape(-1).float(), descending=False).indices
    else:
        order = torch.sort(tau.abs().flatten(), stable=True).indices
    mask = torch.zeros(n, dtype=torch.bool, device=tau.device)
    mask[order[bottom : n - top]] = True
    return mask.view_as(tau)


def breadcrumbs_merge(
    base: Tensor,
    experts: Sequence[Tensor],
    *,
    density: float,
    gamma: float,
    scaling: float,
    weights: Sequence[float],
    sign_election: bool = False,
) -> Tensor:
    """θ0 + λ · (Σ w_k m_k τk, or TIES' disjoint mean of the masked τk)."""
    masked = []
    for e in experts:
        tau = e - base
        masked.append(tau * breadcrumbs_mask(tau, density, gamma))
    combine = ties_combine if sign_election else sum_combine
    return combine(base, masked, scaling, weights)


class BreadcrumbsMask(Transform):
    """The transform piece: v_k = m_k ⊙ τ_k with :func:`breadcrumbs_mask` per tensor;
    ``rescale: l1`` multiplies v_k by ‖τ_k‖₁/‖v_k‖₁ (mergekit's ``rescale: true``),
    ``tie_break`` as in :func:`breadcrumbs_mask`."""

    def __init__(
        self,
        density: float = 0.9,
        gamma: float = 0.01,
        rescale: str = "none",
        tie_break: str = "stable",
        *,
        where: str = "method.transform",
    ) -> None:
        self.density = check_unit_interval(density, f"{where}.density", open_low=True)
        self.gamma = check_unit_interval(gamma, f"{where}.gamma", open_high=True)
        self.rescale = check_choice(rescale, f"{where}.rescale", TRIM_RESCALES)
        self.tie_break = check_choice(tie_break, f"{where}.tie_break", TIE_BREAKS)

    def apply(self, name: str, taus: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for e, t in taus.items():
            masked = t * breadcrumbs_mask(t, self.density, self.gamma, self.tie_break)
            rescale = self.rescale == "l1" and self.density < 1
            out[e] = l1_rescale(t, masked) if rescale else masked
        return out


class Breadcrumbs(TaskVectorMerge):
    """Plugin for :func:`breadcrumbs_merge`. Options: ``density`` (kept fraction, (0, 1]),
    ``gamma`` (largest fraction dropped, [0, 1)), ``scaling`` λ, ``weights`` (null, list
    or mapping by expert), ``sign_election`` (false: sum; true: TIES' election), and
    mergekit's conventions (module docstring): ``rescale``, ``tie_break``, ``normalize``
    (null: true with sign election, false without), ``weight_product``, ``sign_vote`` and
    ``zero_sign`` (the last two only with sign election)."""

    name = "breadcrumbs"

    def __init__(
        self,
        density: float = 0.9,
        gamma: float = 0.01,
        scaling: float = 0.3,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        sign_election: bool = False,
        rescale: str = "none",
        tie_break: str = "stable",
        normalize: bool | None = None,
        weight_product: str = "fused",
        sign_vote: str = "unweighted",
        zero_sign: str = "zero",
    ) -> None:
        self.sign_election = check_bool(sign_election, "method.sign_election")
        transform = BreadcrumbsMask(density, gamma, rescale, tie_break, where="method")
        combine = election_combine(sign_election, normalize, weight_product, sign_vote, zero_sign)
        super().__init__(transform, combine, Fixed(scaling, weights, where="method"))

    def report(self) -> dict[str, Any]:
        return {**super().report(), "sign_election": self.sign_election}
