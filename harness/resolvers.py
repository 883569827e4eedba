"""OmegaConf resolvers that let configs name built-in assets, built on first use.

``${zoo:xs,base}`` → the base of the ``xs`` zoo, ``${zoo:xs,math}`` → its full math
expert, ``${zoo:xs,lora/math}`` → its LoRA math adapter (optional third argument: the zoo
seed, default 0). ``${suite_dir:0}`` → the generated suite's lm-eval task directory.
``${lm_eval_tasks:}`` → mergelab's own lm-eval task YAMLs (``evals/tasks``: sandboxed
HumanEval and MBPP), for a task config's ``include_path``.
Resolving builds what is missing (minutes for the zoo, once; reused afterwards).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def _zoo(size: str, member: str, seed: int = 0) -> str:
    from harness.zoo import CATEGORIES, build_zoo

    kind, _, cat = member.rpartition("/")
    if member != "base" and (kind not in ("", "lora") or cat not in CATEGORIES):
        raise ValueError(
            f"${{zoo:{size},{member}}}: member must be 'base', a category {list(CATEGORIES)} "
            "or 'lora/<category>'"
        )
    root = build_zoo(str(size), int(seed))
    return str(root / ("base" if member == "base" else f"{kind or 'experts'}/{cat}"))


def _suite_dir(seed: int = 0) -> str:
    from evals.suite.build import build_suite, default_suite_dir

    return str(build_suite(default_suite_dir(int(seed)), seed=int(seed)) / "tasks")


def _lm_eval_tasks() -> str:
    from evals.code_benchmarks import __file__ as code_benchmarks_file

    return str(Path(code_benchmarks_file).resolve().parent / "tasks")


def register() -> None:
    """Register the resolvers (idempotent)."""
    OmegaConf.register_new_resolver("zoo", _zoo, replace=True)
    OmegaConf.register_new_resolver("suite_dir", _suite_dir, replace=True)
    OmegaConf.register_new_resolver("lm_eval_tasks", _lm_eval_tasks, replace=True)
