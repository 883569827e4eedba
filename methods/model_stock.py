"""Model Stock (Jang et al. 2024, arXiv 2403.19522): interpolate the experts' average
toward the base by a ratio set by the angle between their task vectors, per tensor.

θ = t·mean_k(θk) + (1−t)·θ0 with t = k·cosΘ / (1 + (k−1)·cosΘ), k the number of experts.

Choices the paper leaves open, decided here:
- The paper derives t for an angle Θ it assumes equal between every pair of fine-tuned
  task vectors. With k ≥ 2 experts, cosΘ is the mean over pairs of each pair's cosine
  (flattened tensor; mergekit's ``model_stock`` convention), each cosine with its norm
  product clamped at 1e-6 and the cosine clamped to [−1, 1].
- t is not clamped: a negative mean cosine gives t < 0 (a step away from the experts),
  which is what the formula says; the report keeps the range of t over tensors.
- One angle per state-dict tensor (the paper's "per layer"), never a whole-model angle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from methods.base import MergeMethod


def model_stock_ratio(taus: Sequence[Tensor]) -> float:
    """t = k·cosΘ / (1 + (k−1)·cosΘ), cosΘ the mean pairwise cosine of the task vectors."""
    flat = [t.flatten() for t in taus]
    k = len(flat)
    if k < 2:
        raise ValueError(f"Model Stock needs at least two experts, got {k}")
    cos = []
    for i in range(k):
        for j in range(i + 1, k):
            norms = (flat[i].norm() * flat[j].norm()).clamp(min=1e-6)
            cos.append(((flat[i] * flat[j]).sum() / norms).clamp(-1, 1))
    c = torch.stack(cos).mean()
    return float(k * c / (1 + (k - 1) * c))


def model_stock(base: Tensor, experts: Sequence[Tensor]) -> tuple[Tensor, float]:
    """The merged tensor and its ratio t."""
    experts = list(experts)
    t = model_stock_ratio([e - base for e in experts])
    mean = torch.stack(experts).mean(dim=0)
    return t * mean + (1 - t) * base, t


class ModelStock(MergeMethod):
    """Plugin for :func:`model_stock` (no options: t comes from the geometry)."""

    name = "model_stock"

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        if len(self.expert_names) < 2:
            raise ValueError(
                f"Model Stock needs at least two experts; the pool has {self.expert_names}"
            )
        self.ratios: dict[str, float] = {}

    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        merged, self.ratios[name] = model_stock(base, list(experts.values()))
        return merged

    def report(self) -> dict[str, Any]:
        ts = list(self.ratios.values())
        return {"t_min": min(ts), "t_max": max(ts), "t_mean": sum(ts) / len(ts)} if ts else {}
