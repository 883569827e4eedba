"""Model evaluation for mergelab.

``evals.lm_eval`` runs lm-evaluation-harness tasks on an in-memory model. Its names are
re-exported here lazily, so ``import evals`` stays cheap until one is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evals.lm_eval import (
        EvalResult,
        evaluate,
        metric_key,
        quiet_lm_eval_logging,
        validate_tasks,
        write_samples_jsonl,
    )

__all__ = [
    "EvalResult",
    "evaluate",
    "metric_key",
    "quiet_lm_eval_logging",
    "validate_tasks",
    "write_samples_jsonl",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("evals.lm_eval"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
