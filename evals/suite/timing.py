"""How long scoring the suite takes: ``python -m evals.suite.timing --model DIR``.

Loads a Hugging Face causal-LM checkpoint directory (with its tokenizer), builds the suite
(:func:`evals.suite.build.build_suite`, cached), then times :func:`evals.lm_eval.evaluate`
on the test splits: once per category (each category's tasks in their own call, so the
per-category cost includes that call's set-up) and once for the whole suite in one call,
as a run scores it. Prints each task's item count, the seconds per category and the total.
Settings follow a run's defaults (``log_samples`` on, lm-eval's bootstrap for stderr), with
``--batch-size`` (default 256, ``conf/eval/default.yaml``'s) to compare generation batch sizes.

Besides wall-clock seconds it prints CPU seconds of this process and of its finished
children (the code tasks' sandboxes), which do not depend on what else the machine runs: on
a shared machine the wall clock measures the load as much as the scoring.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from evals.suite.build import TASKS, build_suite, default_suite_dir, tasks_dir

__all__ = ["main", "time_suite"]


def time_suite(
    model_dir: str | Path,
    suite_dir: str | Path,
    *,
    batch_size: int = 256,
    device: str | None = None,
) -> dict[str, dict]:
    """``{category | "suite": {"seconds", "cpu_seconds", "children_cpu_seconds", "items":
    {task: n}}}`` for one model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evals.lm_eval import evaluate, validate_tasks

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if device is not None:
        model.to(device)
    names = [t for tasks in TASKS.values() for t in tasks]
    task_manager = validate_tasks(names, tasks_dir(suite_dir))
    runs = {category: list(tasks) for category, tasks in TASKS.items()}
    runs["suite"] = names
    out: dict[str, dict] = {}
    for label, tasks in runs.items():
        start, cpu = time.perf_counter(), _cpu_seconds()
        res = evaluate(model, tokenizer, tasks, task_manager=task_manager, batch_size=batch_size)
        seconds = time.perf_counter() - start
        own, children = (after - before for after, before in zip(_cpu_seconds(), cpu, strict=True))
        out[label] = {
            "seconds": seconds,
            "cpu_seconds": own,
            "children_cpu_seconds": children,
            "items": {t: res.n_samples[t] for t in tasks},
        }
    return out


def _cpu_seconds() -> tuple[float, float]:
    """(user + system) CPU seconds of this process and of its waited-for children."""
    own, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evals.suite.timing",
        description="Time scoring the mergelab suite's test splits on one checkpoint.",
    )
    parser.add_argument("--model", type=Path, required=True, help="HF causal-LM checkpoint dir")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="suite seed")
    parser.add_argument("--suite", type=Path, default=None, help="default: default_suite_dir")
    parser.add_argument("--device", default=None, help="default: where the model loads (CPU)")
    args = parser.parse_args(argv)
    suite = build_suite(args.suite or default_suite_dir(args.seed), seed=args.seed)
    timings = time_suite(args.model, suite, batch_size=args.batch_size, device=args.device)
    print(f"suite {suite}, model {args.model}, batch size {args.batch_size}")
    print(f"  {'call':10s} {'wall s':>8s} {'cpu s':>8s} {'child s':>8s}  tasks (items)")
    for label, row in timings.items():
        items = ", ".join(f"{t.removeprefix('mergelab_')} ({n})" for t, n in row["items"].items())
        cpu, child = row["cpu_seconds"], row["children_cpu_seconds"]
        print(f"  {label:10s} {row['seconds']:8.1f} {cpu:8.1f} {child:8.1f}  {items}")
    per_category = [row for label, row in timings.items() if label != "suite"]
    sums = [sum(row[k] for row in per_category) for k in ("seconds", "cpu_seconds")]
    child = sum(row["children_cpu_seconds"] for row in per_category)
    print(f"  {'sum':10s} {sums[0]:8.1f} {sums[1]:8.1f} {child:8.1f}  (the per-category calls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
