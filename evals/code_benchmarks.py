"""HumanEval and MBPP scored in mergelab's sandbox instead of in-process.

lm-eval's own ``humaneval`` / ``mbpp`` tasks execute model-written code inside the
evaluating process (through Hugging Face ``evaluate``'s ``code_eval``, which needs
``HF_ALLOW_CODE_EVAL=1`` and ``confirm_run_unsafe_code``). mergelab's versions,
``mergelab_humaneval`` and ``mergelab_mbpp`` (task YAMLs in ``evals/tasks/``, found through
``include_path: ${lm_eval_tasks:}``), read the same hub datasets with the same prompts and
stop sequences, and run every program with :func:`evals.sandbox.run_many`: each in its
own OS sandbox (bubblewrap: no network, no host files but the interpreter, a private tmpfs,
CPU, memory and file-size limits, an empty environment), the hidden tests after the
solution. They are not marked ``unsafe_code``,
because nothing unsafe runs in the harness's own process.

Decisions (greedy decoding, one sample, so pass@1 is the fraction of problems passed):

* HumanEval (``openai/openai_humaneval``, 0-shot): solution = prompt + completion, tests =
  the problem's ``test`` + ``check(<entry_point>)``; stops at a new top-level ``class``, ``def``,
  ``#``, ``if`` or ``print``, as lm-eval's task does.
* MBPP (``google-research-datasets/mbpp``, config ``full``, 3-shot by default): prompt "You
  are an expert Python programmer, and here is your task: <text> Your code should pass
  these tests:\\n\\n<3 asserts>\\n[BEGIN]\\n", generation until ``[DONE]``; the few-shot
  examples are problems 2, 3 and 4 of the dataset's ``prompt`` split (the original paper's
  convention, as in lm-eval). Solution = ``test_setup_code`` + completion, tests = the
  asserts of ``test_list`` (``challenge_test_list`` is not used).
* Limits per program: :data:`TIMEOUT_S` wall-clock seconds and :data:`MEMORY_MB` MiB.
* The programs run in an lm-eval custom filter (:func:`filter_humaneval`,
  :func:`filter_mbpp`; ``filter_list`` entry named ``none``, so the metric key stays
  ``pass@1``), all of a task's concurrently, as the suite's ``mergelab_code`` does (see
  :mod:`evals.suite.scoring`); each logged sample keeps the generation in ``resps`` and the
  outcome (``completion``, ``status``, ``detail``) in ``filtered_resps``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from evals.suite.scoring import Program, code_outcome, sandbox_outcomes

__all__ = [
    "MBPP_FEWSHOT_IDS",
    "MEMORY_MB",
    "TIMEOUT_S",
    "filter_humaneval",
    "filter_mbpp",
    "humaneval_program",
    "mbpp_fewshot_samples",
    "mbpp_program",
    "process_humaneval",
    "process_mbpp",
]

TIMEOUT_S = 10.0
MEMORY_MB = 1024
MBPP_FEWSHOT_IDS = (2, 3, 4)


def humaneval_program(doc: Mapping[str, Any], completion: str) -> tuple[str, str]:
    """HumanEval's ``(solution, tests)``: signature, docstring and completion; the problem's
    ``check`` and its call."""
    return f"{doc['prompt']}{completion}\n", f"{doc['test']}\n\ncheck({doc['entry_point']})\n"


def mbpp_program(doc: Mapping[str, Any], completion: str) -> tuple[str, str]:
    """MBPP's ``(solution, tests)``: setup code and the completion; the problem's asserts."""
    setup = doc.get("test_setup_code") or ""
    return f"{setup}\n{completion}\n", "\n".join(doc["test_list"]) + "\n"


def filter_humaneval(resps: Sequence[Any], docs: Sequence[Mapping[str, Any]]) -> list[dict]:
    """lm-eval custom filter: every HumanEval program of the task, run concurrently."""
    return sandbox_outcomes(
        resps, docs, humaneval_program, timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB
    )


def filter_mbpp(resps: Sequence[Any], docs: Sequence[Mapping[str, Any]]) -> list[dict]:
    """lm-eval custom filter: every MBPP program of the task, run concurrently."""
    return sandbox_outcomes(resps, docs, mbpp_program, timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB)


def _pass_at_1(doc: Mapping[str, Any], results: Any, program: Program) -> dict[str, float]:
    outcome = code_outcome(doc, results, program, timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB)
    return {"pass@1": float(outcome["status"] == "passed")}


def process_humaneval(doc: Mapping[str, Any], results: Any) -> dict[str, float]:
    """lm-eval ``process_results``: ``pass@1`` of the greedy completion (the filter's outcome,
    or a raw generation run sandboxed here)."""
    return _pass_at_1(doc, results, humaneval_program)


def process_mbpp(doc: Mapping[str, Any], results: Any) -> dict[str, float]:
    """lm-eval ``process_results``: ``pass@1`` of the greedy completion (the filter's outcome,
    or a raw generation run sandboxed here)."""
    return _pass_at_1(doc, results, mbpp_program)


def mbpp_fewshot_samples() -> list[dict[str, Any]]:
    """MBPP's few-shot examples: :data:`MBPP_FEWSHOT_IDS` of the ``prompt`` split, fetched
    with the dataset (from the hub or the local HF cache), marked ``is_fewshot``."""
    import datasets

    split = datasets.load_dataset("google-research-datasets/mbpp", "full", split="prompt")
    by_id = {row["task_id"]: row for row in split}
    missing = [i for i in MBPP_FEWSHOT_IDS if i not in by_id]
    if missing:
        raise ValueError(f"MBPP prompt split lacks few-shot task ids {missing}")
    return [{**by_id[i], "is_fewshot": True} for i in MBPP_FEWSHOT_IDS]
