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
   :class:`RadixSelect`). ``trim_scope: per_tensor`` (mergekit's behaviour): n is the
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

Magnitudes are compared as float32 (NaN, which should never occur in weights, would sort
above +inf).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import torch
from torch import Tensor

from core.options import (
    check_choice,
    check_finite,
    check_unit_interval,
    check_weights_option,
    resolve_weights,
)
from methods.base import MergeMethod, task_vectors

N_BINS = 1 << 16
TRIM_SCOPES = ("global", "per_tensor")
KEEP_COUNTS = ("ceil", "floor", "floor_plus_one")
SIGN_VOTES = ("unweighted", "weighted")


# ---------------------------------------------------------------------------- trim


def count_to_keep(density: float, n: int, rule: str = "ceil") -> int:
    """How many of n entries a trim keeps, clamped to [1, n] (0 when n == 0).

    ``ceil`` (default): ⌈density·n⌉ on the exact decimal value of ``density``
    (``Fraction(repr(density))``), so 0.7 · 10 gives 7 and not 8 from float rounding.
    The peers' conventions, on the float product as they compute it: ``floor``
    (mergekit's ``int(d·n)``) and ``floor_plus_one`` (the official TIES code and
    fusion-bench: ``int(d·n) + 1``).
    """
    if n <= 0:
        return 0
    if rule == "ceil":
        frac = Fraction(repr(float(density)))
        k = -((-frac.numerator * n) // frac.denominator)
    elif rule == "floor":
        k = int(float(density) * n)
    elif rule == "floor_plus_one":
        k = int(float(density) * n) + 1
    else:
        raise ValueError(f"keep-count rule must be one of {list(KEEP_COUNTS)}, got {rule!r}")
    return min(max(k, 1), n)


def kth_largest_magnitude(t: Tensor, k: int) -> float:
    """The k-th largest |t| (1-based) of one tensor, by ``torch.kthvalue`` (selection)."""
    flat = t.detach().abs().float().reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    return float(torch.kthvalue(flat, n - k + 1).values.item())


def trim_threshold_per_tensor(tau: Tensor, density: float, rule: str = "ceil") -> float:
    """Per-tensor trim threshold: the k-th largest |τ|, k = ``count_to_keep`` of numel."""
    if tau.numel() == 0:
        return 0.0
    return kth_largest_magnitude(tau, count_to_keep(density, tau.numel(), rule))


def trim_mask_per_tensor(tau: Tensor, density: float, rule: str = "ceil") -> Tensor:
    """Boolean mask of the entries kept by a per-tensor trim (ties at the threshold kept)."""
    return tau.abs() >= trim_threshold_per_tensor(tau, density, rule)


def trim_by_threshold(tau: Tensor, threshold: float) -> Tensor:
    """τ with every entry of |τ| < ``threshold`` set to 0 (|τ| == threshold is kept)."""
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


# ------------------------------------------------------- exact global k-th largest


def magnitude_bits(t: Tensor) -> Tensor:
    """Flattened int32 bit patterns of |t| as float32.

    For non-negative float32 values the int32 view is monotone in the value, so ranking
    bit patterns ranks magnitudes.
    """
    return t.detach().abs().float().reshape(-1).view(torch.int32)


def select_from_top(hist: Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th largest entry (1-based) of a histogram, and the number of
    entries in higher bins."""
    h = hist.to("cpu", torch.int64)
    at_or_above = h.flip(0).cumsum(0)  # [j] = count in bins >= len(h) - 1 - j
    total = int(at_or_above[-1])
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}], got {k}")
    j = int(torch.searchsorted(at_or_above, torch.tensor([k])).item())
    b = h.numel() - 1 - j
    return b, int(at_or_above[j]) - int(h[b])


def bits_to_float(bits: int) -> float:
    """The float32 value whose int32 bit pattern is ``bits``."""
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())


class RadixSelect:
    """Exact k-th largest |x| over a stream of tensors, in two passes.

    Pass 0 (:meth:`add_high` per tensor, then :meth:`find_bucket` with k): a 65536-bin
    histogram of the high 16 bits of |x|'s float32 bit pattern locates the bucket holding
    the k-th largest and how many entries lie above it. Pass 1 (:meth:`add_low`, then
    :meth:`value`): a histogram of the low 16 bits of entries in that bucket gives the
    exact bit pattern. Memory: two 65536-entry int64 histograms.
    """

    def __init__(self) -> None:
        self.n = 0
        self.k = 0
        self._high: Tensor | None = None
        self._low: Tensor | None = None
        self.bucket: int | None = None
        self.above = 0

    @staticmethod
    def _accumulate(acc: Tensor | None, h: Tensor) -> Tensor:
        return h if acc is None else acc + h.to(acc.device)

    def add_high(self, t: Tensor) -> None:
        """Pass 0: count ``t``'s entries by the high 16 bits of their magnitude."""
        bits = magnitude_bits(t)
        self.n += bits.numel()
        self._high = self._accumulate(self._high, torch.bincount(bits >> 16, minlength=N_BINS))

    def find_bucket(self, k: int) -> None:
        """End of pass 0: locate the bucket of the k-th largest (k = 0: nothing to find)."""
        self.k = k
        if k == 0 or self._high is None:
            self.bucket = None
            return
        self.bucket, self.above = select_from_top(self._high, k)
        self._high = None

    def add_low(self, t: Tensor) -> None:
        """Pass 1: count entries inside the chosen bucket by their low 16 bits."""
        if self.bucket is None:
            return
        bits = magnitude_bits(t)
        inside = bits[(bits >> 16) == self.bucket] & 0xFFFF
        self._low = self._accumulate(self._low, torch.bincount(inside, minlength=N_BINS))

    def value(self) -> float:
        """End of pass 1: the exact k-th largest magnitude (0.0 when k == 0)."""
        if self.bucket is None:
            return 0.0
        if self._low is None:
            raise RuntimeError("RadixSelect.value() before any add_low() in pass 1")
        low, _ = select_from_top(self._low, self.k - self.above)
        return bits_to_float((self.bucket << 16) | low)


def global_kth_largest_magnitude(tensors: Sequence[Tensor], k: int) -> float:
    """Exact k-th largest |x| over all entries of ``tensors`` (radix select, in memory)."""
    sel = RadixSelect()
    for t in tensors:
        sel.add_high(t)
    if not 1 <= k <= sel.n:
        raise ValueError(f"k must be in [1, {sel.n}], got {k}")
    sel.find_bucket(k)
    for t in tensors:
        sel.add_low(t)
    return sel.value()


def global_trim_threshold(
    task_vector: Sequence[Tensor], density: float, rule: str = "ceil"
) -> float:
    """Global trim threshold of one expert: the k-th largest |τ| over all of its tensors
    (k = ``count_to_keep`` of the total numel); 0.0 for an empty task vector."""
    n = sum(t.numel() for t in task_vector)
    k = count_to_keep(density, n, rule)
    return global_kth_largest_magnitude(task_vector, k) if k else 0.0


# ---------------------------------------------------------------- elect and merge


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


# -------------------------------------------------------------------------- plugin


class TIES(MergeMethod):
    """TIES-Merging plugin (see the module docstring for the exact math and choices).

    Options: ``density`` (fraction kept, (0, 1], default 0.2), ``scaling`` (λ, default
    1.0), ``weights`` (per-model weights used only in the disjoint mean, not in the sign
    vote), ``trim_scope`` (``global`` default, or ``per_tensor``), ``keep_count``
    (``ceil`` default; ``floor`` is mergekit's count, ``floor_plus_one`` the official
    code's and fusion-bench's), ``sign_vote`` (``unweighted``, Algorithm 1, default; or
    ``weighted``, mergekit's). With ``trim_scope: per_tensor, keep_count: floor,
    sign_vote: weighted`` the merge is mergekit's ``ties`` (tests/peers checks it).

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
    ) -> None:
        self.density = check_unit_interval(density, "method.density", open_low=True)
        self.scaling = check_finite(scaling, "method.scaling")
        self.weights_option = check_weights_option(weights)
        self.trim_scope = check_choice(trim_scope, "method.trim_scope", TRIM_SCOPES)
        self.keep_count = check_choice(keep_count, "method.keep_count", KEEP_COUNTS)
        self.weighted_vote = check_choice(sign_vote, "method.sign_vote", SIGN_VOTES) == "weighted"
        self.stat_passes = 2 if self.trim_scope == "global" and self.density < 1 else 0
        self.weights: list[float] = []
        self.expert_names: list[str] = []
        self._kept: dict[str, Tensor | int] = {}
        self._numel: dict[str, int] = {}
        self.thresholds: dict[str, float] | None = None

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        self.weights = resolve_weights(self.weights_option, self.expert_names)
        self.weight_of = dict(zip(self.expert_names, self.weights, strict=True))
        self._select = {n: RadixSelect() for n in self.expert_names}
        self._kept = dict.fromkeys(self.expert_names, 0)
        self._numel = dict.fromkeys(self.expert_names, 0)
        self.thresholds = None
        if self.trim_scope == "global" and self.stat_passes == 0:
            self.thresholds = dict.fromkeys(self.expert_names, 0.0)

    def observe(
        self, pass_idx: int, name: str, base: Tensor, experts: Mapping[str, Tensor]
    ) -> None:
        if pass_idx not in range(self.stat_passes):
            raise ValueError(f"TIES has {self.stat_passes} statistics passes, got pass {pass_idx}")
        for expert, t in experts.items():
            if pass_idx == 0:
                self._select[expert].add_high(t - base)
            else:
                self._select[expert].add_low(t - base)

    def end_pass(self, pass_idx: int) -> None:
        if pass_idx == 0:
            for sel in self._select.values():
                sel.find_bucket(count_to_keep(self.density, sel.n, self.keep_count))
        elif pass_idx == 1:
            self.thresholds = {n: sel.value() for n, sel in self._select.items()}
            self._select = {}

    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        taus = task_vectors(base, experts)
        if self.trim_scope == "per_tensor":
            thresholds = [trim_threshold_per_tensor(t, self.density, self.keep_count) for t in taus]
        else:
            if self.thresholds is None:
                raise RuntimeError("TIES global trim: the 2 statistics passes have not run")
            thresholds = [self.thresholds[n] for n in experts]
        trimmed = [trim_by_threshold(t, th) for t, th in zip(taus, thresholds, strict=True)]
        for n, t in zip(experts, trimmed, strict=True):
            self._kept[n] = self._kept[n] + torch.count_nonzero(t)
            self._numel[n] += t.numel()
        weights = [self.weight_of[n] for n in experts]
        return ties_combine(base, trimmed, self.scaling, weights, self.weighted_vote)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "weights": dict(zip(self.expert_names, self.weights, strict=True)),
            "kept_fraction": {
                n: (float(self._kept[n]) / self._numel[n]) if self._numel[n] else None
                for n in self.expert_names
            },
        }
        if self.thresholds is not None:
            out["thresholds"] = {n: float(v) for n, v in self.thresholds.items()}
        return out
