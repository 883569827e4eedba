"""MetaGPT (Zhou et al. 2024, "Model Exclusive Task Arithmetic"): data-free closed form.

With τ_k = θ_k − θ0 and n_k = ‖τ_k‖² over each expert's **whole** task vector (every
mergeable tensor, accumulated in float64 during one statistics pass):

    λ_k = n_k / Σ_j n_j,        θ = θ0 + Σ_k λ_k τ_k.

λ_k ≥ 0 and Σ λ_k = 1, so with equal norms this is weight averaging of the experts. The
λ minimise the paper's upper bound on the average loss difference (local linearity and
orthogonal task vectors), :func:`metagpt_bound`:

    B(λ) = Σ_t n_t · [ Σ_{k≠t} λ_k² n_k + (1 − λ_t)² n_t ].

(∂B/∂λ_j = 2 n_j (λ_j Σ_t n_t − n_j), so the unconstrained minimiser is already the
closed form and lies on the simplex.) If every task vector is zero the λ are undefined;
we use 1/K each (the merge is θ0 either way).

``base_method`` combines MetaGPT with an interference-reduction step, as the paper's
"MetaGPT + TIES / DARE" rows do. In both variants λ comes from the **raw** task vectors'
norms (the quantity the bound is about), never from the trimmed / dropped ones:

- ``none``: θ0 + Σ λ_k τ_k.
- ``ties``: TIES-Merging (:mod:`methods.ties`) with the λ as its per-model weights:
  trim each τ_k to its top ``density`` (``trim_scope`` global over the whole task vector,
  default, or per tensor), elect signs by the *unweighted* sum as in the paper, then the
  λ-weighted disjoint mean Σ_k λ_k τ̂_k m_k / Σ_k λ_k m_k, and θ = θ0 + merged (scaling 1).
  Where every expert agrees this is exactly θ0 + Σ λ_k τ̂_k; where only some agree, their λ
  are renormalised among them, so the weights keep summing to 1 entry by entry (the TIES
  disjoint mean with MetaGPT's weights, as mergekit's ``ties`` with ``weights = λ`` and
  ``normalize: true`` would do, except that our vote is unweighted).
- ``dare``: DARE drop-and-rescale of each τ_k (``drop_rate`` p, masks seeded from (run
  seed, expert, tensor) exactly as :mod:`methods.dare`), then θ0 + Σ λ_k τ̃_k.

Statistics passes: pass 0 accumulates the squared norms. For ``ties`` with global trimming
(and density < 1) TIES' two radix-select passes are needed too; the first of them (the
high-16-bit histogram) reads the same tensors as the norm pass, so it runs *in* pass 0
and the low-bit pass is pass 1: 2 passes in all rather than 3 (one fewer read of every
checkpoint). The thresholds are identical to :class:`methods.ties.TIES`'s.

Defaults ``density = 0.55`` / ``drop_rate = 0.45`` are the paper's setting (its TIES and
DARE baselines use density 0.55).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from core.options import check_choice, check_unit_interval
from methods.base import MergeMethod, task_vectors
from methods.dare import dare_keep_mask, dare_linear_merge, mask_seed
from methods.ties import (
    TRIM_SCOPES,
    RadixSelect,
    count_to_keep,
    ties_combine,
    trim_by_threshold,
    trim_threshold_per_tensor,
)

BASE_METHODS = ("none", "ties", "dare")


def metagpt_coefficients(sq_norms: Sequence[float]) -> list[float]:
    """λ_k = n_k / Σ_j n_j from per-expert squared task-vector norms (1/K each if all 0)."""
    ns = [float(n) for n in sq_norms]
    if not ns:
        raise ValueError("metagpt_coefficients needs at least one expert")
    if any(n < 0 or n != n for n in ns):
        raise ValueError(f"squared norms must be >= 0, got {ns}")
    total = sum(ns)
    if total == 0:
        return [1.0 / len(ns)] * len(ns)
    return [n / total for n in ns]


def metagpt_bound(lambdas: Sequence[float] | Tensor, sq_norms: Sequence[float] | Tensor):
    """The paper's upper bound Σ_t n_t [Σ_{k≠t} λ_k² n_k + (1 − λ_t)² n_t].

    Works on floats (returns a float) or on tensors (returns a 0-d tensor, differentiable
    in ``lambdas``).
    """
    as_tensor = isinstance(lambdas, Tensor) or isinstance(sq_norms, Tensor)
    lam = torch.as_tensor(lambdas, dtype=torch.float64)
    n = torch.as_tensor(sq_norms, dtype=torch.float64, device=lam.device)
    if lam.shape != n.shape or lam.ndim != 1:
        raise ValueError(f"lambdas {tuple(lam.shape)} and sq_norms {tuple(n.shape)} differ")
    weighted = lam.square() * n  # λ_k² n_k
    # inner_t = Σ_k λ_k² n_k − λ_t² n_t + (1 − λ_t)² n_t
    inner = weighted.sum() - weighted + (1 - lam).square() * n
    out = (n * inner).sum()
    return out if as_tensor else float(out)


def metagpt_merge(base: Tensor, experts: Sequence[Tensor], lambdas: Sequence[float]) -> Tensor:
    """θ0 + Σ_k λ_k τ_k on one tensor."""
    experts = list(experts)
    if len(lambdas) != len(experts):
        raise ValueError(f"got {len(lambdas)} coefficients for {len(experts)} experts")
    acc = torch.zeros_like(base)
    for lam, t in zip(lambdas, experts, strict=True):
        acc.add_(t - base, alpha=float(lam))
    return base + acc


class MetaGPT(MergeMethod):
    """MetaGPT plugin (see the module docstring for the math and the variants).

    Options: ``base_method`` (``none`` default, ``ties``, ``dare``); ``density`` (TIES
    fraction kept, (0, 1], default 0.55) and ``trim_scope`` (``global`` default or
    ``per_tensor``), used by ``ties``; ``drop_rate`` (DARE p ∈ [0, 1), default 0.45), used
    by ``dare``. Options of the other variant are validated but unused.

    ``report()``: ``coefficients`` {expert: λ}, ``sq_norms`` {expert: ‖τ‖²},
    ``base_method``, and for ``ties`` with global trimming the per-expert ``thresholds``.
    """

    name = "metagpt"

    def __init__(
        self,
        base_method: str | None = "none",
        density: float = 0.55,
        trim_scope: str = "global",
        drop_rate: float = 0.45,
    ) -> None:
        base_method = "none" if base_method is None else base_method  # YAML null
        self.base_method = check_choice(base_method, "method.base_method", BASE_METHODS)
        self.density = check_unit_interval(density, "method.density", open_low=True)
        self.trim_scope = check_choice(trim_scope, "method.trim_scope", TRIM_SCOPES)
        self.drop_rate = check_unit_interval(drop_rate, "method.drop_rate", open_high=True)
        self._global_trim = (
            self.base_method == "ties" and self.trim_scope == "global" and self.density < 1
        )
        self.stat_passes = 2 if self._global_trim else 1
        self.expert_names: list[str] = []
        self._sq: dict[str, Tensor] = {}
        self._select: dict[str, RadixSelect] = {}
        self.sq_norms: dict[str, float] | None = None
        self.coefficients: dict[str, float] | None = None
        self.thresholds: dict[str, float] | None = None

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        self._sq = {}
        self._select = {n: RadixSelect() for n in self.expert_names} if self._global_trim else {}
        self.sq_norms = self.coefficients = self.thresholds = None
        if self.base_method == "ties" and self.trim_scope == "global" and not self._global_trim:
            self.thresholds = dict.fromkeys(self.expert_names, 0.0)  # density 1: keep all

    def observe(
        self, pass_idx: int, name: str, base: Tensor, experts: Mapping[str, Tensor]
    ) -> None:
        if pass_idx not in range(self.stat_passes):
            raise ValueError(
                f"MetaGPT has {self.stat_passes} statistics passes, got pass {pass_idx}"
            )
        for expert, t in experts.items():
            tau = t - base
            if pass_idx == 0:
                sq = tau.double().square().sum()
                self._sq[expert] = sq if expert not in self._sq else self._sq[expert] + sq
                if self._global_trim:
                    self._select[expert].add_high(tau)
            else:
                self._select[expert].add_low(tau)

    def end_pass(self, pass_idx: int) -> None:
        if pass_idx == 0:
            self.sq_norms = {n: float(self._sq.get(n, 0.0)) for n in self.expert_names}
            lambdas = metagpt_coefficients(list(self.sq_norms.values()))
            self.coefficients = dict(zip(self.expert_names, lambdas, strict=True))
            self._sq = {}
            for sel in self._select.values():
                sel.find_bucket(count_to_keep(self.density, sel.n))
        elif pass_idx == 1:
            self.thresholds = {n: sel.value() for n, sel in self._select.items()}
            self._select = {}

    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        if self.coefficients is None:
            raise RuntimeError("MetaGPT: the norm statistics pass has not run")
        lambdas = [self.coefficients[n] for n in experts]
        if self.base_method == "none":
            return metagpt_merge(base, list(experts.values()), lambdas)
        if self.base_method == "dare":
            masks = [
                dare_keep_mask(
                    base.shape, self.drop_rate, mask_seed(self.seed, e, name), base.device
                )
                for e in experts
            ]
            return dare_linear_merge(
                base, list(experts.values()), masks, self.drop_rate, 1.0, lambdas
            )
        taus = task_vectors(base, experts)
        if self.trim_scope == "per_tensor":
            thresholds = [trim_threshold_per_tensor(t, self.density) for t in taus]
        else:
            if self.thresholds is None:
                raise RuntimeError("MetaGPT + TIES: the trim statistics passes have not run")
            thresholds = [self.thresholds[n] for n in experts]
        trimmed = [trim_by_threshold(t, th) for t, th in zip(taus, thresholds, strict=True)]
        return ties_combine(base, trimmed, 1.0, lambdas)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "base_method": self.base_method,
            "coefficients": self.coefficients,
            "sq_norms": self.sq_norms,
        }
        if self.base_method == "ties":
            out["density"] = self.density
            out["trim_scope"] = self.trim_scope
            if self.thresholds is not None:
                out["thresholds"] = {n: float(v) for n, v in self.thresholds.items()}
        if self.base_method == "dare":
            out["drop_rate"] = self.drop_rate
        return out
