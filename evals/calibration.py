"""Unlabelled calibration prompts from lm-eval tasks, for data-dependent merging methods.

Only the model input (``doc_to_text``) of each doc is used, never its target, as in
AdaMerging's test-time adaptation on unlabelled inputs. ``split`` picks the docs:
"validation" (the built-in suite exposes its ``calibration`` split there), "test" or
"train", or a list of them in order of preference (each task uses the first it has, e.g.
``[validation, test]`` for a mix of tasks with and without a validation split); a task
that has none of them is an error naming the splits it has.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from lm_eval.tasks import TaskManager, get_task_dict

_SPLITS = {
    "validation": ("has_validation_docs", "validation_docs"),
    "test": ("has_test_docs", "test_docs"),
    "train": ("has_training_docs", "training_docs"),
}


def _leaf_tasks(task_dict: dict) -> dict:
    out = {}
    for key, value in task_dict.items():
        if isinstance(value, dict):
            out.update(_leaf_tasks(value))
        else:
            out[getattr(key, "group_name", key) if not isinstance(key, str) else key] = value
    return out


def calibration_prompts(
    tasks: Sequence[str],
    task_manager: TaskManager,
    *,
    split: str | Sequence[str] = "validation",
    n: int = 64,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Up to ``n`` prompts per task (a seeded sample when the split holds more)."""
    order = [split] if isinstance(split, str) else list(split)
    bad = [s for s in order if s not in _SPLITS]
    if bad or not order:
        raise ValueError(
            f"calibration split {split!r} is unknown; use one of {sorted(_SPLITS)} or a list"
        )
    out: dict[str, list[str]] = {}
    for name, task in _leaf_tasks(get_task_dict(list(tasks), task_manager)).items():
        have = [s for s, (h, _) in _SPLITS.items() if getattr(task, h)()]
        chosen = next((s for s in order if s in have), None)
        if chosen is None:
            raise ValueError(
                f"task {name!r} has no {' or '.join(order)} docs for calibration (it has "
                f"{have}); set task.calibration.split to one of those, or a list of them"
            )
        docs = list(getattr(task, _SPLITS[chosen][1])())
        if len(docs) > n:
            docs = random.Random(seed).sample(docs, n)
        prompts = [task.doc_to_text(d) for d in docs]
        out[name] = [p if isinstance(p, str) else str(p) for p in prompts]
    return out
