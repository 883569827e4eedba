"""TIES-Merging (Yadav et al. 2023), Algorithm 1: trim, elect sign, disjoint merge.

With τ_k = θ_k − θ0:

1. **Trim**: keep the top-k entries of each τ_k by magnitude, k = ⌈density·n⌉ (computed
   exactly on density's decimal value, clamped to [1, n]; ``keep_count`` selects the
   peers' ⌊d·n⌋ or ⌊d·n⌋ + 1 instead), zero the rest. The threshold is
   the k-th largest |τ_k|; every entry with |τ_k| ≥ threshold is kept, so entries tied
   with the threshold are all kept and slightly more than k entries may survive.
   ``trim_scope: global`` (the paper and its official code, default): n is the size of
   the expert's *whole* task vector, one threshold per expert, found exactly in two
   streaming statistics passes by a radix select over float32 bit patterns (see
   :class:`core.trim.RadixSelect`). ``trim_scope: per_tensor`` (mergekit's behaviour): n is the
   tensor's numel and the threshold comes from ``torch.kthvalue`` (a selection, no sort).
2. **Elect sign**: γ = sign(Σ_k trimmed τ_k), elementwise and *unweighted*, as in the
   paper. (mergekit multiplies by the per-model weights before the vote; its issue #474
   calls that a deviation from Algorithm 1. We follow the paper; ``sign_vote: weighted``
   gives mergekit's vote.) Where the sum is exactly
   0, γ = 0 and no expert agrees, so the entry merges to 0.
3. **Disjoint merge**: with m_k = [sign(τ̂_k) = γ and τ̂_k ≠ 0], merged =
   Σ_k w_k τ̂_k m_k / Σ_k w_k m_k — with equal weights, the mean over the agreeing
   non-zero entries (not over K). Entries with no agreeing expert (or only zero-weight
   ones) give 0.
4. θ = θ0 + λ · merged.

mergekit 0.1.5's remaining conventions are options too (defaults: the paper's, as above):
``normalize: false`` (the sum of the agreeing entries, no division), ``rescale: l1``
(its ``rescale: true``), ``tie_break: argsort`` (exactly k entries per tensor, as its
``torch.argsort`` picks them among equal magnitudes), ``weight_product: rounded`` (w_k·τ̂_k
rounded before the sums) and ``zero_sign: positive`` (γ = +1 where the vote's sum is 0).
All of them together with ``trim_scope: per_tensor, keep_count: floor, sign_vote:
weighted`` are mergekit's ``ties`` bit for bit, for any weights (tests/peers).

The trim and the combine are the shared pieces :class:`core.pieces.MagnitudeTrim` and
:class:`core.pieces.DisjointMean` (their tensor functions in :mod:`core.trim` and
:mod:`core.combine`); the plugin fixes them with :class:`core.pieces.Fixed` coefficients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from core.combine import ties_combine
from core.pieces import DisjointMean, Fixed, MagnitudeTrim
from core.trim import trim_by_threshold, trim_threshold_per_tensor
from methods.task_vector import TaskVectorMerge


def ties_merge(
    base: Tensor,
    experts: Sequence[Tensor],
    *,
    density: float = 1.0,
    thresholds: Sequence[float] | None = None,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
    keep_count: str = "ceil",
    weighted_vote: bool = False,
) -> Tensor:
    """Full TIES on one tensor.

    With ``thresholds`` (one per expert, e.g. global thresholds) each τ_k is trimmed at
    its threshold; otherwise it is trimmed per tensor at ``density`` (``keep_count``
    entries: see :func:`count_to_keep`).
    """
    experts = list(experts)
    taus = [t - base for t in experts]
    if thresholds is None:
        thresholds = [trim_threshold_per_tensor(t, density, keep_count) for t in taus]
    if len(thresholds) != len(taus):
        raise ValueError(f"got {len(thresholds)} thresholds for {len(taus)} experts")
    trimmed = [trim_by_threshold(t, th) for t, th in zip(taus, thresholds, strict=True)]
    return ties_combine(base, trimmed, scaling, weights, weighted_vote)


class TIES(TaskVectorMerge):
    """TIES-Merging plugin (see the module docstring for the exact math and choices).

    Options: ``density`` (fraction kept, (0, 1], default 0.2), ``scaling`` (λ, default
    1.0), ``weights`` (per-model weights used only in the disjoint mean, not in the sign
    vote), ``trim_scope`` (``global`` default, or ``per_tensor``), ``keep_count``
    (``ceil`` default; ``floor`` is mergekit's count, ``floor_plus_one`` the official
    code's and fusion-bench's), ``sign_vote`` (``unweighted``, Algorithm 1, default; or
    ``weighted``, mergekit's). With ``trim_scope: per_tensor, keep_count: floor,
    sign_vote: weighted`` the merge is mergekit's ``ties`` (tests/peers checks it) up to
    the rounding of non-power-of-two weights and exact ties; ``normalize``, ``rescale``,
    ``tie_break``, ``weight_product`` and ``zero_sign`` select mergekit's remaining
    conventions (module docstring; the pieces :class:`core.pieces.MagnitudeTrim` and
    :class:`core.pieces.DisjointMean`).

    ``stat_passes`` is 2 for global trimming (radix select: high then low 16 bits) and 0
    for per-tensor trimming, or when density == 1 (everything is kept, threshold 0).
    ``report()`` gives the per-expert global thresholds and the fraction of entries that
    survived trimming with a non-zero value.
    """

    name = "ties"

    def __init__(
        self,
        density: float = 0.2,
        scaling: float = 1.0,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        trim_scope: str = "global",
        keep_count: str = "ceil",
        sign_vote: str = "unweighted",
        normalize: bool = True,
        rescale: str = "none",
        tie_break: str = "keep_all",
        weight_product: str = "fused",
        zero_sign: str = "zero",
    ) -> None:
        super().__init__(
            transform=MagnitudeTrim(
                density, trim_scope, keep_count, rescale, tie_break, where="method"
            ),
            combine=DisjointMean(sign_vote, normalize, weight_product, zero_sign, where="method"),
            coefficients=Fixed(scaling, weights, where="method"),
        )
