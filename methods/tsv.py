"""TSV-Merge (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in
Model Merging", arXiv 2412.00081): per 2-D weight, keep each task's top singular triplets,
decorrelate the stacked singular vectors, recombine.

Per m×n weight with K experts and r = ⌊min(m, n)/K⌋: τk = Uk Sk Vkᵀ, truncated to its top
r triplets; U = [U1 … UK] (m × Kr), S = diag(S1 … SK), V = [V1 … VK] (n × Kr);
U⊥ = P Qᵀ from U = P Σ Qᵀ (orthogonal Procrustes: the nearest matrix with orthonormal
columns), V⊥ likewise; Δ = U⊥ S V⊥ᵀ and θ = θ0 + α·Δ. Paper defaults: rank fraction 1/K,
α = 1.0 (fusion-bench's ``alpha: 1``; the authors' code can also sweep α on validation).
Cost per weight: K + 2 SVDs, O(K·m·n·min(m, n)).

Choices the paper leaves open, decided here:
- Other tensors (biases, norms, 1-D and ≥ 3-D): the mean of τk, times α (the authors' code
  and fusion-bench; the text says "task arithmetic"); ``other_tensors: sum`` gives Σ τk.
- Embedding and output matrices are 2-D weights like any other (fusion-bench: nothing is
  excluded by default); ``svd_exclude`` (glob patterns of tensor names) sends some to the
  other-tensor rule, as fusion-bench's ``exclude_keys`` does.
- K > min(m, n) leaves r = 0 triplets per task: such a weight takes the other-tensor rule
  (fusion-bench would leave it at θ0); the report names them.
- Numerical rank: singular values at or below ``rank_rtol``·σ1 of the decomposed matrix
  (default max(m, n)·ε_float32, numpy's ``matrix_rank`` rule) are dropped, in the task SVDs
  and in the orthogonalisation (which then returns the unique partial isometry P_r Q_rᵀ).
  Their singular vectors are arbitrary (LAPACK's pick), and fusion-bench keeps them: for
  rank-deficient task vectors (LoRA experts) or colinear tasks its output then holds
  arbitrary directions. ``rank_rtol: 0`` keeps every triplet (fusion-bench's arithmetic).
- The stack is built compactly (m × Kr); fusion-bench zero-pads it to m × min(m, n), which
  gives the same polar factor on the kept columns.
- SVDs run in float32 on the tensors' device, thin (``full_matrices=False``), as
  fusion-bench. The signs of singular vectors (and the basis inside a block of equal
  singular values kept whole) do not matter: the polar factor commutes with them and
  U⊥ S V⊥ᵀ is unchanged. CPU LAPACK's bits change with the thread count, so each 2-D
  merge runs on one thread (``core.numerics.one_thread``): the merged weights do not
  depend on ``threads``. CUDA results differ from CPU in the last bits.
- ``weights`` multiply τk before anything else (fusion-bench's per-task ``alpha`` list).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from core.numerics import one_thread
from core.options import check_choice, check_finite, check_weights_option, resolve_weights
from methods.base import MergeMethod

OTHER_RULES = ("mean", "sum")


def default_rtol(shape: Sequence[int]) -> float:
    """numpy's ``matrix_rank`` tolerance factor: max(m, n)·ε of float32."""
    return max(shape) * torch.finfo(torch.float32).eps


def top_svd(
    x: Tensor, k: int, rtol: float | None, scale: float | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``x`` cut to its top ``k`` triplets, dropping σ ≤ rtol·scale.

    ``scale`` defaults to σ1(x); ``rtol`` None means :func:`default_rtol`, 0 keeps all k.
    Returns U (m × k'), S (k'), Vh (k' × n) with k' ≤ k.
    """
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    keep = min(k, s.numel())
    if rtol != 0 and keep:
        tol = (default_rtol(x.shape) if rtol is None else rtol) * (
            float(s[0]) if scale is None else scale
        )
        keep = min(keep, int((s > tol).sum()))
    return u[:, :keep], s[:keep], vh[:keep]


def orthogonalise(a: Tensor, rtol: float | None) -> Tensor:
    """Nearest matrix with orthonormal columns to ``a`` (orthogonal Procrustes / polar
    factor): P Qᵀ for a = P Σ Qᵀ. Directions with Σ ≤ tol are dropped (see
    :func:`top_svd`), giving the unique partial isometry P_r Q_rᵀ."""
    if a.shape[1] == 0:
        return a
    p, _, qh = top_svd(a, a.shape[1], rtol)
    return p @ qh


def tsv_delta(taus: Sequence[Tensor], rtol: float | None = None) -> Tensor | None:
    """U⊥ S V⊥ᵀ from each task's top ⌊min(m, n)/K⌋ triplets; None when that is 0."""
    m, n = taus[0].shape
    r = min(m, n) // len(taus)
    if r == 0:
        return None
    parts = [top_svd(t, r, rtol) for t in taus]
    u = torch.cat([p[0] for p in parts], dim=1)
    s = torch.cat([p[1] for p in parts])
    v = torch.cat([p[2] for p in parts], dim=0).T
    return (orthogonalise(u, rtol) * s) @ orthogonalise(v, rtol).T


def other_rule(taus: Sequence[Tensor], rule: str) -> Tensor:
    """Σ τk (``sum``) or Σ τk / K (``mean``) for tensors merged without an SVD."""
    total = torch.stack(list(taus)).sum(dim=0)
    return total / len(taus) if rule == "mean" else total


class SvdMergeMethod(MergeMethod):
    """Shared plugin of the SVD merges: the per-2-D-weight ``delta`` plus the other-tensor
    rule, then θ0 + α·Δ. Options: ``scaling`` α; ``weights`` (null, list or mapping by
    expert; multiply τk); ``other_tensors`` (mean | sum); ``svd_exclude`` (glob patterns of
    tensor names merged by the other-tensor rule); ``rank_rtol`` (null: max(m, n)·ε_float32;
    0: keep every singular triplet)."""

    name = "svd_merge"

    def __init__(
        self,
        scaling: float = 1.0,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        other_tensors: str = "mean",
        svd_exclude: Sequence[str] | None = None,
        rank_rtol: float | None = None,
    ) -> None:
        self.scaling = check_finite(scaling, "method.scaling")
        self.weights_option = check_weights_option(weights)
        self.other_tensors = check_choice(other_tensors, "method.other_tensors", OTHER_RULES)
        patterns = [] if svd_exclude is None else svd_exclude
        if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
            raise ValueError(
                f"method.svd_exclude must be a list of tensor-name patterns, got {svd_exclude!r}"
            )
        self.svd_exclude = list(patterns)
        if rank_rtol is not None:
            rank_rtol = check_finite(rank_rtol, "method.rank_rtol")
            if not 0 <= rank_rtol < 1:
                raise ValueError(f"method.rank_rtol must be null or in [0, 1), got {rank_rtol}")
        self.rank_rtol = rank_rtol

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        weights = resolve_weights(self.weights_option, self.expert_names)
        self.weight_of = dict(zip(self.expert_names, weights, strict=True))
        self.svd_tensors = 0
        self.other_count = 0
        self.fallback: list[str] = []

    def delta(self, name: str, taus: list[Tensor]) -> Tensor | None:
        """The merged 2-D task matrix Δ (before α), or None to use the other-tensor rule."""
        raise NotImplementedError

    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        taus = [self.weight_of[n] * (t - base) for n, t in experts.items()]
        delta = None
        if base.dim() == 2 and not any(fnmatch.fnmatchcase(name, p) for p in self.svd_exclude):
            with one_thread():
                delta = self.delta(name, taus)
            if delta is None:
                self.fallback.append(name)
        if delta is None:
            delta = other_rule(taus, self.other_tensors)
            self.other_count += 1
        else:
            self.svd_tensors += 1
        return base + self.scaling * delta

    def report(self) -> dict[str, Any]:
        return {
            "weights": self.weight_of,
            "svd_tensors": self.svd_tensors,
            "other_tensors": self.other_count,
            "too_small_for_svd": self.fallback,
        }


class TSVMerge(SvdMergeMethod):
    """Plugin for :func:`tsv_delta` (options: see :class:`SvdMergeMethod`)."""

    name = "tsv_merge"

    def delta(self, name: str, taus: list[Tensor]) -> Tensor | None:
        return tsv_delta(taus, self.rank_rtol)
