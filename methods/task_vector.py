"""Any data-free task-vector merge as transform × combine × coefficients (:mod:`core.pieces`).

    θ = θ0 + λ · combine({transform(θ_k − θ0)}, {w_k})

``conf/method/task_vector.yaml`` composes the three from the config groups
``method/transform`` (``none``, ``trim``, ``drop``, ``breadcrumbs``, ``magprune``,
``variance_select``), ``method/combine`` (``sum``, ``disjoint_mean``, ``consensus``) and
``method/coefficients`` (``fixed``, ``metagpt``, ``learned``: an AdaMerging /
Sens-Merging / MetaGPT cell's weights), e.g.
MetaGPT's coefficients over DARE drops with TIES' election:

    mergelab method=task_vector method/transform=drop method/combine=disjoint_mean \\
        method/coefficients=metagpt

Task arithmetic, TIES, DARE, Breadcrumbs, DELLA, Consensus TA and MetaGPT are this class
with their pieces fixed (and their own flat options), so a composition that names the same pieces
and options gives the same weights bit for bit (tests/unit/test_task_vector.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from core.combine import weighted_task_sum
from core.pieces import Coefficients, Combine, Identity, Passes, Sum, Transform
from methods.base import MergeMethod, task_vectors


class TaskVectorMerge(MergeMethod):
    """The composed merge. ``transform``, ``combine`` and ``coefficients`` are piece
    objects (Hydra instantiates them from their ``_target_``). ``stat_passes`` is the most
    any piece needs; ``report()`` merges the pieces' reports."""

    name = "task_vector"

    def __init__(self, transform: Transform, combine: Combine, coefficients: Coefficients) -> None:
        for what, piece, kind in (
            ("transform", transform, Transform),
            ("combine", combine, Combine),
            ("coefficients", coefficients, Coefficients),
        ):
            if not isinstance(piece, kind):
                raise ValueError(
                    f"method.{what} must be a core.pieces.{kind.__name__} (a config with a "
                    f"_target_: pick one with method/{what}=...), got {type(piece).__name__}"
                )
            owner = getattr(piece, "_merge", None)
            if owner is not None and owner is not self:
                raise ValueError(
                    f"method.{what}: this {type(piece).__name__} already belongs to another "
                    "merge (pieces keep per-merge statistics); build a new one"
                )
            piece._merge = self
        self.transform = transform
        self.combine = combine
        self.coefficients = coefficients
        self._passes = Passes(coefficients, transform)
        self.stat_passes = self._passes.count
        self.tensor_passes = self._passes.tensor_count
        self.chunked = transform.chunked and combine.chunked and coefficients.chunked
        self.expert_names: list[str] = []

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        self.coefficients.setup(self.expert_names, seed)
        self.transform.setup(self.expert_names, seed)
        self.combine.setup(self.expert_names, seed)

    def observe(
        self, pass_idx: int, name: str, base: Tensor, experts: Mapping[str, Tensor]
    ) -> None:
        taus = dict(zip(experts, task_vectors(base, experts), strict=True))
        self._passes.observe(pass_idx, name, taus)

    def end_pass(self, pass_idx: int) -> None:
        self._passes.end_pass(pass_idx)

    def observe_tensor(
        self, pass_idx: int, name: str, base: Tensor, experts: Mapping[str, Tensor]
    ) -> None:
        taus = dict(zip(experts, task_vectors(base, experts), strict=True))
        self._passes.observe_tensor(pass_idx, name, taus)

    def end_tensor_pass(self, pass_idx: int, name: str) -> None:
        self._passes.end_tensor_pass(pass_idx, name)

    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        weights = self.coefficients.weights(name, list(experts))
        if (
            type(self.transform) is Identity
            and type(self.combine) is Sum
            and self.combine.plain(weights)
        ):
            # the same sum, one difference in memory at a time
            return base + self.coefficients.scaling * weighted_task_sum(
                base, experts.values(), weights
            )
        taus = dict(zip(experts, task_vectors(base, experts), strict=True))
        vectors = self.transform.apply(name, taus)
        return self.combine(base, list(vectors.values()), self.coefficients.scaling, weights)

    def report(self) -> dict[str, Any]:
        """The pieces' reports in one mapping; a key two pieces both report (e.g. a drop's
        and the consensus mask's ``kept_fraction``) is kept once per piece, as
        ``transform.kept_fraction`` and ``combine.kept_fraction``."""
        parts = {
            "coefficients": self.coefficients.report(),
            "transform": self.transform.report(),
            "combine": self.combine.report(),
        }
        seen: dict[str, int] = {}
        for rep in parts.values():
            for k in rep:
                seen[k] = seen.get(k, 0) + 1
        return {
            (f"{what}.{k}" if seen[k] > 1 else k): v
            for what, rep in parts.items()
            for k, v in rep.items()
        }
