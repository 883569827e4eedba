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

from core.combine import SIGN_VOTES, WEIGHT_PRODUCTS, ZERO_SIGNS, sum_combine, ties_combine
from core.dropout import (
    DROP_RESCALES,
    MASK_RNGS,
    MergekitMaskStream,
    dare_keep_mask,
    dare_rescale,
    keep_masked,
    l1_rescale,
    mask_seed,
)
from core.layers import layer_group
from core.options import (
    check_bool,
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
    ExpertThresholds,
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
        """Count the non-zero entries of ``kept`` (a mask, or the surviving values); for
        values as Σ|sign(x)| in float64 (exact, and vectorised unlike ``count_nonzero``)."""
        if kept.is_floating_point():
            count = kept.sign().abs_().sum(dtype=torch.float64).to(torch.int64)
        else:
            count = torch.count_nonzero(kept)
        self._kept[expert] = self._kept[expert] + count
        self._numel[expert] += kept.numel()

    def fractions(self) -> dict[str, float | None]:
        return {
            n: (float(self._kept[n]) / self._numel[n]) if self._numel[n] else None
            for n in self.names
        }


class _Staged:
    """Shared hooks of transforms and coefficients: setup and optional statistics passes
    over the whole model (``stat_passes``) or over each tensor just before it is merged
    (``tensor_passes``: ``observe_tensor`` / ``end_tensor_pass``).

    ``chunked``: the piece works entry by entry, so it may be handed flat slices of a
    tensor (``methods.base.MergeMethod.chunked``); a piece that reduces over a whole
    tensor in ``apply`` (an L1 norm, a rank, a mask drawn for the whole tensor) is not."""

    stat_passes: int = 0
    tensor_passes: int = 0
    chunked: bool = False

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        self.expert_names = list(expert_names)
        self.seed = seed

    def observe(self, pass_idx: int, name: str, taus: Mapping[str, Tensor]) -> None:
        raise NotImplementedError(f"{type(self).__name__} declares no statistics passes")

    def end_pass(self, pass_idx: int) -> None:  # noqa: B027 (optional hook)
        """Finish statistics pass ``pass_idx``."""

    def observe_tensor(self, pass_idx: int, name: str, taus: Mapping[str, Tensor]) -> None:
        raise NotImplementedError(f"{type(self).__name__} declares no per-tensor passes")

    def end_tensor_pass(self, pass_idx: int, name: str) -> None:  # noqa: B027 (optional hook)
        """Finish per-tensor pass ``pass_idx`` of tensor ``name``."""

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

    chunked = True

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


TRIM_RESCALES = ("none", "l1")
TIE_BREAKS = ("keep_all", "argsort")


class MagnitudeTrim(CountingTransform):
    """TIES' trim: keep each τ_k's top ``density`` entries by magnitude (:mod:`core.trim`).

    ``trim_scope: global`` (TIES' Algorithm 1): one threshold per expert over its whole task
    vector, found exactly in two statistics passes (radix select); ``per_tensor``
    (mergekit's): per tensor by ``torch.kthvalue``, no pass. ``keep_count`` is the count
    rule of :func:`core.trim.count_to_keep`. Density 1 keeps everything (threshold 0).
    ``tie_break``: ``keep_all`` (default) keeps every entry tied with the k-th largest |τ|,
    so slightly more than k may survive; ``argsort`` keeps exactly the first k of
    ``torch.argsort(|τ|, descending=True)``, mergekit's ``magnitude`` (per tensor only; it
    differs only where |τ| has ties at the threshold, common for bf16 checkpoints).
    ``rescale``: ``none`` (TIES) or ``l1`` (survivors × ‖τ‖₁/‖τ̂‖₁ per tensor, mergekit's
    ``rescale: true``).
    ``report()``: ``kept_fraction`` (entries surviving with a non-zero value) and, when
    global, ``thresholds``.
    """

    def __init__(
        self,
        density: float = 0.2,
        trim_scope: str = "global",
        keep_count: str = "ceil",
        rescale: str = "none",
        tie_break: str = "keep_all",
        *,
        where: str = "method.transform",
    ) -> None:
        self.density = check_unit_interval(density, f"{where}.density", open_low=True)
        self.trim_scope = check_choice(trim_scope, f"{where}.trim_scope", TRIM_SCOPES)
        self.keep_count = check_choice(keep_count, f"{where}.keep_count", KEEP_COUNTS)
        self.rescale = check_choice(rescale, f"{where}.rescale", TRIM_RESCALES)
        self.tie_break = check_choice(tie_break, f"{where}.tie_break", TIE_BREAKS)
        if self.tie_break == "argsort" and self.trim_scope != "per_tensor":
            raise ValueError(
                f"{where}.tie_break=argsort keeps exactly k entries per tensor: it needs "
                f"{where}.trim_scope=per_tensor; the global trim keeps every tie "
                f"({where}.tie_break=keep_all)"
            )
        self.stat_passes = 2 if self.trim_scope == "global" and self.density < 1 else 0
        # Entry by entry once the threshold is known; a per-tensor threshold then comes
        # from two passes over the tensor's slices (the same radix select, exact, so the
        # same value kthvalue gives). Exactly-k tie breaks and L1 rescaling need the
        # whole tensor.
        self.chunked = self.tie_break == "keep_all" and (
            self.rescale == "none" or self.density == 1
        )
        per_tensor = self.trim_scope == "per_tensor" and self.density < 1
        self.tensor_passes = 2 if self.chunked and per_tensor else 0
        self.thresholds: dict[str, float] | None = None
        self._tensor: tuple[str, dict[str, float]] | None = None

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        self._select = ExpertThresholds(self.density, self.keep_count)
        self._tensor_select = ExpertThresholds(self.density, self.keep_count)
        self._tensor = None
        self.thresholds = None
        if self.trim_scope == "global" and self.stat_passes == 0:
            self.thresholds = dict.fromkeys(self.expert_names, 0.0)

    def observe(self, pass_idx: int, name: str, taus: Mapping[str, Tensor]) -> None:
        if pass_idx not in range(self.stat_passes):
            raise ValueError(f"the trim has {self.stat_passes} statistics passes, got {pass_idx}")
        self._select.observe(pass_idx, taus)

    def end_pass(self, pass_idx: int) -> None:
        thresholds = self._select.end_pass(pass_idx)
        if thresholds is not None:
            self.thresholds = thresholds

    def observe_tensor(self, pass_idx: int, name: str, taus: Mapping[str, Tensor]) -> None:
        """Per-tensor threshold of a sliced tensor, found as the global one is."""
        self._tensor_select.observe(pass_idx, taus)

    def end_tensor_pass(self, pass_idx: int, name: str) -> None:
        thresholds = self._tensor_select.end_pass(pass_idx)
        if thresholds is not None:
            self._tensor = (name, thresholds)
            self._tensor_select = ExpertThresholds(self.density, self.keep_count)

    def threshold(self, expert: str, tau: Tensor, name: str | None = None) -> float:
        """The trim threshold of ``expert``'s ``tau`` (this tensor's, or the global one);
        for tensor ``name`` found by its per-tensor passes, if it had them."""
        if self.trim_scope == "per_tensor":
            if self._tensor is not None and self._tensor[0] == name:
                return self._tensor[1][expert]
            return trim_threshold_per_tensor(tau, self.density, self.keep_count)
        if self.thresholds is None:
            raise RuntimeError("global trim: the 2 statistics passes have not run")
        return self.thresholds[expert]

    def one(self, name: str, expert: str, tau: Tensor) -> tuple[Tensor, Tensor]:
        if self.tie_break == "argsort" and self.density < 1:
            trimmed = top_k_by_argsort(
                tau, count_to_keep(self.density, tau.numel(), self.keep_count)
            )
        else:
            trimmed = trim_by_threshold(tau, self.threshold(expert, tau, name))
        if self.rescale == "l1" and self.density < 1:
            return l1_rescale(tau, trimmed), trimmed
        return trimmed, trimmed

    def report(self) -> dict[str, Any]:
        out = super().report()
        if self.thresholds is not None:
            out["thresholds"] = {n: float(v) for n, v in self.thresholds.items()}
        return out


def top_k_by_argsort(tau: Tensor, k: int) -> Tensor:
    """τ with all but exactly k entries zeroed: the first k of
    ``torch.argsort(|τ| as float32, descending=True)`` (mergekit 0.1.5's ``magnitude``)."""
    flat = tau.abs().reshape(-1).float()
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=tau.device)
    keep[torch.argsort(flat, descending=True)[:k]] = True
    return keep_masked(tau, keep.view_as(tau), l1=False)


class SeededDrop(CountingTransform):
    """A random drop (DARE, DELLA's MAGPRUNE) with a choice of masks: ``mask_rng:
    mergelab`` draws them in ``one`` from seeds per run seed, expert and tensor
    (:mod:`core.dropout`); ``mergekit`` replays mergekit's global-RNG stream
    (:class:`core.dropout.MergekitMaskStream`, one statistics pass recording every tensor's
    shape), drawing ``torch.bernoulli`` of :meth:`mergekit_keep_probabilities`. Subclasses
    call ``__init__`` after checking their own options and define those probabilities and
    :meth:`rescaled`."""

    what = "the drop"  # names the transform in errors

    def __init__(self, mask_rng: str, drops: bool, *, where: str) -> None:
        """``drops``: whether the options drop anything (no stream pass otherwise)."""
        self.mask_rng = check_choice(mask_rng, f"{where}.mask_rng", MASK_RNGS)
        self.stat_passes = 1 if self.mask_rng == "mergekit" and drops else 0
        self._stream = MergekitMaskStream()

    def mergekit_keep_probabilities(self, tau: Tensor) -> Tensor:
        """mergekit's keep-probabilities of ``tau``'s entries (float32, on CPU)."""
        raise NotImplementedError

    def rescaled(self, tau: Tensor, keep: Tensor, keep_prob: Tensor) -> Tensor:
        """τ with the dropped entries zeroed and the survivors rescaled; ``keep_prob``: the
        probabilities ``keep`` was drawn with."""
        raise NotImplementedError

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        self._stream.reset()

    def observe(self, pass_idx: int, name: str, taus: Mapping[str, Tensor]) -> None:
        if pass_idx not in range(self.stat_passes):
            raise ValueError(
                f"{self.what} has {self.stat_passes} statistics passes, got {pass_idx}"
            )
        shape = next(iter(taus.values())).shape
        self._stream.record(name, shape, len(taus))

    def end_pass(self, pass_idx: int) -> None:
        self._stream.finish(self.seed)

    def apply(self, name: str, taus: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.stat_passes == 0:
            return super().apply(name, taus)
        g = self._stream.generator(name)
        out = {}
        for expert, tau in taus.items():
            probs = self.mergekit_keep_probabilities(tau)
            keep = torch.bernoulli(probs, generator=g).bool().to(tau.device)
            out[expert] = self.rescaled(tau, keep, probs)
            self.kept.add(expert, keep)
        return out


class RandomDrop(SeededDrop):
    """DARE: drop each entry with probability ``drop_rate`` p (masks seeded per run seed,
    expert and tensor, :mod:`core.dropout`), rescale the survivors by 1/(1 − p)
    (``rescale: inverse_p``, the paper's), by the tensor's L1 ratio ‖τ‖₁/‖τ ⊙ m‖₁
    (``l1``, mergekit 0.1.5's ``rescale: true``) or not at all (``none``, its
    ``rescale: false``). ``mask_rng: mergekit`` draws the masks as mergekit does
    (``torch.bernoulli`` of the keep probability 1 − p, replayed from its global-RNG
    stream, :class:`SeededDrop`) at the cost of one statistics pass.
    ``report()``: ``kept_fraction`` of the masks."""

    def __init__(
        self,
        drop_rate: float = 0.5,
        rescale: str = "inverse_p",
        mask_rng: str = "mergelab",
        *,
        where: str = "method.transform",
    ) -> None:
        self.drop_rate = check_unit_interval(drop_rate, f"{where}.drop_rate", open_high=True)
        self.rescale = check_choice(rescale, f"{where}.rescale", DROP_RESCALES)
        super().__init__(mask_rng, self.drop_rate > 0, where=where)

    def mergekit_keep_probabilities(self, tau: Tensor) -> Tensor:
        return torch.full(tau.shape, 1.0 - self.drop_rate, dtype=torch.float32)

    def one(self, name: str, expert: str, tau: Tensor) -> tuple[Tensor, Tensor]:
        keep = dare_keep_mask(
            tau.shape, self.drop_rate, mask_seed(self.seed, expert, name), tau.device
        )
        return self.rescaled(tau, keep), keep

    def rescaled(self, tau: Tensor, keep: Tensor, keep_prob: Tensor | None = None) -> Tensor:
        """``keep_prob`` is 1 − p everywhere: unused."""
        if self.rescale == "inverse_p":
            return dare_rescale(tau, keep, self.drop_rate)
        return keep_masked(tau, keep, l1=self.rescale == "l1")


# -------------------------------------------------------------------------- combines


class Combine:
    """θ0 + λ · (combined processed task vectors). ``chunked``: entry by entry (see
    :class:`_Staged`)."""

    chunked: bool = False

    def setup(self, expert_names: Sequence[str], seed: int) -> None:  # noqa: B027
        """Called once with the pool's experts (a combine may refuse the pool)."""

    def report(self) -> dict[str, Any]:
        return {}

    def __call__(
        self, base: Tensor, vectors: Sequence[Tensor], scaling: float, weights: Sequence[float]
    ) -> Tensor:
        raise NotImplementedError


class Sum(Combine):
    """θ0 + λ Σ_k w_k v_k; ``normalize: true`` divides the sum by Σ_k w_k (mergekit's
    ``normalize``); ``weight_product: rounded`` rounds each w_k·v_k before the sum
    (mergekit's order) instead of a fused ``add_(v, alpha=w)`` (``fused``, default)."""

    chunked = True

    def __init__(
        self,
        normalize: bool = False,
        weight_product: str = "fused",
        *,
        where: str = "method.combine",
    ) -> None:
        self.normalize = check_bool(normalize, f"{where}.normalize")
        self.weight_product = check_choice(
            weight_product, f"{where}.weight_product", WEIGHT_PRODUCTS
        )

    def plain(self, weights: Sequence[float]) -> bool:
        """Whether this is Σ w_k v_k with fused products and no division (unit weights
        round alike fused or not: 1·v is v)."""
        unit = all(float(w) == 1.0 for w in weights)
        return not self.normalize and (self.weight_product == "fused" or unit)

    def __call__(
        self, base: Tensor, vectors: Sequence[Tensor], scaling: float, weights: Sequence[float]
    ) -> Tensor:
        return sum_combine(
            base,
            vectors,
            scaling,
            weights,
            normalize=self.normalize,
            premultiply=self.weight_product == "rounded",
        )


class DisjointMean(Combine):
    """TIES' sign election and disjoint mean, θ0 + λ · Σ w_k v_k m_k / Σ w_k m_k; the vote
    is sign(Σ v_k) (``sign_vote: unweighted``, Algorithm 1) or sign(Σ w_k v_k)
    (``weighted``, mergekit's). mergekit's other conventions, each an option
    (:mod:`core.combine`): ``normalize: false`` (the sum of the agreeing entries, mergekit's
    ``dare_ties`` / ``breadcrumbs_ties`` default), ``weight_product: rounded`` and
    ``zero_sign: positive`` (γ = +1 where the vote's sum is exactly 0)."""

    chunked = True

    def __init__(
        self,
        sign_vote: str = "unweighted",
        normalize: bool = True,
        weight_product: str = "fused",
        zero_sign: str = "zero",
        *,
        where: str = "method.combine",
    ) -> None:
        vote = check_choice(sign_vote, f"{where}.sign_vote", SIGN_VOTES)
        self.weighted_vote = vote == "weighted"
        self.normalize = check_bool(normalize, f"{where}.normalize")
        self.weight_product = check_choice(
            weight_product, f"{where}.weight_product", WEIGHT_PRODUCTS
        )
        self.zero_sign = check_choice(zero_sign, f"{where}.zero_sign", ZERO_SIGNS)

    def __call__(
        self, base: Tensor, vectors: Sequence[Tensor], scaling: float, weights: Sequence[float]
    ) -> Tensor:
        return ties_combine(
            base,
            vectors,
            scaling,
            weights,
            self.weighted_vote,
            normalize=self.normalize,
            premultiply=self.weight_product == "rounded",
            zero_sign=self.zero_sign,
        )


def election_combine(
    sign_election: bool,
    normalize: bool | None,
    weight_product: str = "fused",
    sign_vote: str = "unweighted",
    zero_sign: str = "zero",
    *,
    where: str = "method",
) -> Combine:
    """TIES' disjoint mean (``sign_election``) or the sum, with mergekit's options, for a
    method offering both (Breadcrumbs, DELLA). ``normalize`` null is the method's own
    (true with the election, false without); ``sign_vote`` and ``zero_sign`` other than
    their defaults are refused without an election (they would change nothing)."""
    if sign_election:
        norm = True if normalize is None else normalize
        return DisjointMean(sign_vote, norm, weight_product, zero_sign, where=where)
    for option, value, default in (
        ("sign_vote", sign_vote, "unweighted"),
        ("zero_sign", zero_sign, "zero"),
    ):
        if value != default:
            raise ValueError(
                f"{where}.{option}={value!r} applies only to the sign election: set "
                f"{where}.sign_election=true or drop the option"
            )
    return Sum(False if normalize is None else normalize, weight_product, where=where)


# ---------------------------------------------------------------------- coefficients


class Coefficients(_Staged):
    """λ (``scaling``) and the per-expert weights of each tensor."""

    scaling: float = 1.0

    def weights(self, name: str, experts: Sequence[str]) -> list[float]:
        raise NotImplementedError


class Fixed(Coefficients):
    """Configured λ and weights (null: 1.0 each; a list in pool order; a mapping by name).
    ``report()``: ``weights`` by expert."""

    chunked = True

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

    chunked = True

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
        self.tensor_count = max((p.tensor_passes for p in pieces), default=0)

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

    def observe_tensor(self, pass_idx: int, name: str, taus: Mapping[str, Tensor]) -> None:
        for piece in self.pieces:
            if pass_idx < piece.tensor_passes:
                piece.observe_tensor(pass_idx, name, taus)

    def end_tensor_pass(self, pass_idx: int, name: str) -> None:
        for piece in self.pieces:
            if pass_idx < piece.tensor_passes:
                piece.end_tensor_pass(pass_idx, name)
