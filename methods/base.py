"""The method plugin contract.

A merge method is a thin class around pure tensor functions. The streaming executor in
``harness/stream.py`` drives it tensor by tensor, so a method never sees a whole model:

1. ``stat_passes`` statistics passes: for each pass ``i`` the executor calls
   ``observe(i, name, base, experts)`` once per mergeable tensor, then ``end_pass(i)``.
   Methods that need whole-model statistics (TIES global trim thresholds, MetaGPT norms)
   use these; most methods need none.
2. One merge pass: ``merge_tensor(name, base, experts)`` returns the merged tensor.

Tensors arrive as float32 on the configured device; ``experts`` maps expert name to that
expert's tensor, in the pool's expert order. Tensors the pool excludes from merging, and
non-floating tensors, never reach the method: they are copied from the base.

Data-dependent methods (AdaMerging, Sens-Merging) set ``needs_data = True`` and get one
``fit(ctx)`` call after ``setup`` and before any pass. ``FitContext`` gives them the pool's
tensors, whole models when a forward pass is needed, the tokenizer, unlabelled
calibration prompts per task and a per-step logger; whatever they learn (coefficients)
then drives the ordinary per-tensor ``merge_tensor``.

``report()`` returns whatever the method computed that belongs in the result record
(coefficients, thresholds); it must be JSON-serialisable.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor


@dataclass
class FitContext:
    """What a data-dependent method may use in ``fit`` (built by the runner).

    ``load_tensors(name)`` gives the base's and each expert's float32 tensor on ``device``;
    ``build_model(member)`` gives a model (eval mode, on ``device``) holding that member's
    weights ("base" or an expert name), e.g. as the module for
    ``torch.func.functional_call``. ``calibration`` maps task name → unlabelled prompts;
    ``expert_tasks`` maps expert → the tasks it specialises in. ``log(metrics, step)``
    sends per-step metrics to the tracker (never fails). Training methods get
    ``load_texts(spec)`` (training texts from a data spec, see ``harness/data.py``) and
    ``cache_dir``, where trained models are kept by a hash of their recipe so that a sweep
    over merge options trains once, and an interrupted training resumes.
    """

    expert_names: list[str]
    expert_tasks: dict[str, list[str]]
    tensor_names: list[str]
    load_tensors: Callable[[str], tuple[Tensor, dict[str, Tensor]]]
    build_model: Callable[[str], torch.nn.Module]
    tokenizer: Any
    calibration: dict[str, list[str]]
    device: str = "cpu"
    seed: int = 0
    log: Callable[[dict[str, float], int], None] = field(default=lambda metrics, step: None)
    load_texts: Callable[[Mapping[str, Any]], list[str]] | None = None
    cache_dir: Path | None = None


class MergeMethod(ABC):
    """Base class of every merge plugin (instantiated by Hydra through ``_target_``)."""

    name: ClassVar[str]
    stat_passes: ClassVar[int] = 0
    needs_data: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = True  # read the tasks' unlabelled prompts in fit

    def fit(self, ctx: FitContext) -> None:
        """Learn whatever the merge needs from data (only when ``needs_data``)."""
        raise NotImplementedError(f"{type(self).__name__} does not learn from data")

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        """Called once before any pass with the pool's expert names and the run seed."""
        self.expert_names = list(expert_names)
        self.seed = seed

    def observe(
        self, pass_idx: int, name: str, base: Tensor, experts: Mapping[str, Tensor]
    ) -> None:
        """Accumulate statistics for one tensor during statistics pass ``pass_idx``."""
        raise NotImplementedError(f"{type(self).__name__} declares no statistics passes")

    def end_pass(self, pass_idx: int) -> None:  # noqa: B027 (optional hook, no-op default)
        """Finish statistics pass ``pass_idx`` (e.g. turn histograms into thresholds)."""

    @abstractmethod
    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        """Return the merged value of tensor ``name``."""

    def report(self) -> dict[str, Any]:
        """JSON-serialisable facts about this merge, saved in the result record."""
        return {}


def resolve_weights(
    weights: Mapping[str, float] | Sequence[float] | None, expert_names: Sequence[str]
) -> list[float]:
    """Per-expert weights in pool order; ``None`` means 1.0 each.

    Accepts a mapping by expert name (missing names get 1.0) or a list in pool order.
    Raises ``ValueError`` naming the problem for unknown names, wrong lengths, or
    negative / non-finite weights.
    """
    names = list(expert_names)
    if weights is None:
        return [1.0] * len(names)
    if isinstance(weights, Mapping):
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(
                f"method.weights names unknown experts {unknown}; the pool's experts are {names}"
            )
        out = [float(weights.get(n, 1.0)) for n in names]
    else:
        out = [float(w) for w in weights]
        if len(out) != len(names):
            raise ValueError(
                f"method.weights has {len(out)} entries but the pool has {len(names)} experts "
                f"{names}; give one weight per expert or a mapping by name"
            )
    bad = [w for w in out if not math.isfinite(w) or w < 0]
    if bad:
        raise ValueError(f"method.weights must be finite and >= 0, got {out}")
    if sum(out) == 0:
        raise ValueError("method.weights are all zero; at least one expert needs weight > 0")
    return out


def task_vectors(base: Tensor, experts: Mapping[str, Tensor]) -> list[Tensor]:
    """τk = θk − θ0 for each expert, in pool order."""
    return [t - base for t in experts.values()]


def check_unit_interval(
    value: float, what: str, *, open_low: bool = False, open_high: bool = False
) -> float:
    """Validate a config value in [0, 1] (ends optionally open) and return it as float."""
    v = float(value)
    low_ok = v > 0 if open_low else v >= 0
    high_ok = v < 1 if open_high else v <= 1
    if not (low_ok and high_ok and math.isfinite(v)):
        lo = "(" if open_low else "["
        hi = ")" if open_high else "]"
        raise ValueError(f"{what} must be in {lo}0, 1{hi}, got {value}")
    return v


def stack(tensors: Sequence[Tensor]) -> Tensor:
    """Stack per-expert tensors along a new leading dimension."""
    return torch.stack(list(tensors), dim=0)


def check_finite(value: float, what: str) -> float:
    """Validate a finite real config value (e.g. a scaling λ) and return it as float."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a finite number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return v


def check_choice(value: str, what: str, allowed: Sequence[str]) -> str:
    """Validate that a config value is one of ``allowed`` and return it."""
    if value not in allowed:
        raise ValueError(f"{what} must be one of {list(allowed)}, got {value!r}")
    return value


def check_weights_option(
    weights: Mapping[str, float] | Sequence[float] | None, what: str = "method.weights"
) -> dict[str, float] | list[float] | None:
    """Early shape/value check of a ``weights`` option (names are checked later by
    ``resolve_weights`` in ``setup``); returns a plain dict / list / ``None``."""
    if weights is None:
        return None
    if isinstance(weights, Mapping):
        items = {str(k): v for k, v in weights.items()}
    elif isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
        items = dict(enumerate(weights))
    else:
        raise ValueError(
            f"{what} must be null, a list in pool order or a mapping by expert name, "
            f"got {weights!r}"
        )
    out: dict = {}
    for key, w in items.items():
        v = check_finite(w, f"{what}[{key!r}]")
        if v < 0:
            raise ValueError(f"{what} must be finite and >= 0, got {v} for {key!r}")
        out[key] = v
    return out if isinstance(weights, Mapping) else list(out.values())
