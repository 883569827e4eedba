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

The plugin is a :class:`methods.task_vector.TaskVectorMerge` of the shared pieces
(:class:`core.pieces.Identity` / ``MagnitudeTrim`` / ``RandomDrop``, ``Sum`` /
``DisjointMean``) with :class:`MetaGPTCoefficients`, which any composition may use
(``method=task_vector method/coefficients=metagpt``).

Statistics passes: the coefficients' one pass accumulates the squared norms. For ``ties``
with global trimming (and density < 1) TIES' two radix-select passes are needed too; the
pieces' passes run side by side, so the norms share the trim's first read: 2 passes in
all rather than 3. The thresholds are identical to :class:`methods.ties.TIES`'s.

Defaults ``density = 0.55`` / ``drop_rate = 0.45`` are the paper's setting (its TIES and
DARE baselines use density 0.55).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from core.combine import weighted_task_sum
from core.options import check_choice
from core.pieces import (
    Coefficients,
    DisjointMean,
    Identity,
    MagnitudeTrim,
    RandomDrop,
    Sum,
    Transform,
)
from methods.task_vector import TaskVectorMerge

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
    return base + weighted_task_sum(base, experts, lambdas)


class MetaGPTCoefficients(Coefficients):
    """MetaGPT's λ_k = n_k / Σ_j n_j as a coefficients piece (λ = 1): one statistics pass
    accumulates each expert's ‖τ_k‖² over every mergeable tensor in float64, from the raw
    task vectors. ``report()``: ``coefficients`` and ``sq_norms`` by expert."""

    stat_passes = 1

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        self._sq: dict[str, Tensor] = {}
        self.sq_norms: dict[str, float] | None = None
        self.coefficients: dict[str, float] | None = None

    def observe(self, pass_idx: int, name: str, taus: Mapping[str, Tensor]) -> None:
        for expert, tau in taus.items():
            sq = tau.double().square().sum()
            self._sq[expert] = sq if expert not in self._sq else self._sq[expert] + sq

    def end_pass(self, pass_idx: int) -> None:
        self.sq_norms = {n: float(self._sq.get(n, 0.0)) for n in self.expert_names}
        lambdas = metagpt_coefficients(list(self.sq_norms.values()))
        self.coefficients = dict(zip(self.expert_names, lambdas, strict=True))
        self._sq = {}

    def weights(self, name: str, experts: Sequence[str]) -> list[float]:
        if self.coefficients is None:
            raise RuntimeError("MetaGPT: the norm statistics pass has not run")
        return [self.coefficients[n] for n in experts]

    def report(self) -> dict[str, Any]:
        return {"coefficients": self.coefficients, "sq_norms": self.sq_norms}


class MetaGPT(TaskVectorMerge):
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
        trim = MagnitudeTrim(density, trim_scope, where="method")  # validated in every variant
        drop = RandomDrop(drop_rate, where="method")
        transform: Transform = {"none": Identity(), "ties": trim, "dare": drop}[base_method]
        combine = DisjointMean(where="method") if base_method == "ties" else Sum()
        super().__init__(transform, combine, MetaGPTCoefficients())
        self.density, self.trim_scope, self.drop_rate = (
            trim.density,
            trim.trim_scope,
            drop.drop_rate,
        )

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"base_method": self.base_method, **self.coefficients.report()}
        if self.base_method == "ties":
            out.update(density=self.density, trim_scope=self.trim_scope)
        if self.base_method == "dare":
            out["drop_rate"] = self.drop_rate
        return {**out, **self.transform.report()}  # Identity reports nothing
