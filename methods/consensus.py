"""Consensus task arithmetic (Wang et al. 2024, "Localizing Task Information for Improved
Model Merging and Compression", arXiv 2405.07813): keep only the weights that at least
``min_agreement`` tasks' TALL masks select, then apply task arithmetic.

Per entry, with τ_MTL = Σ_k τk: task k's TALL mask is m_k = [|τk| ≥ λ·|τ_MTL − τk|]; the
consensus mask keeps entries with Σ_k m_k ≥ ``min_agreement``; θ = θ0 + α·(τ_MTL ⊙ mask).

Choices the paper leaves open, decided here:
- One λ for every task (``mask_lambda``, default 0.6, fusion-bench's default; the paper
  picks λ per task on validation data from [0.2, 0.6], which needs labelled data).
- ``min_agreement`` 2 (the paper's choice: drop "selfish" weights used by one task only
  and "catastrophic" ones used by none).
- τ_MTL is the unweighted sum; α = ``scaling`` (default 0.3, task arithmetic's).

The consensus mask is the combine piece :class:`ConsensusMask` (``method/combine=consensus``
puts it after any transform; with per-expert weights w_k it masks and sums the w_k v_k).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from core.options import check_finite, check_int
from core.pieces import Combine, Fixed, Identity
from methods.task_vector import TaskVectorMerge


def tall_masks(taus: Sequence[Tensor], mask_lambda: float) -> list[Tensor]:
    """m_k = [|τk| ≥ λ·|τ_MTL − τk|] for each task, τ_MTL = Σ τk."""
    total = torch.stack(list(taus)).sum(dim=0)
    return [t.abs() >= mask_lambda * (total - t).abs() for t in taus]


def consensus_merge(
    base: Tensor, experts: Sequence[Tensor], *, mask_lambda: float, min_agreement: int,
    scaling: float,
) -> tuple[Tensor, int]:  # fmt: skip
    """θ0 + α·(τ_MTL ⊙ [Σ m_k ≥ min_agreement]) and the number of entries kept."""
    taus = [e - base for e in experts]
    votes = torch.stack(tall_masks(taus, mask_lambda)).sum(dim=0)
    keep = votes >= min_agreement
    total = torch.stack(taus).sum(dim=0)
    return base + scaling * (total * keep), int(keep.sum())


class ConsensusMask(Combine):
    """The combine piece: θ0 + λ · (Σ_k w_k v_k ⊙ [Σ_k m_k ≥ min_agreement]) with the TALL
    masks m_k of the w_k v_k (w = 1: :func:`consensus_merge`). ``report()``:
    ``kept_fraction`` of all entries."""

    def __init__(
        self, mask_lambda: float = 0.6, min_agreement: int = 2, *, where: str = "method.combine"
    ) -> None:
        self.mask_lambda = check_finite(mask_lambda, f"{where}.mask_lambda")
        if self.mask_lambda < 0:
            raise ValueError(f"{where}.mask_lambda must be >= 0, got {mask_lambda!r}")
        self.min_agreement = check_int(min_agreement, f"{where}.min_agreement", 1)
        self.where = where
        self.kept = self.total = 0

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        if self.min_agreement > len(expert_names):
            raise ValueError(
                f"{self.where}.min_agreement={self.min_agreement} exceeds the pool's "
                f"{len(expert_names)} experts: no weight could be kept"
            )
        self.kept = self.total = 0

    def __call__(
        self, base: Tensor, vectors: Sequence[Tensor], scaling: float, weights: Sequence[float]
    ) -> Tensor:
        taus = [v * float(w) for v, w in zip(vectors, weights, strict=True)]
        votes = torch.stack(tall_masks(taus, self.mask_lambda)).sum(dim=0)
        keep = votes >= self.min_agreement
        self.kept += int(keep.sum())
        self.total += keep.numel()
        return base + scaling * (torch.stack(taus).sum(dim=0) * keep)

    def report(self) -> dict[str, Any]:
        return {"kept_fraction": self.kept / self.total if self.total else None}


class ConsensusTA(TaskVectorMerge):
    """Plugin: task vectors as they are, :class:`ConsensusMask`, λ = α. Options:
    ``mask_lambda`` (λ ≥ 0), ``min_agreement`` (an integer ≥ 1), ``scaling`` α."""

    name = "consensus_ta"

    def __init__(
        self, mask_lambda: float = 0.6, min_agreement: int = 2, scaling: float = 0.3
    ) -> None:
        combine = ConsensusMask(mask_lambda, min_agreement, where="method")
        super().__init__(Identity(), combine, Fixed(scaling, where="method"))

    def report(self) -> dict[str, Any]:
        return self.combine.report()
