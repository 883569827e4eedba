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
then drives the ordinary per-tensor ``merge_tensor``. The attributes named in
``fit_state_keys`` are what the runner caches, so a later cell that would fit the same way
restores them with ``load_fit_state`` instead of fitting.

``report()`` returns whatever the method computed that belongs in the result record
(coefficients, thresholds); it must be JSON-serialisable.
"""

from __future__ import annotations

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

    def frozen_model(self, member: str, who: str) -> torch.nn.Module:
        """``build_model(member)`` with gradients off, after checking that every mergeable
        tensor is one of its state-dict keys (``who`` names the method in the error)."""
        model = self.build_model(member)
        model.requires_grad_(False)
        model.eval()
        keys = set(model.state_dict())
        missing = [n for n in self.tensor_names if n not in keys]
        if missing:
            raise ValueError(
                f"{who}: tensors {missing[:8]} are not in the model from "
                f"ctx.build_model({member!r}); the pool's tensor names must be the model's "
                "state-dict keys"
            )
        return model

    def check_experts(self, expected: Sequence[str]) -> None:
        """Refuse a context whose experts are not ``expected`` (those ``setup`` was given)."""
        if list(self.expert_names) != list(expected):
            raise ValueError(
                f"FitContext experts {list(self.expert_names)} differ from setup's {list(expected)}"
            )


class MergeMethod(ABC):
    """Base class of every merge plugin (instantiated by Hydra through ``_target_``)."""

    name: ClassVar[str]
    stat_passes: ClassVar[int] = 0
    needs_data: ClassVar[bool] = False
    needs_calibration: ClassVar[bool] = True  # read the tasks' unlabelled prompts in fit
    # False for a training workflow that builds its own members from the base (BoRA,
    # Merge to Learn): the pool may then have no experts, and ``report()["members"]``
    # names what it trained as directories a later pool can list as experts.
    uses_experts: ClassVar[bool] = True
    # What the runner may cache of a fit (harness/fit_cache.py): the attributes ``fit``
    # sets and the merge reads, and the options only the merge reads. Empty: never cached.
    fit_state_keys: ClassVar[tuple[str, ...]] = ()
    fit_independent: ClassVar[tuple[str, ...]] = ()
    # True when ``observe``, ``observe_tensor`` and ``merge_tensor`` work entry by entry:
    # given flat slices of a tensor's members they give exactly what the whole tensor
    # would (statistics that add up exactly, such as counts; merged entries that depend
    # only on the same entries of the members and on constants fixed before the merge).
    # The executor then streams each tensor in slices. False: whole tensors, in shape.
    chunked: bool = False
    # Statistics passes over each tensor (its slices, or the whole tensor) just before it
    # is merged: ``observe_tensor(i, name, base, experts)`` per slice, then
    # ``end_tensor_pass(i, name)``; e.g. a per-tensor trim threshold of a chunked method.
    tensor_passes: int = 0

    def fit(self, ctx: FitContext) -> None:
        """Learn whatever the merge needs from data (only when ``needs_data``)."""
        raise NotImplementedError(f"{type(self).__name__} does not learn from data")

    def fit_state(self) -> dict[str, Any]:
        """What ``fit`` learned: the ``fit_state_keys`` attributes (tensors, dicts with str
        keys, lists and plain values)."""
        return {k: getattr(self, k) for k in self.fit_state_keys}

    def load_fit_state(self, state: Mapping[str, Any]) -> None:
        """Restore what ``fit`` learned (instead of calling it), after ``setup``."""
        for k in self.fit_state_keys:
            setattr(self, k, state[k])

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

    def observe_tensor(
        self, pass_idx: int, name: str, base: Tensor, experts: Mapping[str, Tensor]
    ) -> None:
        """Accumulate statistics of tensor ``name`` (one slice) in its pass ``pass_idx``."""
        raise NotImplementedError(f"{type(self).__name__} declares no per-tensor passes")

    def end_tensor_pass(self, pass_idx: int, name: str) -> None:  # noqa: B027 (optional hook)
        """Finish per-tensor pass ``pass_idx`` of tensor ``name``."""

    @abstractmethod
    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        """Return the merged value of tensor ``name``."""

    def report(self) -> dict[str, Any]:
        """JSON-serialisable facts about this merge, saved in the result record."""
        return {}


def task_vectors(base: Tensor, experts: Mapping[str, Tensor]) -> list[Tensor]:
    """τk = θk − θ0 for each expert, in pool order."""
    return [t - base for t in experts.values()]


def stack(tensors: Sequence[Tensor]) -> Tensor:
    """Stack per-expert tensors along a new leading dimension."""
    return torch.stack(list(tensors), dim=0)
