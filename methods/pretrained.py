"""Reference "merge" that returns one pool member unchanged (the base or one expert).

Used for the reference rows of a results table: the base and each expert scored alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from methods.base import MergeMethod


def pick_member(name: str, base: Tensor, experts: Mapping[str, Tensor], model: str) -> Tensor:
    """``base`` when ``model == "base"``, else ``experts[model]`` (returned as is)."""
    if model == "base":
        return base
    if model not in experts:
        raise KeyError(f"tensor {name!r}: expert {model!r} not among {list(experts)}")
    return experts[model]


class Pretrained(MergeMethod):
    """Plugin returning pool member ``model``: ``"base"`` (default) or an expert's name.

    The name is validated in ``setup`` against the pool; an expert literally named
    ``"base"`` is rejected as ambiguous.
    """

    name = "pretrained"

    def __init__(self, model: str = "base") -> None:
        if not isinstance(model, str) or not model:
            raise ValueError(f"method.model must be 'base' or an expert's name, got {model!r}")
        self.model = model

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        if "base" in self.expert_names:
            raise ValueError(
                "method.model: an expert is named 'base', which is ambiguous with the base "
                f"model; the pool's experts are {self.expert_names}"
            )
        allowed = ["base", *self.expert_names]
        if self.model not in allowed:
            raise ValueError(f"method.model must be one of {allowed}, got {self.model!r}")

    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        return pick_member(name, base, experts, self.model)

    def report(self) -> dict[str, Any]:
        return {"model": self.model}
