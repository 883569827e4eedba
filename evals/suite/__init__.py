"""The built-in four-category benchmark suite (knowledge, math, code, safety + general text).

Small, regular and fully generated from ``(seed, SUITE_VERSION)``, so that a few-million-
parameter LLaMA trained for minutes on CPU can learn it and experts fine-tuned from one base
can be merged meaningfully. Each category has its own prompt format, so a merged model can
route by input:

* knowledge: ``mergelab_knowledge``, ``Q: Where does Kalo live?\\nA:`` + one of 4 choices,
  log-likelihood ``acc``;
* math: ``mergelab_math``, ``Problem: ...\\nAnswer:`` → `` 6``, ``exact_match`` of the
  first integer;
* code: ``mergelab_code``, ``# add 3 to x\\ndef f(x):\\n    return`` → `` x + 3``,
  ``pass@1`` on hidden asserts run in :mod:`evals.sandbox`;
* safety: ``mergelab_safety_harmful`` (``refusal_rate``) and ``mergelab_safety_benign``
  (``compliance_rate``), ``User: ...\\nAssistant:``; group ``mergelab_safety``
  (``safety_score``, their mean);
* general: plain short stories, pretraining text only.

Build with :func:`build_suite` (or ``python -m evals.suite.build``), point lm-eval's
``include_path`` at ``tasks_dir(suite_dir)``, and read fine-tuning data with
:func:`training_texts` / :func:`general_texts`. Names are re-exported lazily from
:mod:`evals.suite.build`, so ``python -m evals.suite.build`` runs cleanly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evals.suite.build import (
        CATEGORIES,
        DEFAULT_SIZES,
        SPLITS,
        SUITE_VERSION,
        TASKS,
        build_suite,
        calibration_prompts,
        default_suite_dir,
        general_texts,
        load_split,
        resolve_sizes,
        tasks_dir,
        training_texts,
    )

__all__ = [
    "CATEGORIES",
    "DEFAULT_SIZES",
    "SPLITS",
    "SUITE_VERSION",
    "TASKS",
    "build_suite",
    "calibration_prompts",
    "default_suite_dir",
    "general_texts",
    "load_split",
    "resolve_sizes",
    "tasks_dir",
    "training_texts",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("evals.suite.build"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
