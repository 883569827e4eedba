"""Magnitude trimming, the piece TIES, MetaGPT + TIES, AdaMerging++ and Sens + TIES share.

A trim keeps the top-k entries of a task vector by magnitude and zeroes the rest. The
threshold is the k-th largest |τ|; every entry with |τ| ≥ threshold is kept (entries tied
with it too). Per tensor, the threshold comes from ``torch.kthvalue`` (a selection, no
sort); over a whole task vector it is found exactly in two streaming passes by a radix
select over float32 bit patterns (:class:`RadixSelect`), so no model is ever held whole.
Magnitudes are compared as float32 (NaN would sort above +inf).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction

import torch
from torch import Tensor

N_BINS = 1 << 16
TRIM_SCOPES = ("global", "per_tensor")
KEEP_COUNTS = ("ceil", "floor", "floor_plus_one")


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
    """τ with every entry of |τ| < ``threshold`` set to +0 (|τ| == threshold is kept).

    Exactly ``torch.where(|τ| >= threshold, τ, 0)``, built from two vectorised one-sided
    thresholds (``torch.where`` is several times slower on the CPU): with t⁻ the largest
    value of τ's dtype below ``threshold``, τ > t⁻ ⟺ τ ≥ threshold, the positive side
    keeps τ > t⁻, the negative side −τ > t⁻, and their sum restores τ (a kept value plus
    ∓0 is itself; two dropped sides give +0, as ``where`` does)."""
    if not tau.is_floating_point():
        return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))
    t = torch.tensor(threshold, dtype=tau.dtype)
    below = float(torch.nextafter(t, torch.tensor(float("-inf"), dtype=tau.dtype)))
    positive = torch.nn.functional.threshold(tau, below, 0.0)
    negative = torch.nn.functional.threshold(tau.neg(), below, 0.0).neg_()
    return positive.add_(negative)


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
        # bin 1 + low bits inside the bucket; entries below it fall in bin 0, above in the
        # last bin (a clamp and one bincount: no boolean selection)
        shifted = (magnitude_bits(t) - ((self.bucket << 16) - 1)).clamp_(0, N_BINS + 1)
        inside = torch.bincount(shifted, minlength=N_BINS + 2)[1 : N_BINS + 1]
        self._low = self._accumulate(self._low, inside)

    def value(self) -> float:
        """End of pass 1: the exact k-th largest magnitude (0.0 when k == 0)."""
        if self.bucket is None:
            return 0.0
        if self._low is None:
            raise RuntimeError("RadixSelect.value() before any add_low() in pass 1")
        low, _ = select_from_top(self._low, self.k - self.above)
        return bits_to_float((self.bucket << 16) | low)


class ExpertThresholds:
    """Exact trim thresholds of several experts' task vectors seen in pieces over two
    passes: one :class:`RadixSelect` per expert, k = :func:`count_to_keep` of ``density``
    over all the entries it saw (``rule`` as there)."""

    def __init__(self, density: float, rule: str) -> None:
        self.density, self.rule = density, rule
        self.selects: dict[str, RadixSelect] = {}

    def observe(self, pass_idx: int, taus: Mapping[str, Tensor]) -> None:
        """Pass 0: the high 16 bits of each expert's |τ|; pass 1: the low ones."""
        for expert, tau in taus.items():
            sel = self.selects.setdefault(expert, RadixSelect())
            if pass_idx == 0:
                sel.add_high(tau)
            else:
                sel.add_low(tau)

    def end_pass(self, pass_idx: int) -> dict[str, float] | None:
        """End of a pass; after pass 1 the threshold of each expert."""
        if pass_idx == 0:
            for sel in self.selects.values():
                sel.find_bucket(count_to_keep(self.density, sel.n, self.rule))
            return None
        return {e: sel.value() for e, sel in self.selects.items()}


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
