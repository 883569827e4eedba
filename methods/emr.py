"""EMR-Merging (Huang et al. 2024, NeurIPS, arXiv 2405.17461): Elect, Mask, Rescale. One
unified task vector for all tasks plus, per task, a binary mask and a scalar rescaler; the
cell emits task k's model θ0 + λk · Mk ⊙ τ_uni (``method.task`` = k, as BoRA's per-task
adapters), so a sweep ``method.task=a,b,…`` scores each task on its own model.

- Elect: γ = sgn(Σk τk) per entry; ε = max over the experts whose τk has sign γ of |τk|;
  τ_uni = γ ⊙ ε.
- Mask: Mk = [τk ⊙ τ_uni > 0] (where task k agrees with the unified direction).
- Rescale: λk = Σ|τk| / Σ|Mk ⊙ τ_uni| over the whole model (every mergeable tensor), so
  task k's model has the absolute mass of its own task vector.

The paper is tuning-free: no option but the task. Choices it leaves open, decided here:
- The rescaler's sums run over every mergeable tensor (norms and biases too), in one
  statistics pass, accumulated in float64. The official code (and fusion-bench's port)
  sums each tensor's *mean* |·| instead, weighting a small tensor as much as a large one:
  ``rescale: official`` selects that; ``paper`` (the default) follows the formula.
- An entry with Σk τk = 0 has no elected sign: τ_uni = 0 there and no mask keeps it. The
  official code elects −1 there (``(sum > 0)·2 − 1``); for float task vectors an exact
  zero sum is rare, and with both conventions a zero τ_uni entry changes nothing unless
  some τk < 0 there — the only case where the two differ entry-wise.
- A task whose mask keeps nothing of τ_uni (all its entries disagree, or τk = 0) gets
  λk = 1 and emits the base; its report says so rather than dividing by zero.
- ``task: null`` emits the first expert's model (in pool order); the report names it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from core.options import check_choice
from methods.base import MergeMethod, stack

RESCALES = ("paper", "official")


def emr_unify(taus: Sequence[Tensor]) -> Tensor:
    """τ_uni = sgn(Σ τk) ⊙ (max |τk| over the experts that agree with that sign)."""
    t = stack(taus)
    sign = torch.sign(t.sum(dim=0))
    agree = t * sign > 0
    return sign * torch.where(agree, t.abs(), torch.zeros_like(t)).amax(dim=0)


def emr_masks(taus: Sequence[Tensor], unified: Tensor) -> list[Tensor]:
    """Mk = [τk ⊙ τ_uni > 0] for each task."""
    return [tau * unified > 0 for tau in taus]


def emr_model(base: Tensor, unified: Tensor, mask: Tensor, rescaler: float) -> Tensor:
    """Task k's model θ0 + λk · Mk ⊙ τ_uni."""
    return base + rescaler * (unified * mask)


class EMRMerging(MergeMethod):
    """Plugin: one statistics pass accumulates each task's rescaler, then the merge pass
    emits ``task``'s model. Options: ``task`` (expert name; null = the first expert),
    ``rescale`` (``paper``: Σ|·| over all entries; ``official``: Σ over tensors of mean|·|)."""

    name = "emr"
    stat_passes = 1

    def __init__(self, task: str | None = None, rescale: str = "paper") -> None:
        if task is not None and not isinstance(task, str):
            raise ValueError(f"method.task must be an expert's name or null, got {task!r}")
        self.task_option = task
        self.rescale = check_choice(rescale, "method.rescale", RESCALES)

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        if not self.expert_names:
            raise ValueError("EMR-Merging needs at least one expert")
        if self.task_option is not None and self.task_option not in self.expert_names:
            raise ValueError(
                f"method.task={self.task_option!r} is not an expert of this pool; choose one "
                f"of {self.expert_names}"
            )
        self.task = self.task_option or self.expert_names[0]
        self.mass = dict.fromkeys(self.expert_names, 0.0)  # Σ|τk|
        self.kept = dict.fromkeys(self.expert_names, 0.0)  # Σ|Mk ⊙ τ_uni|
        self.rescalers: dict[str, float] = {}

    def _total(self, t: Tensor) -> float:
        a = t.abs().double()
        return float(a.sum() if self.rescale == "paper" else a.mean())

    def observe(
        self, pass_idx: int, name: str, base: Tensor, experts: Mapping[str, Tensor]
    ) -> None:
        taus = [t - base for t in experts.values()]
        unified = emr_unify(taus)
        for e, tau, mask in zip(experts, taus, emr_masks(taus, unified), strict=True):
            self.mass[e] += self._total(tau)
            self.kept[e] += self._total(unified * mask)

    def end_pass(self, pass_idx: int) -> None:
        self.rescalers = {
            e: self.mass[e] / self.kept[e] if self.kept[e] > 0 else 1.0 for e in self.expert_names
        }

    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        taus = [t - base for t in experts.values()]
        unified = emr_unify(taus)
        mask = taus[list(experts).index(self.task)] * unified > 0
        return emr_model(base, unified, mask, self.rescalers[self.task])

    def report(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "rescale": self.rescale,
            "rescalers": self.rescalers,
            "emits_base": [e for e in self.expert_names if self.kept[e] == 0],
        }
