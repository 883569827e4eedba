"""The checks a cell's or a merge's config passes before anything runs: the top-level
options (:func:`check_run_options`) and the method (:func:`build_method`). Kept apart from
``harness.run`` so that ``mergelab-merge`` checks the same way without importing the
evaluation stack."""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from evals import sandbox
from harness.stream import parse_size
from methods.base import MergeMethod


def check_run_options(c: dict[str, Any]) -> None:
    """The top-level options a cell needs, checked before anything runs (each error names
    the option and a valid value); sets the code sandbox's mode (``sandbox``)."""
    if isinstance(c["seed"], bool) or not isinstance(c["seed"], int):
        raise ValueError(f"seed={c['seed']!r} must be an integer: seed=0")
    threads = c.get("threads")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads={threads!r} must be a positive integer or null: threads=N")
    try:
        torch.device(c["device"])
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device={c['device']!r} is not a torch device: use cpu, cuda or cuda:N"
        ) from err
    parse_size(c["max_shard_size"])
    sandbox.set_mode(c["sandbox"])


def build_method(method_cfg: DictConfig) -> MergeMethod:
    """Instantiate the method config; an option the method does not take is named with the
    options it does take (Hydra's own error only shows a constructor's TypeError)."""
    target = method_cfg.get("_target_")
    try:
        return instantiate(method_cfg)
    except InstantiationException as err:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if unknown is None or not target:
            raise
        params = inspect.signature(get_class(target)).parameters.values()
        options = sorted(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        raise ValueError(
            f"method.{unknown[1]} is not an option of {target}; its options are {options}: "
            f"drop it or fix its name"
        ) from err
