"""Iso-C and Iso-CTS (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging
with Common and Task-Specific Subspaces", arXiv 2502.04959): flatten the spectrum of the
merged task matrix so that no direction (task) dominates.

Iso-C, per m×n weight: Σk τk = U S Vᵀ (rank r); Δ = σ̄·U Vᵀ with σ̄ = mean(diag S).
Iso-CTS: the common subspace is the top k triplets of Σ τk; each task's residual
τk − U_c U_cᵀ τk (the part outside the common left subspace) gives its top s triplets;
U = [U_c, U_1 … U_K] and V likewise are orthogonalised (orthogonal Procrustes, as in
TSV-Merge); Δ = σ̄·U⊥ V⊥ᵀ with σ̄ the mean of all chosen singular values (common and
task-specific). Both: θ = θ0 + α·Δ. Paper defaults: common_space_fraction 0.8; α is tuned on
validation data in the paper, so the default here is fusion-bench's ``scaling_factor: 1.0``.
Cost per weight: Iso-C one SVD, O(m·n·min(m, n)); Iso-CTS K + 3 SVDs.

Choices the paper leaves open, decided here:
- Sizes (fusion-bench's arithmetic): with r = min(m, n), k0 = ⌊f·r⌋, s = round((r − k0)/K)
  (Python's round, half to even) and k = r − K·s, so that the task part divides evenly; s
  is clamped to ⌊r/K⌋ (fusion-bench's k can go negative when K > (1 − f)·r).
- Other tensors (biases, norms, 1-D and ≥ 3-D): the mean of τk times α (fusion-bench, the
  authors' code); ``other_tensors: sum`` gives Σ τk. Embedding and output matrices are
  2-D weights like any other; ``svd_exclude`` sends tensors to the other-tensor rule.
- The merged matrix is the sum Σ τk (the paper's Δ_TA; fusion-bench sums too, the TSV
  authors' older Iso-C code averages, which only rescales σ̄ by 1/K).
- Numerical rank: singular values at or below ``rank_rtol``·σ1 (default max(m, n)·ε_float32)
  are dropped before averaging and recombining, so σ̄ is the mean over the rank, as in the
  paper (σ̄ = 1/r Σ σi with r the rank). For a full-rank Σ τk (full fine-tunes) this is
  fusion-bench's result; for a rank-deficient one (LoRA experts, cancelling tasks)
  fusion-bench also spreads σ̄ over the null space's arbitrary singular vectors.
  ``rank_rtol: 0`` keeps them all (fusion-bench). A residual's tolerance is relative to
  ‖τk‖_F, so a task lying inside the common subspace adds no noise directions.
- SVDs in float32 on the tensors' device, thin; signs of singular vectors do not matter
  (U Vᵀ and the polar factors are unchanged when a pair flips); each 2-D merge runs on
  one thread (as TSV's), so CPU results do not depend on the thread count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from core.options import check_unit_interval
from methods.tsv import SvdMergeMethod, orthogonalise, top_svd


def iso_c_delta(total: Tensor, rtol: float | None = None) -> Tensor:
    """σ̄·U Vᵀ for ``total`` = U S Vᵀ (kept rank), σ̄ the mean kept singular value."""
    u, s, vh = top_svd(total, min(total.shape), rtol)
    if s.numel() == 0:
        return torch.zeros_like(total)
    return s.mean() * (u @ vh)


def iso_cts_sizes(rank: int, n_tasks: int, fraction: float) -> tuple[int, int]:
    """(common k, per-task s) with k + K·s = ``rank`` (fusion-bench's rounding)."""
    k0 = int(rank * fraction)
    s = min(round((rank - k0) / n_tasks), rank // n_tasks)
    return rank - n_tasks * s, s


def iso_cts_delta(
    taus: Sequence[Tensor], fraction: float, rtol: float | None = None
) -> tuple[Tensor, tuple[int, int]]:
    """σ̄·U⊥ V⊥ᵀ over the common and task-specific subspaces, and the (k, s) sizes."""
    taus = list(taus)
    total = torch.stack(taus).sum(dim=0)
    k, s = iso_cts_sizes(min(total.shape), len(taus), fraction)
    uc, sc, vhc = top_svd(total, k, rtol)
    us, ss, vhs = [uc], [sc], [vhc]
    if s > 0:
        for t in taus:
            residual = t - uc @ (uc.T @ t)
            u, sv, vh = top_svd(residual, s, rtol, scale=float(torch.linalg.norm(t)))
            us.append(u)
            ss.append(sv)
            vhs.append(vh)
    sigma = torch.cat(ss)
    if sigma.numel() == 0:
        return torch.zeros_like(total), (k, s)
    u_orth = orthogonalise(torch.cat(us, dim=1), rtol)
    v_orth = orthogonalise(torch.cat(vhs, dim=0).T, rtol)
    return sigma.mean() * (u_orth @ v_orth.T), (k, s)


class IsoC(SvdMergeMethod):
    """Plugin for :func:`iso_c_delta` (options: see :class:`methods.tsv.SvdMergeMethod`)."""

    name = "iso_c"

    def delta(self, name: str, taus: list[Tensor]) -> Tensor | None:
        return iso_c_delta(torch.stack(taus).sum(dim=0), self.rank_rtol)


class IsoCTS(SvdMergeMethod):
    """Plugin for :func:`iso_cts_delta`; ``common_space_fraction`` f in [0, 1] (1: Iso-C
    with orthogonalised factors) plus :class:`methods.tsv.SvdMergeMethod`'s options."""

    name = "iso_cts"

    def __init__(
        self,
        common_space_fraction: float = 0.8,
        scaling: float = 1.0,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        other_tensors: str = "mean",
        svd_exclude: Sequence[str] | None = None,
        rank_rtol: float | None = None,
    ) -> None:
        super().__init__(scaling, weights, other_tensors, svd_exclude, rank_rtol)
        self.fraction = check_unit_interval(common_space_fraction, "method.common_space_fraction")

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        self.sizes: dict[str, list[int]] = {}

    def delta(self, name: str, taus: list[Tensor]) -> Tensor | None:
        delta, (k, s) = iso_cts_delta(taus, self.fraction, self.rank_rtol)
        self.sizes["x".join(map(str, taus[0].shape))] = [k, s]
        return delta

    def report(self) -> dict[str, Any]:
        return {**super().report(), "common_and_per_task_dims": self.sizes}
