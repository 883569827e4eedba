"""Calibration prompts per expert, shared by the data-dependent methods."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Mapping, Sequence

import torch


def expert_prompts(
    calibration: Mapping[str, Sequence[str]],
    expert_tasks: Mapping[str, Sequence[str]],
    expert: str,
    n: int,
    who: str,
) -> tuple[list[str], list[str]]:
    """(matched calibration tasks, up to ``n`` prompts of ``expert``): its tasks' prompts
    (exact key, else keys starting with ``<task>_``), round-robin across tasks; every
    task's prompts, with a warning naming ``who``, when none matches."""
    keys = list(calibration)
    tasks: list[str] = []
    for t in expert_tasks.get(expert, []):
        hits = [t] if t in calibration else [k for k in keys if k.startswith(f"{t}_")]
        tasks.extend(h for h in hits if h not in tasks)
    if not tasks:
        warnings.warn(
            f"{who}: expert {expert!r} has no calibration prompts of its own tasks "
            f"{list(expert_tasks.get(expert, []))}; using every task's prompts {keys}",
            stacklevel=3,
        )
        tasks = keys
    lists = [list(calibration[t]) for t in tasks]
    prompts: list[str] = []
    for i in range(max((len(x) for x in lists), default=0)):
        prompts.extend(x[i] for x in lists if i < len(x))
    return tasks, prompts[:n]


def free_memory() -> None:
    """Collect dropped models and free their (GPU) memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
