"""Uncertainty of per-item evaluation results: aggregates, bootstrap intervals, paired tests.

Pure numpy. ``values`` are per-item arrays: shape ``(n_items,)`` for one seed, or
``(n_seeds, n_items)`` for replicates whose items are aligned across seeds (column ``i`` is
the same document in every row). Aggregations over pairs (``weighted_perplexity`` and
``bits_per_byte``: items are ``(loglikelihood, weight)``) take a trailing axis of 2:
``(n_items, 2)`` or ``(n_seeds, n_items, 2)``. The aggregations are lm-eval's, by name:
``mean``; ``perplexity`` = exp(−mean ll); ``weighted_perplexity`` = exp(−Σll / Σweight);
``bits_per_byte`` = −Σll / (Σbytes · ln 2).

Bootstrap (``n_boot`` replicates; intervals are percentile intervals of the replicates):

* One seed: a replicate resamples the items with replacement and aggregates them.
* Several seeds (two-level): a replicate draws ``n_seeds`` seeds with replacement, then
  ``n_items`` item indices with replacement — the same indices for every seed drawn — and is
  the mean over the drawn seeds of their aggregates on those items. The estimate is the mean
  over seeds of the per-seed aggregates. With one seed this is exactly the item bootstrap.
* Paired (:func:`paired`, :func:`macro_paired`): both sides get the same seed draws and the
  same item indices, so the interval of the difference carries only what differs.
* Macro average over tasks (:func:`macro_interval`): a replicate resamples every task's items
  independently (the seeds once, shared by all tasks) and averages the task aggregates.

Random streams, with ``rng = numpy.random.default_rng``: seed draws come from
``rng((seed, 0))``, item draws of stream ``k`` from ``rng((seed, 1, k))``; a single array uses
stream 0 and task ``k`` of a macro average stream ``k``. Equal ``(seed, stream, n_items)``
give equal item indices, which is what pairs two calls of :func:`resample_items`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "AGGREGATIONS",
    "Interval",
    "Paired",
    "Replicates",
    "aggregate",
    "difference",
    "interval",
    "macro_interval",
    "macro_paired",
    "mcnemar",
    "mean_of",
    "paired",
    "ratio",
    "resample_items",
    "resample_seeds",
    "verdict",
]

AGGREGATIONS = ("mean", "perplexity", "weighted_perplexity", "bits_per_byte")
_PAIR_ITEMS = frozenset({"weighted_perplexity", "bits_per_byte"})
_CHUNK = 1 << 22  # resample counts held at once (replicates × items): 32 MiB of float64


# -- results -------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """A point estimate and its percentile-bootstrap interval.

    ``sd`` is the standard deviation across seeds of the per-seed estimates (``None`` with
    one seed); ``n_seeds`` is ``None`` only for a derived estimate whose parts have
    different seed counts; ``n_items`` counts the items behind the estimate (summed over
    tasks for a macro average).
    """

    estimate: float
    low: float
    high: float
    level: float
    sd: float | None
    n_seeds: int | None
    n_items: int


@dataclass(frozen=True)
class Paired(Interval):
    """A difference A − B on the same items: its interval, whether that excludes 0, and the
    exact two-sided McNemar p-value when every per-item value is 0 or 1 (the largest over
    seeds; ``None`` for non-binary values and macro averages)."""

    significant: bool
    mcnemar_p: float | None = None


@dataclass(frozen=True, eq=False)
class Replicates:
    """Bootstrap replicates of one estimate: ``draws`` (``n_boot`` values), the per-seed
    point estimates (``None`` when undefined, see :func:`difference`) and the item count.
    Replicates built with the same seed, stream and item count are paired draw by draw."""

    estimate: float
    draws: np.ndarray
    per_seed: np.ndarray | None
    n_items: int

    @property
    def n_seeds(self) -> int | None:
        return None if self.per_seed is None else len(self.per_seed)

    @property
    def sd(self) -> float | None:
        if self.per_seed is None or len(self.per_seed) < 2:
            return None
        return float(np.std(self.per_seed, ddof=1))

    def interval(self, level: float = 0.95) -> Interval:
        """The percentile interval at ``level`` (e.g. 0.95 → the 2.5 and 97.5 percentiles)."""
        low, high = _percentiles(self.draws, level)
        return Interval(self.estimate, low, high, level, self.sd, self.n_seeds, self.n_items)


# -- aggregates ----------------------------------------------------------------------
def _width(aggregation: str) -> int:
    if aggregation not in AGGREGATIONS:
        raise ValueError(
            f"unknown aggregation {aggregation!r}; supported: {', '.join(AGGREGATIONS)}"
        )
    return 2 if aggregation in _PAIR_ITEMS else 1


def _items(values: ArrayLike, aggregation: str) -> np.ndarray:
    """``values`` as a float array of shape (n_seeds, n_items, width)."""
    width = _width(aggregation)
    arr = np.asarray(values, dtype=float)
    item_ndim = 1 if width == 1 else 2
    if arr.ndim == item_ndim:
        arr = arr[None]
    if arr.ndim != item_ndim + 1 or 0 in arr.shape[:2] or (width == 2 and arr.shape[-1] != 2):
        expected = (
            "(n_items,) or (n_seeds, n_items)"
            if width == 1
            else "(n_items, 2) or (n_seeds, n_items, 2) of (loglikelihood, weight)"
        )
        raise ValueError(
            f"{aggregation}: values of shape {np.shape(values)}; expected {expected}, "
            "at least one item"
        )
    return arr.reshape(arr.shape[0], arr.shape[1], width)


def _finish(sums: np.ndarray, n_items: int, aggregation: str) -> np.ndarray:
    """The aggregate from item sums (``sums[..., j]``: Σ over the items of column ``j``)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if aggregation == "mean":
            return sums[..., 0] / n_items
        if aggregation == "perplexity":
            return np.exp(-sums[..., 0] / n_items)
        if aggregation == "weighted_perplexity":
            return np.exp(-sums[..., 0] / sums[..., 1])
        return -sums[..., 0] / (sums[..., 1] * math.log(2))


def _per_seed(items: np.ndarray, aggregation: str) -> np.ndarray:
    return _finish(items.sum(axis=1), items.shape[1], aggregation)


def aggregate(values: ArrayLike, aggregation: str = "mean") -> float:
    """lm-eval's aggregate of one seed's items; for ``(n_seeds, …)`` values, the mean over
    seeds of the per-seed aggregates (the estimate of :func:`interval`)."""
    return float(_per_seed(_items(values, aggregation), aggregation).mean())


# -- resampling ----------------------------------------------------------------------
def _check(n_boot: int, seed: int, level: float | None = None) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if level is not None and not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level!r}")


def _percentiles(draws: np.ndarray, level: float) -> tuple[float, float]:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie strictly between 0 and 1, got {level!r}")
    low, high = np.quantile(draws, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(low), float(high)


def _resample(
    items: np.ndarray, aggregation: str, n_boot: int, seed: int, stream: int
) -> np.ndarray:
    """(m, n, width) items → (m, n_boot) aggregates on shared item resamples.

    Resample ``r`` is a vector of counts (how often each item was drawn), so every
    aggregate is ``counts @ items``: one matrix product per chunk of replicates for all
    rows at once. Bit-identical rows are computed once, so identical inputs give identical
    draws (a paired difference of a row with itself is exactly 0).
    """
    m, n, width = items.shape
    seen: dict[bytes, int] = {}
    inverse = np.empty(m, dtype=np.intp)
    kept: list[int] = []
    for i, row in enumerate(items):
        inverse[i] = seen.setdefault(row.tobytes(), len(kept))
        if inverse[i] == len(kept):
            kept.append(i)
    columns = items[kept].transpose(1, 0, 2).reshape(n, -1)
    sums = np.empty((n_boot, columns.shape[1]))
    rng = np.random.default_rng((seed, 1, stream))
    chunk = max(1, _CHUNK // n)
    offsets = np.arange(chunk)[:, None] * n
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        picks = rng.integers(0, n, size=(size, n)) + offsets[:size]
        counts = np.bincount(picks.ravel(), minlength=size * n).reshape(size, n)
        sums[start : start + size] = counts.astype(float) @ columns
    draws = _finish(sums.reshape(n_boot, len(kept), width), n, aggregation)
    return draws.T[inverse]


def resample_items(
    values: ArrayLike,
    aggregation: str = "mean",
    *,
    n_boot: int = 10_000,
    seed: int = 0,
    stream: int = 0,
) -> np.ndarray:
    """Aggregates of each row of ``values`` (shape ``(m, n_items[, 2])``, or one row) on
    ``n_boot`` item resamples shared by all rows: an array of shape ``(m, n_boot)``."""
    _check(n_boot, seed)
    return _resample(_items(values, aggregation), aggregation, n_boot, seed, stream)


def resample_seeds(
    per_seed_draws: ArrayLike, per_seed: ArrayLike, n_items: int, *, seed: int = 0
) -> Replicates:
    """Two-level replicates from per-seed item replicates (``(n_seeds, n_boot)``, drawn with
    shared item indices) and the per-seed estimates: replicate ``r`` is the mean of
    ``per_seed_draws[s, r]`` over ``n_seeds`` seeds ``s`` drawn with replacement."""
    draws = np.asarray(per_seed_draws, dtype=float)
    estimates = np.asarray(per_seed, dtype=float)
    if draws.ndim != 2 or estimates.shape != draws.shape[:1]:
        raise ValueError(
            f"per_seed_draws of shape {draws.shape} and per_seed of shape {estimates.shape}; "
            "expected (n_seeds, n_boot) and (n_seeds,)"
        )
    n_seeds, n_boot = draws.shape
    _check(n_boot, seed)
    if n_seeds == 1:
        combined = draws[0].copy()
    else:
        picks = np.random.default_rng((seed, 0)).integers(0, n_seeds, size=(n_boot, n_seeds))
        combined = np.take_along_axis(draws.T, picks, axis=1).mean(axis=1)
    return Replicates(float(estimates.mean()), combined, estimates, int(n_items))


def _replicates(
    items: np.ndarray, aggregation: str, n_boot: int, seed: int, stream: int
) -> Replicates:
    draws = _resample(items, aggregation, n_boot, seed, stream)
    return resample_seeds(draws, _per_seed(items, aggregation), items.shape[1], seed=seed)


# -- combining replicates --------------------------------------------------------------
def _check_paired(a: Replicates, b: Replicates, what: str) -> None:
    if a.draws.shape != b.draws.shape or a.n_items != b.n_items:
        raise ValueError(
            f"{what} needs paired replicates (same n_boot and items); got {a.draws.shape[0]} "
            f"and {b.draws.shape[0]} draws over {a.n_items} and {b.n_items} items"
        )


def _seedwise(
    a: Replicates, b: Replicates, op: Callable[[np.ndarray, np.ndarray], np.ndarray]
) -> np.ndarray | None:
    if a.per_seed is None or b.per_seed is None or len(a.per_seed) != len(b.per_seed):
        return None
    return op(a.per_seed, b.per_seed)


def difference(a: Replicates, b: Replicates) -> Replicates:
    """A − B draw by draw (both built on the same items and streams). Per-seed estimates
    are differenced seed by seed when both sides have the same seed count, else ``None``."""
    _check_paired(a, b, "difference")
    return Replicates(
        a.estimate - b.estimate, a.draws - b.draws, _seedwise(a, b, np.subtract), a.n_items
    )


def ratio(a: Replicates, b: Replicates) -> Replicates:
    """A ÷ B draw by draw (both built on the same items and streams), as :func:`difference`."""
    _check_paired(a, b, "ratio")
    with np.errstate(divide="ignore", invalid="ignore"):
        return Replicates(
            a.estimate / b.estimate if b.estimate != 0 else math.nan,
            a.draws / b.draws,
            _seedwise(a, b, np.divide),
            a.n_items,
        )


def mean_of(parts: Sequence[Replicates], weights: Sequence[float] | None = None) -> Replicates:
    """The (weighted) mean of several estimates, draw by draw: a macro average when the
    parts are tasks resampled on independent streams. ``n_items`` is the parts' total."""
    if not parts:
        raise ValueError("mean_of needs at least one part")
    w = np.ones(len(parts)) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (len(parts),) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights {weights!r}: need one non-negative weight per part")
    w = w / w.sum()
    draws = np.stack([p.draws for p in parts])
    if draws.ndim != 2:
        raise ValueError("mean_of needs parts with the same number of draws")
    seeds = {p.n_seeds for p in parts}
    per_seed = None
    if len(seeds) == 1 and None not in seeds:
        per_seed = w @ np.stack([p.per_seed for p in parts])
    return Replicates(
        float(w @ [p.estimate for p in parts]),
        w @ draws,
        per_seed,
        sum(p.n_items for p in parts),
    )


# -- public tests ----------------------------------------------------------------------
def interval(
    values: ArrayLike,
    aggregation: str = "mean",
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Estimate and percentile-bootstrap interval of ``aggregation`` over ``values``
    (``(n_items,)`` or ``(n_seeds, n_items)``, see the module doc for the two-level
    resampling of seeds, then items)."""
    _check(n_boot, seed, level)
    items = _items(values, aggregation)
    return _replicates(items, aggregation, n_boot, seed, 0).interval(level)


def _binary(items: np.ndarray) -> bool:
    return bool(np.isin(items, (0.0, 1.0)).all())


def _mcnemar_counts(n01: int, n10: int) -> float:
    """Exact two-sided McNemar p: 2·P(X ≤ min(n01, n10)), X ~ Binomial(n01 + n10, 1/2)."""
    n = n01 + n10
    if n == 0:
        return 1.0
    k = np.arange(1, min(n01, n10) + 1)
    log_pmf = np.concatenate(([0.0], np.cumsum(np.log(n - k + 1) - np.log(k)))) - n * math.log(2)
    top = log_pmf.max()
    return min(1.0, 2.0 * math.exp(top) * float(np.exp(log_pmf - top).sum()))


def mcnemar(a: ArrayLike, b: ArrayLike) -> float:
    """Exact two-sided McNemar p-value for paired binary outcomes (1-D arrays of 0/1 of the
    same length): from the discordant counts #(a=1, b=0) and #(a=0, b=1)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"mcnemar needs two 1-D arrays of equal length; got {x.shape}, {y.shape}")
    if not (_binary(x) and _binary(y)):
        raise ValueError("mcnemar needs binary outcomes (every value 0 or 1)")
    return _mcnemar_counts(int(np.sum((x == 1) & (y == 0))), int(np.sum((x == 0) & (y == 1))))


def _paired_result(diff: Replicates, level: float, mcnemar_p: float | None) -> Paired:
    iv = diff.interval(level)
    significant = bool(iv.low > 0 or iv.high < 0)
    return Paired(**vars(iv), significant=significant, mcnemar_p=mcnemar_p)


def paired(
    a: ArrayLike,
    b: ArrayLike,
    aggregation: str = "mean",
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> Paired:
    """aggregate(a) − aggregate(b) on the same items (equal shapes; row ``s`` of ``a`` is
    paired with row ``s`` of ``b``), with the same two-level resampling applied to both.
    For ``mean`` over 0/1 values, also the exact McNemar p-value per seed (the largest)."""
    _check(n_boot, seed, level)
    x, y = _items(a, aggregation), _items(b, aggregation)
    if x.shape != y.shape:
        raise ValueError(
            f"paired: a has shape {np.shape(a)} and b {np.shape(b)}; pairing needs the same "
            "seeds and items on both sides"
        )
    n_seeds, n_items = x.shape[:2]
    draws = _resample(np.concatenate([x, y]), aggregation, n_boot, seed, 0)
    ra = resample_seeds(draws[:n_seeds], _per_seed(x, aggregation), n_items, seed=seed)
    rb = resample_seeds(draws[n_seeds:], _per_seed(y, aggregation), n_items, seed=seed)
    p = None
    if aggregation == "mean" and _binary(x) and _binary(y):
        p = max(mcnemar(x[s, :, 0], y[s, :, 0]) for s in range(n_seeds))
    return _paired_result(difference(ra, rb), level, p)


def _aggregations(aggregation: str | Sequence[str], n_tasks: int) -> list[str]:
    aggs = [aggregation] * n_tasks if isinstance(aggregation, str) else list(aggregation)
    if n_tasks == 0 or len(aggs) != n_tasks:
        raise ValueError(f"{n_tasks} task(s) and {len(aggs)} aggregation(s): need one per task")
    return aggs


def _same_seeds(reps: Sequence[Replicates]) -> None:
    if len({r.n_seeds for r in reps}) > 1:
        raise ValueError(f"tasks have different seed counts {[r.n_seeds for r in reps]}")


def macro_interval(
    tasks: Sequence[ArrayLike],
    aggregation: str | Sequence[str] = "mean",
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """The mean of the task aggregates (one ``values`` array per task, equal seed counts;
    ``aggregation`` one name or one per task); each replicate resamples every task's items
    independently (task ``k`` on stream ``k``) and the seeds once for all tasks."""
    _check(n_boot, seed, level)
    aggs = _aggregations(aggregation, len(tasks))
    reps = [
        _replicates(_items(v, g), g, n_boot, seed, k)
        for k, (v, g) in enumerate(zip(tasks, aggs, strict=True))
    ]
    _same_seeds(reps)
    return mean_of(reps).interval(level)


def macro_paired(
    a_tasks: Sequence[ArrayLike],
    b_tasks: Sequence[ArrayLike],
    aggregation: str | Sequence[str] = "mean",
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
) -> Paired:
    """Macro average of A − macro average of B, task ``k`` of both sides resampled with the
    same item indices (and the seeds with the same draws); no McNemar p-value."""
    _check(n_boot, seed, level)
    if len(a_tasks) != len(b_tasks):
        raise ValueError(f"macro_paired: {len(a_tasks)} tasks for A but {len(b_tasks)} for B")
    aggs = _aggregations(aggregation, len(a_tasks))
    a_parts, b_parts = [], []
    for k, (x, y, agg) in enumerate(zip(a_tasks, b_tasks, aggs, strict=True)):
        xi, yi = _items(x, agg), _items(y, agg)
        if xi.shape != yi.shape:
            raise ValueError(f"macro_paired: task {k} has shapes {np.shape(x)} and {np.shape(y)}")
        n_seeds, n_items = xi.shape[:2]
        draws = _resample(np.concatenate([xi, yi]), agg, n_boot, seed, k)
        a_parts.append(resample_seeds(draws[:n_seeds], _per_seed(xi, agg), n_items, seed=seed))
        b_parts.append(resample_seeds(draws[n_seeds:], _per_seed(yi, agg), n_items, seed=seed))
    _same_seeds(a_parts)
    return _paired_result(difference(mean_of(a_parts), mean_of(b_parts)), level, None)


def verdict(diff: Interval, direction: int) -> str:
    """Whether an interval of A − B supports the claim "A > B" (``direction=+1``) or
    "A < B" (``-1``): ``"reproduced"`` when it lies strictly on the claimed side of 0,
    ``"not reproduced"`` when strictly on the other side, else ``"inconclusive"``."""
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 (A > B) or -1 (A < B), got {direction!r}")
    low, high = (diff.low, diff.high) if direction == 1 else (-diff.high, -diff.low)
    if low > 0:
        return "reproduced"
    if high < 0:
        return "not reproduced"
    return "inconclusive"
