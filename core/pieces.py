"""The pieces data-free task-vector merges are built from, and how they are driven.

A task-vector merge of one tensor is

    θ = θ0 + λ · combine({transform(τ_k)}, {w_k}),      τ_k = θ_k − θ0,

with three independent pieces:

- a :class:`Transform` acting on each expert's τ (:class:`Identity`, :class:`MagnitudeTrim`
  (TIES' trim, global or per tensor), :class:`RandomDrop` (DARE); methods add their own:
  Breadcrumbs' two-sided mask, DELLA's rank-based drop);
- a :class:`Combine` of the processed vectors (:class:`Sum`, :class:`DisjointMean` after
  sign election, from :mod:`core.combine`);
- :class:`Coefficients` giving λ and the per-expert weights w_k (:class:`Fixed`,
  :class:`LearnedCoefficients` read from an AdaMerging / Sens-Merging / MetaGPT cell;
  methods add theirs, e.g. MetaGPT's closed form).

Transforms and coefficients may need whole-model statistics first (a global trim
threshold, squared norms). Each declares ``stat_passes`` and gets ``observe(i, name,
taus)`` / ``end_pass(i)``; :class:`Passes` runs pass i of every piece that has one in the
same read of the checkpoints, so a merge needs max(passes) reads, not their sum (MetaGPT +
TIES: the norm pass shares the trim's first pass). Pieces see only task vectors, never
the method that holds them, so a Hydra config can combine any of them
(``conf/method/task_vector.yaml``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from core.combine import SIGN_VOTES, sum_combine, ties_combine
from core.dropout import DROP_RESCALES, dare_keep_mask, dare_rescale, l1_rescale, mask_seed
from core.layers import layer_group
from core.options import (
    check_choice,
    check_finite,
    check_unit_interval,
    check_weights_option,
    resolve_weights,
)
from core.reports import read_method_report
from core.trim import (
    KEEP_COUNTS,
    TRIM_SCOPES,
    RadixSelect,
    count_to_keep,
    trim_by_threshold,
    trim_threshold_per_tensor,
)


class KeptCounter:
    """Fraction of entries a transform kept, per expert, over every merged tensor."""

    def __init__(self, expert_names: Sequence[str] = ()) -> None:
        self.names = list(expert_names)
        self._kept: dict[str, Tensor | int] = dict.fromkeys(self.names, 0)
        self._numel: dict[str, int] = dict.fromkeys(self.names, 0)

    def add(self, expert: str, kept: Tensor) -> None:
        """Count the non-zero entries of ``kept`` (a mask, or the surviving values)."""
        self._kept[expert] = self._kept[expert] + torch.count_nonzero(kept)
        self._numel[expert] += kept.numel()

    def fractions(self) -> dict[str, float | None]:
        return {
            n: (float(self._kept[n]) / self._numel[n]) if self._numel[n] else None
            for n in self.names
        }


class _Staged:
    """Shared hooks of transforms and coefficients: setup and optional statistics passes."""

    stat_passes: int = 0

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        self.expert_names = list(expert_names)
        self.seed = seed

    def observe(self, pass_idx: int, name: str, taus: Mapping[str, Tensor]) -> None:
        raise NotImplementedError(f"{type(self).__name__} declares no statistics passes")

    def end_pass(self, pass_idx: int) -> None:  # noqa: B027 (optional hook)
        """Finish statistics pass ``pass_idx``."""

    def report(self) -> dict[str, Any]:
        return {}


# ------------------------------------------------------------------------ transforms


class Transform(_Staged):
    """Per-entry transform of each expert's task vector."""

    def apply(self, name: str, taus: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The processed vector of each expert for tensor ``name``, in ``taus``' order."""
        raise NotImplementedError


class Identity(Transform):
    """v_k = τ_k."""

    def apply(self, name: str, taus: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return dict(taus)


class CountingTransform(Transform):
    """A transform applied expert by expert, counting the entries it keeps.
    ``report()``: ``kept_fraction`` per expert."""

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        self.kept = KeptCounter(self.expert_names)

    def one(self, name: str, expert: str, tau: Tensor) -> tuple[Tensor, Tensor]:
        """(processed τ, what counts as kept: a mask or the surviving values)."""
        raise NotImplementedError

    def apply(self, name: str, taus: Mapping[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for expert, tau in taus.items():
            out[expert], kept = self.one(name, expert, tau)
            self.kept.add(expert, kept)
        return out

    def report(self) -> dict[str, Any]:
        kept = getattr(self, "kept", None)  # None before setup
        return {"kept_fraction": kept.fractions() if kept is not None else {}}


class MagnitudeTrim(CountingTransform):
    """TIES' trim: keep each τ_k's top ``density`` entries by magnitude (:mod:`core.trim`).

    ``trim_scope: global`` (TIES' Algorithm 1): one threshold per expert over its whole task
    vector, found exactly in two statistics passes (radix select); ``per_tensor``
    (mergekit's): per tensor by ``torch.kthvalue``, no pass. ``keep_count`` is the count
    rule of :func:`core.trim.count_to_keep`. Density 1 keeps everything (threshold 0).
    ``report()``: ``kept_fraction`` (entries surviving with a non-zero value) and, when
    global, ``thresholds``.
    """

    def __init__(
        self,
        density: float = 0.2,
        trim_scope: str = "global",
        keep_count: str = "ceil",
        *,
        where: str = "method.transform",
    ) -> None:
        self.density = check_unit_interval(density, f"{where}.density", open_low=True)
        self.trim_scope = check_choice(trim_scope, f"{where}.trim_scope", TRIM_SCOPES)
        self.keep_count = check_choice(keep_count, f"{where}.keep_count", KEEP_COUNTS)
        self.stat_passes = 2 if self.trim_scope == "global" and self.density < 1 else 0
        self.thresholds: dict[str, float] | None = None

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        self._select = {n: RadixSelect() for n in self.expert_names}
        self.thresholds = None
        if self.trim_scope == "global" and self.stat_passes == 0:
            self.thresholds = dict.fromkeys(self.expert_names, 0.0)

    def observe(self, pass_idx: int, name: str, taus: Mapping[str, Tensor]) -> None:
        if pass_idx not in range(self.stat_passes):
            raise ValueError(f"the trim has {self.stat_passes} statistics passes, got {pass_idx}")
        for expert, tau in taus.items():
            if pass_idx == 0:
                self._select[expert].add_high(tau)
            else:
                self._select[expert].add_low(tau)

    def end_pass(self, pass_idx: int) -> None:
        if pass_idx == 0:
            for sel in self._select.values():
                sel.find_bucket(count_to_keep(self.density, sel.n, self.keep_count))
        elif pass_idx == 1:
            self.thresholds = {n: sel.value() for n, sel in self._select.items()}
            self._select = {}

    def threshold(self, expert: str, tau: Tensor) -> float:
        """The trim threshold of ``expert``'s ``tau`` (this tensor's, or the global one)."""
        if self.trim_scope == "per_tensor":
            return trim_threshold_per_tensor(tau, self.density, self.keep_count)
        if self.thresholds is None:
            raise RuntimeError("global trim: the 2 statistics passes have not run")
        return self.thresholds[expert]

    def one(self, name: str, expert: str, tau: Tensor) -> tuple[Tensor, Tensor]:
        trimmed = trim_by_threshold(tau, self.threshold(expert, tau))
        return trimmed, trimmed

    def report(self) -> dict[str, Any]:
        out = super().report()
        if self.thresholds is not None:
            out["thresholds"] = {n: float(v) for n, v in self.thresholds.items()}
        return out


class RandomDrop(CountingTransform):
    """DARE: drop each entry with probability ``drop_rate`` p (masks seeded per run seed,
    expert and tensor, :mod:`core.dropout`), rescale the survivors by 1/(1 − p)
    (``rescale: inverse_p``, the paper's) or by the tensor's L1 ratio ‖τ‖₁/‖τ ⊙ m‖₁
    (``l1``, mergekit 0.1.5's). ``report()``: ``kept_fraction`` of the masks."""

    def __init__(
        self, drop_rate: float = 0.5, rescale: str = "inverse_p", *, where: str = "method.transform"
    ) -> None:
        self.drop_rate = check_unit_interval(drop_rate, f"{where}.drop_rate", open_high=True)
        self.rescale = check_choice(rescale, f"{where}.rescale", DROP_RESCALES)

    def one(self, name: str, expert: str, tau: Tensor) -> tuple[Tensor, Tensor]:
        keep = dare_keep_mask(
            tau.shape, self.drop_rate, mask_seed(self.seed, expert, name), tau.device
        )
        if self.rescale == "inverse_p":
            return dare_rescale(tau, keep, self.drop_rate), keep
        return l1_rescale(tau, torch.where(keep, tau, torch.zeros_like(tau))), keep


# -------------------------------------------------------------------------- combines


class Combine:
    """θ0 + λ · (combined processed task vectors)."""

    def setup(self, expert_names: Sequence[str], seed: int) -> None:  # noqa: B027
        """Called once with the pool's experts (a combine may refuse the pool)."""

    def report(self) -> dict[str, Any]:
        return {}

    def __call__(
        self, base: Tensor, vectors: Sequence[Tensor], scaling: float, weights: Sequence[float]
    ) -> Tensor:
        raise NotImplementedError


class Sum(Combine):
    """θ0 + λ Σ_k w_k v_k."""

    def __call__(
        self, base: Tensor, vectors: Sequence[Tensor], scaling: float, weights: Sequence[float]
    ) -> Tensor:
        return sum_combine(base, vectors, scaling, weights)


class DisjointMean(Combine):
    """TIES' sign election and disjoint mean, θ0 + λ · Σ w_k v_k m_k / Σ w_k m_k; the vote
    is sign(Σ v_k) (``sign_vote: unweighted``, Algorithm 1) or sign(Σ w_k v_k)
    (``weighted``, mergekit's)."""

    def __init__(self, sign_vote: str = "unweighted", *, where: str = "method.combine") -> None:
        vote = check_choice(sign_vote, f"{where}.sign_vote", SIGN_VOTES)
        self.weighted_vote = vote == "weighted"

    def __call__(
        self, base: Tensor, vectors: Sequence[Tensor], scaling: float, weights: Sequence[float]
    ) -> Tensor:
        return ties_combine(base, vectors, scaling, weights, self.weighted_vote)


# ---------------------------------------------------------------------- coefficients


class Coefficients(_Staged):
    """λ (``scaling``) and the per-expert weights of each tensor."""

    scaling: float = 1.0

    def weights(self, name: str, experts: Sequence[str]) -> list[float]:
        raise NotImplementedError


class Fixed(Coefficients):
    """Configured λ and weights (null: 1.0 each; a list in pool order; a mapping by name).
    ``report()``: ``weights`` by expert."""

    def __init__(
        self,
        scaling: float = 1.0,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        *,
        where: str = "method.coefficients",
    ) -> None:
        self.scaling = check_finite(scaling, f"{where}.scaling")
        self.weights_option = check_weights_option(weights, f"{where}.weights")
        self.where = where
        self.weight_of: dict[str, float] = {}

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        values = resolve_weights(self.weights_option, self.expert_names, f"{self.where}.weights")
        self.weight_of = dict(zip(self.expert_names, values, strict=True))

    def weights(self, name: str, experts: Sequence[str]) -> list[float]:
        return [self.weight_of[n] for n in experts]

    def report(self) -> dict[str, Any]:
        return {"weights": dict(self.weight_of)}


class LearnedCoefficients(Coefficients):
    """Weights learned by an earlier cell, read from its ``result.json`` (or a bare report
    JSON) at ``path``, with λ = ``scaling``:

    - ``coefficients`` {expert: w} (AdaMerging task-wise, MetaGPT) for every tensor, or
      {tensor: {expert: w}} (AdaMerging layer-wise) per tensor;
    - ``scale`` {layer group: {expert: K·σ}} (Sens-Merging) per tensor by its layer group
      (:func:`core.layers.layer_group`).

    The weights enter the combine (θ0 + λ Σ w_k v_k for ``sum``). With the ``none``
    transform, ``sum`` and λ = 1 that is plain AdaMerging's merge up to float rounding (it
    sums with one ``tensordot``), and with λ = the base's λ (0.3 for ``sens_ta``) it is
    Sens-Merging + task arithmetic's. Anything else is a new composition, used as given:
    weights learned on AdaMerging++'s trimmed vectors, or Sens-Merging's scales (applied
    there *before* its base method trims), are not checked against the transform here.
    The file is read once, when the method is built; only its path is in the cell id, so
    ``report()`` records its ``weights_sha256`` (of the file) with ``weights_from``,
    ``weights_kind`` and the source cell's method name.
    """

    def __init__(
        self, path: str, scaling: float = 1.0, *, where: str = "method.coefficients"
    ) -> None:
        self.path = str(path)
        self.scaling = check_finite(scaling, f"{where}.scaling")
        self.where = f"{where}.path"
        where = f"{self.where} {self.path!r}"
        report, self.source, self.file_sha256 = read_method_report(self.path, self.where)
        if report is None:
            raise ValueError(f"{where} holds no method report")
        coefs, scale = report.get("coefficients"), report.get("scale")
        if isinstance(coefs, Mapping) and coefs:
            nested = all(isinstance(v, Mapping) for v in coefs.values())
            self.kind = "per_tensor" if nested else "per_expert"
            self.table = coefs
        elif isinstance(scale, Mapping) and scale:
            self.kind, self.table = "per_layer_group", scale
        else:
            raise ValueError(
                f"{where} holds neither 'coefficients' (AdaMerging, MetaGPT) nor 'scale' "
                "(Sens-Merging) in its method report; give the result.json of such a cell"
            )

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        rows = [self.table] if self.kind == "per_expert" else list(self.table.values())
        missing = sorted({e for row in rows for e in self.expert_names if e not in row})
        if missing:
            raise ValueError(
                f"{self.where} {self.path!r} has no weight for experts {missing}; "
                "it was learned for another pool"
            )

    def weights(self, name: str, experts: Sequence[str]) -> list[float]:
        if self.kind == "per_expert":
            row = self.table
        else:
            key = name if self.kind == "per_tensor" else layer_group(name)
            if key not in self.table:
                raise ValueError(
                    f"{self.where} {self.path!r} has no weights for tensor "
                    f"{name!r} ({self.kind}, key {key!r})"
                )
            row = self.table[key]
        return [float(row[e]) for e in experts]

    def report(self) -> dict[str, Any]:
        return {
            "weights_from": self.path,
            "weights_sha256": self.file_sha256,
            "weights_kind": self.kind,
            "weights_source": self.source,
        }


# ---------------------------------------------------------------------------- passes


class Passes:
    """Run the statistics passes of several pieces side by side: pass i of every piece
    with more than i passes shares one read of the checkpoints."""

    def __init__(self, *pieces: _Staged) -> None:
        self.pieces = pieces
        self.count = max((p.stat_passes for p in pieces), default=0)

    def observe(self, pass_idx: int, name: str, taus: Mapping[str, Tensor]) -> None:
        if pass_idx not in range(self.count):
            raise ValueError(f"{self.count} statistics passes are declared, got pass {pass_idx}")
        for piece in self.pieces:
            if pass_idx < piece.stat_passes:
                piece.observe(pass_idx, name, taus)

    def end_pass(self, pass_idx: int) -> None:
        for piece in self.pieces:
            if pass_idx < piece.stat_passes:
                piece.end_pass(pass_idx)
