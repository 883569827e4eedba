"""LiNeS, layer-increasing network scaling (Wang et al. 2025, ICLR, arXiv 2410.17146):
scale the multi-task vector by layer depth, keeping shallow layers close to θ0.

θ = θ0 + λ_l · τ_MTL^l with τ_MTL = Σ_k w_k τ_k (task arithmetic's sum) and, for block
l = 1..L (1-indexed), λ_l = α + β·(l − 1)/(L − 1). In the paper's multi-task setting β is
tuned and α = (1/K)·‖τ_sum‖ / ‖τ_MTL‖ with τ_sum = Σ_k τ_k, K the number of experts: the
shallowest block then carries the experts' average task vector.

Defaults: ``alpha: null`` (the paper's rule above), ``beta`` 0.5, equal weights 1.0,
``outside_blocks: alpha``.

Choices the paper leaves open, decided here:
- The blocks are the transformer blocks named ``layers.<i>.`` (also ``h.<i>.`` /
  ``blocks.<i>.``; :mod:`core.layers`), block i (0-based) being l = i + 1. L is the largest
  block index seen + 1, found in one statistics pass over every mergeable tensor (so it
  works while streaming); a pool that excludes some middle blocks keeps their depth
  positions, but excluding the last blocks (``model.exclude``) shortens L.
  With L = 1 the fraction (l − 1)/(L − 1) is taken as 0 (λ = α).
- Tensors outside the blocks: ``outside_blocks: alpha`` gives every one of them λ = α, as
  the authors' code (github.com/wang-kee/LiNeS, ``LiNeS_scaling``) does; ``by_depth`` gives
  embeddings λ = α (shallowest) and everything else outside the blocks (final norm,
  ``lm_head``) λ = α + β (deepest).
- The norms of the α rule are L1 norms over all mergeable tensors of the model, as in the
  authors' code (the paper writes ‖·‖); with equal weights the ratio is exactly 1, so
  α = 1/K. If ‖τ_MTL‖₁ = 0 the ratio is taken as 1. A given ``alpha`` skips the rule.
- β = 0.5 is a data-free default: the paper tunes β on validation data (its grid spans
  [0, 1]); 0.5 is that grid's middle, e.g. λ from 0.5 to 1.0 for K = 2 experts.
- τ_MTL is task arithmetic's weighted sum only (the paper also wraps TIES / consensus);
  there is no separate scaling λ: λ_l replaces task arithmetic's λ.
- Arithmetic in float32 as the tensors arrive; the norms are accumulated in float64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from core.combine import weighted_task_sum
from core.layers import block_index, layer_group
from core.options import check_choice, check_finite, check_weights_option, resolve_weights
from methods.base import MergeMethod

OUTSIDE_BLOCKS = ("alpha", "by_depth")


def lines_lambda(block: int, num_blocks: int, alpha: float, beta: float) -> float:
    """λ = α + β·i/(L − 1) for the 0-based block ``i`` of ``num_blocks`` (α when L = 1)."""
    if not 0 <= block < num_blocks:
        raise ValueError(f"block {block} is outside the model's {num_blocks} blocks")
    return alpha + beta * (block / (num_blocks - 1) if num_blocks > 1 else 0.0)


def lines_alpha(n_experts: int, sum_norm: float, mtl_norm: float) -> float:
    """The paper's α = (1/K)·‖τ_sum‖ / ‖τ_MTL‖ (ratio 1 when ‖τ_MTL‖ = 0)."""
    ratio = sum_norm / mtl_norm if mtl_norm > 0 else 1.0
    return ratio / n_experts


def lines_merge(
    base: Tensor, experts: Sequence[Tensor], lam: float, weights: Sequence[float] | None = None
) -> Tensor:
    """θ0 + λ Σ_k w_k τ_k for one tensor at its layer's λ."""
    return base + lam * weighted_task_sum(base, experts, weights)


class LiNeS(MergeMethod):
    """Plugin for :func:`lines_merge` with per-layer λ. Options: ``alpha`` (null: the
    paper's norm rule, else a finite number), ``beta`` (finite), ``weights`` (null, list in
    pool order or mapping by expert), ``outside_blocks`` (``alpha`` or ``by_depth``)."""

    name = "lines"
    stat_passes = 1

    def __init__(
        self,
        alpha: float | None = None,
        beta: float = 0.5,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        outside_blocks: str = "alpha",
    ) -> None:
        self.alpha_option = None if alpha is None else check_finite(alpha, "method.alpha")
        self.beta = check_finite(beta, "method.beta")
        self.weights_option = check_weights_option(weights)
        self.outside_blocks = check_choice(outside_blocks, "method.outside_blocks", OUTSIDE_BLOCKS)
        self._reset()

    def _reset(self) -> None:
        self.max_block = -1
        self.groups: list[str] = []
        self.sum_norm = 0.0
        self.mtl_norm = 0.0
        self.num_blocks: int | None = None
        self.alpha: float | None = None

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        if not self.expert_names:
            raise ValueError("LiNeS needs at least one expert")
        self.weights = resolve_weights(self.weights_option, self.expert_names)
        self.weight_of = dict(zip(self.expert_names, self.weights, strict=True))
        self._reset()

    def observe(
        self, pass_idx: int, name: str, base: Tensor, experts: Mapping[str, Tensor]
    ) -> None:
        i = block_index(name)
        if i is not None:
            self.max_block = max(self.max_block, i)
        group = layer_group(name)
        if group not in self.groups:
            self.groups.append(group)
        if self.alpha_option is None:
            vectors = list(experts.values())
            self.sum_norm += float(weighted_task_sum(base, vectors).abs().sum())
            weights = [self.weight_of[e] for e in experts]
            self.mtl_norm += float(weighted_task_sum(base, vectors, weights).abs().sum())

    def end_pass(self, pass_idx: int) -> None:
        self.num_blocks = self.max_block + 1
        if self.alpha_option is None:
            self.alpha = lines_alpha(len(self.expert_names), self.sum_norm, self.mtl_norm)
        else:
            self.alpha = self.alpha_option

    def group_scale(self, group: str) -> float:
        """λ of a layer group (``layers.<i>``, ``embed``, ``head``, ``other``)."""
        if self.num_blocks is None or self.alpha is None:
            raise RuntimeError("LiNeS: λ is unknown before the statistics pass has ended")
        if group.startswith("layers."):
            i = int(group.split(".", 1)[1])
            if i >= self.num_blocks:
                raise ValueError(
                    f"LiNeS: block {i} is beyond the {self.num_blocks} blocks the statistics "
                    "pass saw"
                )
            return lines_lambda(i, self.num_blocks, self.alpha, self.beta)
        if self.outside_blocks == "alpha" or group == "embed":
            return self.alpha
        return self.alpha + self.beta

    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        weights = [self.weight_of[e] for e in experts]
        return lines_merge(
            base, list(experts.values()), self.group_scale(layer_group(name)), weights
        )

    def report(self) -> dict[str, Any]:
        if self.num_blocks is None:
            return {}
        lambdas = {g: self.group_scale(g) for g in self.groups}
        return {
            "alpha": self.alpha,
            "alpha_rule": "given" if self.alpha_option is not None else "paper",
            "beta": self.beta,
            "num_blocks": self.num_blocks,
            "norm_ratio": (self.sum_norm / self.mtl_norm) if self.mtl_norm > 0 else 1.0,
            "outside_blocks": self.outside_blocks,
            "weights": self.weight_of,
            "lambda": lambdas,
        }
