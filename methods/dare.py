"""DARE (Yu et al. 2024): drop each task-vector entry with probability p, rescale the rest.

τ̃_k = τ_k ⊙ m_k / (1 − p) with m_k ~ Bernoulli(1 − p) elementwise (an entry is kept when
its uniform draw u ∈ [0, 1) satisfies u ≥ p, so p = 0 keeps everything). Then

- ``dare_linear``: θ = θ0 + λ Σ_k w_k τ̃_k (task arithmetic on the τ̃_k);
- ``dare_ties``: the τ̃_k replace TIES's trimmed task vectors, followed by TIES's
  unweighted sign election, weighted disjoint mean and θ0 + λ · merged
  (:func:`methods.ties.ties_combine`).

Reproducible masks: the generator seed is derived from (run seed, expert name, tensor
name) as the first 8 bytes of sha256(json.dumps([seed, expert, tensor])) shifted to 63
bits; the uniforms are drawn on CPU with a private ``torch.Generator`` and then moved to
the tensor's device. The mask therefore never depends on execution order, device,
parallelism or the global RNG.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from core.options import check_finite, check_unit_interval, check_weights_option, resolve_weights
from methods.base import MergeMethod
from methods.task_arithmetic import sum_combine
from methods.ties import ties_combine


def mask_seed(seed: int, expert: str, tensor: str) -> int:
    """63-bit generator seed from (run seed, expert name, tensor name) via sha256."""
    digest = hashlib.sha256(json.dumps([int(seed), expert, tensor]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def dare_keep_mask(
    shape: Sequence[int] | torch.Size,
    drop_rate: float,
    generator_seed: int,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Boolean keep-mask: each entry kept with probability 1 − ``drop_rate``.

    Uniforms come from a CPU ``torch.Generator`` seeded with ``generator_seed`` and the
    mask is then moved to ``device``.
    """
    if drop_rate <= 0:
        return torch.ones(tuple(shape), dtype=torch.bool, device=device)
    g = torch.Generator(device="cpu").manual_seed(generator_seed)
    return (torch.rand(tuple(shape), generator=g) >= drop_rate).to(device)


def dare_rescale(tau: Tensor, keep: Tensor, drop_rate: float) -> Tensor:
    """τ ⊙ keep / (1 − p): dropped entries become 0, survivors are scaled by 1/(1 − p)."""
    return torch.where(keep, tau / (1.0 - drop_rate), torch.zeros_like(tau))


def dare_linear_merge(
    base: Tensor,
    experts: Sequence[Tensor],
    masks: Sequence[Tensor],
    drop_rate: float,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """θ0 + λ Σ_k w_k τ̃_k with τ̃_k = DARE(τ_k, masks[k])."""
    tilde = [dare_rescale(t - base, m, drop_rate) for t, m in zip(experts, masks, strict=True)]
    return sum_combine(base, tilde, scaling, weights)


def dare_ties_merge(
    base: Tensor,
    experts: Sequence[Tensor],
    masks: Sequence[Tensor],
    drop_rate: float,
    scaling: float = 1.0,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """TIES sign election + disjoint merge on the DARE task vectors τ̃_k, then θ0 + λ·merged."""
    tilde = [dare_rescale(t - base, m, drop_rate) for t, m in zip(experts, masks, strict=True)]
    return ties_combine(base, tilde, scaling, weights)


class _DARE(MergeMethod):
    """Shared plugin logic: options ``drop_rate`` (p ∈ [0, 1), default 0.5), ``scaling``
    (λ, default 1.0) and ``weights`` (null, a list in pool order or a mapping by name)."""

    def __init__(
        self,
        drop_rate: float = 0.5,
        scaling: float = 1.0,
        weights: Mapping[str, float] | Sequence[float] | None = None,
    ) -> None:
        self.drop_rate = check_unit_interval(drop_rate, "method.drop_rate", open_high=True)
        self.scaling = check_finite(scaling, "method.scaling")
        self.weights_option = check_weights_option(weights)
        self.weights: list[float] = []
        self.expert_names: list[str] = []
        self._kept: dict[str, Tensor | int] = {}
        self._numel: dict[str, int] = {}
        self.weight_of: dict[str, float] = {}

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        self.weights = resolve_weights(self.weights_option, self.expert_names)
        self.weight_of = dict(zip(self.expert_names, self.weights, strict=True))
        self._kept = dict.fromkeys(self.expert_names, 0)
        self._numel = dict.fromkeys(self.expert_names, 0)

    def masks(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> list[Tensor]:
        """The keep-masks of tensor ``name`` for each expert, in the mapping's order."""
        out = []
        for expert in experts:
            m = dare_keep_mask(
                base.shape, self.drop_rate, mask_seed(self.seed, expert, name), base.device
            )
            self._kept[expert] = self._kept[expert] + torch.count_nonzero(m)
            self._numel[expert] += m.numel()
            out.append(m)
        return out

    def report(self) -> dict[str, Any]:
        return {
            "weights": dict(zip(self.expert_names, self.weights, strict=True)),
            "kept_fraction": {
                n: (float(self._kept[n]) / self._numel[n]) if self._numel[n] else None
                for n in self.expert_names
            },
        }


class DARELinear(_DARE):
    """DARE + task arithmetic: θ0 + λ Σ_k w_k τ̃_k (see the module docstring)."""

    name = "dare_linear"

    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        masks = self.masks(name, base, experts)
        weights = [self.weight_of[n] for n in experts]
        return dare_linear_merge(
            base, list(experts.values()), masks, self.drop_rate, self.scaling, weights
        )


class DARETies(_DARE):
    """DARE + TIES: DARE drop/rescale replaces the TIES trim; unweighted sign vote,
    weighted disjoint mean, θ0 + λ · merged (see the module docstring)."""

    name = "dare_ties"

    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        masks = self.masks(name, base, experts)
        weights = [self.weight_of[n] for n in experts]
        return dare_ties_merge(
            base, list(experts.values()), masks, self.drop_rate, self.scaling, weights
        )
