"""Evaluate a merged model with lm-evaluation-harness (``lm_eval``).

Three entry points:

* :func:`validate_tasks` checks task names *before* any merging, so a typo fails in seconds
  rather than after an hour of merging. It returns the ``TaskManager`` it built; pass that
  to :func:`evaluate` to avoid indexing the task tree twice.
* :func:`evaluate` wraps the already-loaded model with ``lm_eval.models.huggingface.HFLM``
  (no second load from disk, no hub access) and runs ``lm_eval.simple_evaluate``
  (``eval.backend=hf``).
* :func:`evaluate_vllm` scores a saved checkpoint directory with lm-eval's vLLM model
  (``eval.backend=vllm``; ``evals.backends`` builds its arguments and checks the options),
  through the same task building, seeds and result reading.

Metric keys: lm-eval reports ``"<metric>,<filter>"`` (``"acc,none"``,
``"exact_match,strict-match"``). :class:`EvalResult` uses ``"<metric>"`` when the filter is
``"none"`` and ``"<metric>/<filter>"`` otherwise (``"acc"``, ``"exact_match/strict-match"``),
in lm-eval's order. Which metric is primary, its direction and its aggregation are read from
lm-eval's task and group configs (``EvalResult.metrics``), never guessed from names or order.

A broken model never scores: NaN/inf logits in any forward pass (hf backend), or a NaN/inf
per-sample log-likelihood or metric value in lm-eval's output (both backends), raise
:class:`NonFiniteScoreError` (lm-eval would otherwise count every NaN comparison as a hit).

This module is named ``lm_eval.py`` inside the ``evals`` package; ``import lm_eval`` here is an
absolute import (Python 3) and resolves to the installed library, never to this file.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import json
import logging
import math
import os
import random
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lm_eval
import numpy as np
import torch
from lm_eval.tasks import TaskManager

from core.calibration import free_memory

if TYPE_CHECKING:
    from lm_eval.api.group import Group
    from lm_eval.api.task import Task
    from lm_eval.models.huggingface import HFLM
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "EvalResult",
    "NonFiniteScoreError",
    "evaluate",
    "evaluate_vllm",
    "metric_key",
    "quiet_lm_eval_logging",
    "validate_tasks",
    "write_samples_jsonl",
]

log = logging.getLogger(__name__)

# Keys of an lm-eval results row that are bookkeeping, not metrics.
_NON_METRIC_KEYS = frozenset({"alias", "name", "sample_len", "sample_count", "samples"})

# Warnings about what mergelab does on purpose, dropped (all other lm-eval warnings still
# show): HFLM warns twice on every construction from an in-memory model, and the evaluator
# once per task whenever a few-shot count is passed explicitly (every task config does).
_EXPECTED_WARNINGS = {
    "lm_eval.models.huggingface": (
        "`pretrained` model kwarg is not of type `str`",
        "Passed an already-initialized model through `pretrained`",
    ),
    "lm_eval.evaluator": ("Overwriting default num_fewshot of",),
}


# --------------------------------------------------------------------------- logging


class _DropExpectedWarnings(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


_FILTERS = {name: _DropExpectedWarnings(prefixes) for name, prefixes in _EXPECTED_WARNINGS.items()}


class NonFiniteScoreError(ValueError):
    """NaN/inf logits, log-likelihoods or metric values: every score would be meaningless
    (lm-eval counts a NaN comparison as a hit), so evaluation stops instead."""


_NON_FINITE_CAUSES = (
    "Likely causes: the merged weights overflow (check the merge method's hyperparameters, "
    "e.g. a scaling or weights too large), or a member checkpoint holds bad weights."
)


def _few(names: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(names[:n])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > n else shown


def quiet_lm_eval_logging(level: int = logging.WARNING) -> None:
    """Set the ``lm_eval`` logger tree to ``level`` (default WARNING) and drop the warnings
    of :data:`_EXPECTED_WARNINGS`. Idempotent. Left alone if ``LMEVAL_LOG_LEVEL`` is set,
    so a user can still ask lm-eval for INFO/DEBUG output."""
    if not os.environ.get("LMEVAL_LOG_LEVEL"):
        logging.getLogger("lm_eval").setLevel(level)
    for name, dropper in _FILTERS.items():
        logger = logging.getLogger(name)
        if dropper not in logger.filters:
            logger.addFilter(dropper)


# --------------------------------------------------------------------------- task validation


def _normalize_include_path(include_path: str | os.PathLike | Sequence | None) -> list[str]:
    if include_path is None:
        return []
    raw = [include_path] if isinstance(include_path, (str, os.PathLike)) else list(include_path)
    paths: list[str] = []
    for p in raw:
        path = Path(p).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"lm-eval include_path {str(p)!r} does not exist (resolved against the working "
                f"directory {os.getcwd()!r}); pass the directory that holds your task YAML files"
            )
        if not path.is_dir():
            raise NotADirectoryError(
                f"lm-eval include_path {str(p)!r} is not a directory; lm-eval only indexes "
                "*.yaml files found under directories"
            )
        paths.append(str(path.resolve()))
    return paths


def _resolvable(name: str, index: Mapping[str, Any], _seen: frozenset[str] = frozenset()) -> bool:
    """True if ``name`` and everything a group refers to by name is in ``index``.

    Used to decide whether an index built from include_path alone is enough. Anything
    uncertain (a group member that is not in the index) answers False, which only costs a
    full index build, never a wrong answer.
    """
    entry = index.get(name)
    if entry is None:
        return False
    if entry.kind.name != "GROUP" or name in _seen:
        return True
    members = (entry.cfg or {}).get("task")
    if members is None:
        return True
    return _members_resolvable(members, index, _seen | {name})


def _members_resolvable(members: Any, index: Mapping[str, Any], seen: frozenset[str]) -> bool:
    for item in members if isinstance(members, list) else [members]:
        if isinstance(item, str):
            if not _resolvable(item, index, seen):
                return False
        elif isinstance(item, dict):
            if "group" in item and item["group"] not in index:  # inline subgroup
                if not _members_resolvable(item.get("task", []), index, seen):
                    return False
            elif not _resolvable(str(item.get("group", item.get("task"))), index, seen):
                return False
        else:
            return False
    return True


def _unindexable_yamls(paths: Sequence[str], limit: int = 10) -> list[str]:
    """YAML files under ``paths`` that lm-eval's indexer would skip (it only logs at DEBUG)."""
    from lm_eval.tasks._index import TaskIndex
    from lm_eval.tasks._yaml_loader import load_yaml

    bad: list[str] = []
    for root in paths:
        for yaml_path in sorted(Path(root).glob("**/*.yaml")):
            try:
                TaskIndex._kind_of(load_yaml(yaml_path, resolve_func=False, recursive=True))
            except Exception as err:  # we only report it
                bad.append(f"{yaml_path} ({type(err).__name__}: {err})")
                if len(bad) >= limit:
                    return bad
    return bad


def _check_task_names(
    tasks: Sequence[str], task_manager: TaskManager, include_paths: Sequence[str]
) -> None:
    known = task_manager.task_index
    unknown = [t for t in tasks if t not in known]
    if not unknown:
        return
    all_names = task_manager.all_tasks
    lines = []
    for name in unknown:
        close = difflib.get_close_matches(name, all_names, n=5, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else "; no close matches"
        lines.append(f"  - {name!r}{hint}")
    where = (
        f"lm-eval's built-in tasks and include_path {list(include_paths)}"
        if include_paths
        else "lm-eval's built-in tasks (no include_path given)"
    )
    msg = (
        f"Unknown lm-eval task/group/tag name(s) ({len(all_names)} names known from {where}):\n"
        + "\n".join(lines)
        + "\nFix: check the spelling, or pass include_path=<directory holding the task YAML> "
        "for a custom task."
    )
    if include_paths:
        bad = _unindexable_yamls(include_paths)
        if bad:
            msg += "\nThese YAML files under include_path could not be indexed:\n  " + "\n  ".join(
                bad
            )
    raise ValueError(msg)


def _as_task_list(tasks: str | Sequence[str]) -> list[str]:
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise ValueError("No lm-eval tasks requested")
    for name in names:
        if not isinstance(name, str) or not name:
            raise TypeError(f"lm-eval task names must be non-empty strings, got {name!r}")
    return names


def validate_tasks(
    tasks: str | Sequence[str],
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> TaskManager:
    """Check that every name in ``tasks`` is a known lm-eval task, group or tag.

    Returns the ``lm_eval.tasks.TaskManager`` used, to hand to :func:`evaluate`
    (``task_manager=``). Only the YAML index is built; no dataset is downloaded.

    Cost: if ``include_path`` is given and every name (including the members of requested
    groups) is defined there, only include_path is indexed (milliseconds) and the returned
    manager knows only those tasks. Otherwise lm-eval's ~15k built-in names are indexed
    too (several seconds).

    Raises:
        FileNotFoundError / NotADirectoryError: an include_path entry is missing / a file.
        ValueError: an unknown name; the message lists close matches and the fix.
    """
    quiet_lm_eval_logging()
    names = _as_task_list(tasks)
    paths = _normalize_include_path(include_path)
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(_resolvable(n, local.task_index) for n in names):
            return local
    manager = TaskManager(include_path=paths or None)
    _check_task_names(names, manager, paths)
    return manager


# --------------------------------------------------------------------------- results


@dataclass
class EvalResult:
    """What one :func:`evaluate` call produced; every field is JSON-serialisable.

    Attributes:
        scores: ``{task_or_group: {metric_key: value}}`` in lm-eval's order. ``metric_key`` is
            ``"acc"`` for filter ``"none"``, else ``"<metric>/<filter>"``. Groups with an
            ``aggregate_metric_list`` get a row.
        stderr: same keys as ``scores``; ``None`` where lm-eval gives no stderr ("N/A").
        metrics: ``{task_or_group: {metric_key: {"value", "stderr", "higher_is_better",
            "aggregation", "primary"}}}``, same keys and order as ``scores``.
            ``higher_is_better`` is lm-eval's (``None`` where a group's members disagree).
            ``aggregation`` names the aggregation lm-eval applied (``"mean"``,
            ``"weighted_perplexity"``; a ``!function`` aggregation's function name; ``None``
            for a metric the task config defines none for). Exactly one ``primary`` per row:
            for a task, the first ``metric_list`` entry (the output type's default metrics
            without one) under the first ``filter_list`` filter (``"none"`` without one);
            for a group, the first ``aggregate_metric_list`` entry (under its first filter).
            If lm-eval reported no value for that metric, the first one reported is primary.
        samples: ``{task: [per-sample dict]}`` (empty lists if ``log_samples=False``). One entry
            per (doc, filter): a task with two filters has two entries per doc. Each has
            lm-eval's keys: ``doc_id, doc, target, arguments, resps, filtered_resps, filter,
            metrics`` (names), one key per metric with its per-sample value, and hashes.
        n_samples: docs evaluated per task (after ``limit``); for groups, the sum over members.
        n_samples_total: docs in each task's evaluation split (before ``limit``).
        n_shot: few-shot count per task/group as lm-eval ran it (a group's only when all
            its members share one).
        groups: ``{group: {"subtasks", "weight_by_size", "aggregation"}}`` for each requested
            group lm-eval aggregates (one with an ``aggregate_metric_list``): the leaf tasks
            its score averages over, and its first aggregate entry's weighting and
            aggregation. Read from the ``Group`` objects built for the run (lm-eval's output
            has no group configs).
        group_subtasks: ``{group: [direct member names]}`` (lm-eval's); empty when no group
            was requested.
        configs: the task configs lm-eval reports (YAML after overrides), per task.
        lm_eval_version: the installed lm-eval version.
    """

    scores: dict[str, dict[str, float]]
    stderr: dict[str, dict[str, float | None]]
    samples: dict[str, list[dict[str, Any]]]
    n_samples: dict[str, int]
    metrics: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    n_samples_total: dict[str, int] = field(default_factory=dict)
    n_shot: dict[str, int] = field(default_factory=dict)
    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    group_subtasks: dict[str, list[str]] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    lm_eval_version: str = ""

    def primary(self, task: str) -> tuple[str, float]:
        """``(metric_key, value)`` of ``task``'s primary metric (see ``metrics``)."""
        for key, metric in self.metrics.get(task, {}).items():
            if metric["primary"]:
                return key, metric["value"]
        raise KeyError(f"no scores for {task!r}; have {sorted(self.scores)}")

    def to_dict(self, *, include_samples: bool = False) -> dict[str, Any]:
        """A JSON-ready dict (samples left out unless asked for: they can be large)."""
        return copy.deepcopy(
            {
                f.name: getattr(self, f.name)
                for f in fields(self)
                if include_samples or f.name != "samples"
            }
        )


def metric_key(metric: str, filter_name: str) -> str:
    """Our key for lm-eval's ``"<metric>,<filter>"``: ``metric`` or ``metric/filter``."""
    return metric if filter_name == "none" else f"{metric}/{filter_name}"


def _to_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return None
    return float(value)


def _parse_row(row: Mapping[str, Any]) -> list[tuple[str, str, float, float | None]]:
    """``(metric, filter, value, stderr)`` of each numeric metric in an lm-eval results row,
    in lm-eval's order (``stderr`` ``None`` where lm-eval gives "N/A")."""
    pairs: dict[tuple[str, str], Any] = {}
    for key, value in row.items():
        if key in _NON_METRIC_KEYS or "," not in key:
            continue
        metric, filter_name = key.split(",", 1)
        pairs[(metric, filter_name)] = value
    stderr_pairs = {
        (m, f) for (m, f) in pairs if m.endswith("_stderr") and (m[: -len("_stderr")], f) in pairs
    }
    out: list[tuple[str, str, float, float | None]] = []
    for (metric, filter_name), value in pairs.items():
        number = _to_float(value)
        if (metric, filter_name) in stderr_pairs or number is None:
            continue  # a stderr, or non-numeric (e.g. a dict or string metric): not a score
        err = _to_float(pairs.get((f"{metric}_stderr", filter_name)))
        out.append((metric, filter_name, number, err))
    return out


def _jsonable(obj: Any) -> Any:
    """Recursively convert lm-eval output (tuples, numpy scalars, tensors) to JSON types."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    return str(obj)


def _aggregation_name(fn: Any) -> str | None:
    """A registered aggregation's name (``"mean"``, ``"weighted_perplexity"``), else the
    function's own name (a ``!function`` aggregation)."""
    if fn is None or isinstance(fn, str):
        return fn
    from lm_eval.api.registry import AGGREGATION_REGISTRY

    registered = {AGGREGATION_REGISTRY.get(name): name for name in AGGREGATION_REGISTRY.keys()}
    return registered.get(fn, getattr(fn, "__name__", str(fn)))


def _task_semantics(task: Task) -> tuple[tuple[str, str | None], dict[str, str | None]]:
    """``((primary metric, its filter), {metric: aggregation name})`` from a task's config."""
    config = task.config
    if config.metric_list:
        first = config.metric_list[0]["metric"]
        metric = first if isinstance(first, str) else first.__name__  # a !function metric
    else:  # the output type's default metrics, which lm-eval lists in task.aggregation()
        metric = next(iter(task.aggregation()))
    filter_name = config.filter_list[0]["name"] if config.filter_list else "none"
    aggregations = {m: _aggregation_name(fn) for m, fn in task.aggregation().items()}
    return (metric, filter_name), aggregations


def _group_semantics(group: Group) -> tuple[tuple[str, str | None], dict[str, str | None]]:
    """Like :func:`_task_semantics` from a group's ``aggregate_metric_list`` (a filter of
    ``None``: lm-eval aggregates every filter it finds, so the first one reported)."""
    entries = group.aggregate_metric_list or []
    first = entries[0]
    aggregations: dict[str, str | None] = {}
    for entry in entries:
        aggregations.setdefault(entry.metric, _aggregation_name(entry.aggregation))
    return (first.metric, first.filter_list[0] if first.filter_list else None), aggregations


def _all_finite(obj: Any) -> bool:
    """False if any float inside ``obj`` (nested lists/tuples) is NaN/inf; others ignored."""
    if isinstance(obj, (list, tuple)):
        return all(_all_finite(v) for v in obj)
    if isinstance(obj, (float, np.floating)):
        return math.isfinite(obj)
    return True


def _check_finite_results(raw: Mapping[str, Any]) -> None:
    """Raise :class:`NonFiniteScoreError` for a NaN/inf per-sample log-likelihood (a float in
    a sample's ``resps``) or aggregated metric value, naming the task and doc / metric."""
    configs = raw.get("configs", {})
    for task, task_samples in (raw.get("samples") or {}).items():
        for sample in task_samples:
            if not _all_finite(sample["resps"]):
                raise NonFiniteScoreError(
                    f"task {task!r} ({configs[task]['output_type']}): doc {sample['doc_id']} "
                    f"got a NaN/inf log-likelihood. {_NON_FINITE_CAUSES}"
                )
    for name, row in raw.get("results", {}).items():
        for metric, filter_name, value, _ in _parse_row(row):
            if not math.isfinite(value):
                raise NonFiniteScoreError(
                    f"task {name!r}: metric {metric_key(metric, filter_name)!r} is {value}. "
                    f"{_NON_FINITE_CAUSES}"
                )


def _build_result(
    raw: Mapping[str, Any],
    tasks: Mapping[str, Task],
    groups: Mapping[str, Group],
    requested: Sequence[str],
) -> EvalResult:
    """An :class:`EvalResult` from lm-eval's output and the Task / Group objects it ran."""
    hib = raw.get("higher_is_better", {})
    scores: dict[str, dict[str, float]] = {}
    stderr: dict[str, dict[str, float | None]] = {}
    metrics: dict[str, dict[str, dict[str, Any]]] = {}
    n_samples: dict[str, int] = {}
    for name, row in raw.get("results", {}).items():
        parsed = _parse_row(row)
        if not parsed and name in groups:
            continue  # a group without aggregate_metric_list: lm-eval reports no numbers
        (want, want_filter), aggregations = (
            _group_semantics(groups[name]) if name in groups else _task_semantics(tasks[name])
        )
        primary = next(
            (
                i
                for i, (metric, filter_name, _, _) in enumerate(parsed)
                if metric == want and want_filter in (None, filter_name)
            ),
            0,
        )
        metrics[name] = {
            metric_key(metric, filter_name): {
                "value": value,
                "stderr": err,
                "higher_is_better": hib.get(name, {}).get(metric),
                "aggregation": aggregations.get(metric),
                "primary": i == primary,
            }
            for i, (metric, filter_name, value, err) in enumerate(parsed)
        }
        scores[name] = {k: m["value"] for k, m in metrics[name].items()}
        stderr[name] = {k: m["stderr"] for k, m in metrics[name].items()}
        if "sample_len" in row:
            n_samples[name] = int(row["sample_len"])
    n_total: dict[str, int] = {}
    for name, counts in raw.get("n-samples", {}).items():
        n_samples.setdefault(name, int(counts["effective"]))
        n_total[name] = int(counts["original"])

    requested_groups: dict[str, dict[str, Any]] = {}
    for name in requested:
        group = groups.get(name)
        if group is not None and group.has_aggregation:
            first = (group.aggregate_metric_list or [])[0]
            requested_groups[name] = {
                "subtasks": [t.task_name for t in group.get_all_tasks()],
                "weight_by_size": bool(first.weight_by_size),
                "aggregation": _aggregation_name(first.aggregation),
            }

    samples = {
        task: [_jsonable(s) for s in task_samples]
        for task, task_samples in (raw.get("samples") or {}).items()
    }
    for task in raw.get("configs", {}):
        samples.setdefault(task, [])

    return EvalResult(
        scores=scores,
        stderr=stderr,
        samples=samples,
        n_samples=n_samples,
        metrics=metrics,
        n_samples_total=n_total,
        n_shot={k: int(v) for k, v in raw.get("n-shot", {}).items() if v is not None},
        groups=requested_groups,
        group_subtasks={k: list(v) for k, v in raw.get("group_subtasks", {}).items()},
        configs=_jsonable(raw.get("configs", {})),
        lm_eval_version=str(raw.get("lm_eval_version") or lm_eval.__version__),
    )


# --------------------------------------------------------------------------- evaluation


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        if a.type == "cuda":
            current = torch.cuda.current_device()
            return (a.index if a.index is not None else current) == (
                b.index if b.index is not None else current
            )
        return True
    return a.index == b.index


@contextlib.contextmanager
def _preserve_global_rng() -> Iterator[None]:
    """simple_evaluate re-seeds python/numpy/torch globally; restore the caller's state."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextlib.contextmanager
def _no_datasets_download_ping() -> Iterator[None]:
    """``datasets.load_dataset`` of a packaged builder (``json``, ``csv``...) sends a HEAD
    request to S3 to count downloads (``HF_UPDATE_DOWNLOAD_COUNTS``), even for local files; on
    an offline machine that is a DNS lookup + timeout per task. Turn it off for our call."""
    try:
        import datasets.config as datasets_config
    except ImportError:  # pragma: no cover - lm-eval depends on datasets
        yield
        return
    old = getattr(datasets_config, "HF_UPDATE_DOWNLOAD_COUNTS", None)
    datasets_config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        yield
    finally:
        datasets_config.HF_UPDATE_DOWNLOAD_COUNTS = old


@contextlib.contextmanager
def _no_cwd_git_probe() -> Iterator[None]:
    """``simple_evaluate`` records ``git describe`` of the *working directory* and lets git
    print "fatal: not a git repository" when it is not one. The record keeps mergelab's own
    commit instead (:func:`harness.records.versions`), so skip the probe for our call."""
    import lm_eval.evaluator as evaluator

    old = evaluator.get_git_commit_hash
    evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = old


@functools.cache
def _checked_hflm() -> type[HFLM]:
    """``HFLM`` that records the request type and tasks in flight, for the non-finite logits
    error (built on first use: importing HFLM pulls in transformers)."""
    from lm_eval.models.huggingface import HFLM

    class CheckedHFLM(HFLM):
        in_flight: tuple[str, list[str]] = ("no", [])  # (request type, task names)

        def _track(self, kind: str, run: Any, requests: list[Any], disable_tqdm: bool) -> Any:
            self.in_flight = (kind, sorted({r.task_name for r in requests if r.task_name}))
            return run(requests, disable_tqdm=disable_tqdm)

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> Any:
            return self._track("loglikelihood", super().loglikelihood, requests, disable_tqdm)

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> Any:
            run = super().loglikelihood_rolling
            return self._track("loglikelihood_rolling", run, requests, disable_tqdm)

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> Any:
            return self._track("generate_until", super().generate_until, requests, disable_tqdm)

    return CheckedHFLM


@contextlib.contextmanager
def _fail_on_non_finite_logits(lm: Any) -> Iterator[None]:
    """While open, NaN/inf logits in any forward pass of ``lm.model`` raise
    :class:`NonFiniteScoreError` naming the request type and the tasks in flight. A forward
    hook costing one ``isfinite().all()`` per forward; removed on exit."""

    def check(module: torch.nn.Module, args: Any, output: Any) -> None:
        if not torch.isfinite(output.logits).all():
            kind, tasks = lm.in_flight
            raise NonFiniteScoreError(
                f"NaN/inf logits while lm-eval ran {kind} requests of task(s) {_few(tasks)}: "
                "every score would be meaningless (lm-eval counts NaN comparisons as hits), "
                f"so evaluation stopped. {_NON_FINITE_CAUSES}"
            )

    handle = lm.model.register_forward_hook(check)
    try:
        yield
    finally:
        handle.remove()


def _check_limit(limit: int | float | None) -> int | float | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise TypeError(f"limit must be an int, a float fraction or None, got {limit!r}")
    if isinstance(limit, float):
        if not (0.0 < limit <= 1.0) or math.isnan(limit):
            raise ValueError(f"a float limit is a fraction in (0, 1], got {limit}")
        # lm-eval reads limit >= 1.0 as a doc count (1.0 -> one doc); 1.0 here means "all".
        return None if limit == 1.0 else limit
    if limit < 1:
        raise ValueError(f"an int limit is a number of docs >= 1, got {limit}")
    return limit


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: str | Sequence[str],
    *,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    task_manager: TaskManager | None = None,
    num_fewshot: int | Mapping[str, int] | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    device: str | torch.device | None = None,
    max_length: int | None = None,
    seed: int | None = 0,
    log_samples: bool = True,
    gen_kwargs: dict[str, Any] | str | None = None,
    bootstrap_iters: int = 100_000,
) -> EvalResult:
    """Run lm-eval on an already-loaded causal LM and its tokenizer.

    Args:
        model: a ``transformers`` model object, used as is (weights are not reloaded and
            nothing is fetched from the hub). lm-eval calls ``model.eval()`` and
            ``model.tie_weights()`` on it.
        tokenizer: the matching tokenizer object. lm-eval sets ``pad_token`` on it if it has
            none (from unk/eos, else it adds a token).
        tasks: task/group/tag names (a str for one).
        include_path: directory(ies) with custom task YAML (used when no ``task_manager``
            is given, or it lacks a requested name).
        task_manager: the manager :func:`validate_tasks` returned (avoids re-indexing).
        num_fewshot: override every task's few-shot count (None = task default, else 0;
            lm-eval never overrides a task whose YAML sets ``num_fewshot: 0``), or a mapping
            ``{task_or_group: count}`` that sets each named entry (every member of a group)
            to its count, even over a YAML's 0; unnamed tasks keep their defaults.
        limit: first N docs per task (int), or a fraction in (0, 1] of each task's docs.
        batch_size: int, or lm-eval's ``"auto"`` / ``"auto:N"``.
        device: where to run. ``None`` = wherever the model already is. HFLM ignores
            ``device`` for an in-memory model, so if the model is elsewhere it is moved
            (``model.to(device)``, in place) with a warning.
        max_length: context length limit; None = from the model config (else 2048).
        seed: seeds python/numpy/torch and lm-eval's few-shot sampler; None = lm-eval's
            defaults (0/1234/1234/1234). The caller's global RNG state is restored after.
        log_samples: keep per-sample outputs in ``EvalResult.samples``.
        gen_kwargs: generation overrides for generate_until tasks (dict or "k=v,k=v").
        bootstrap_iters: lm-eval's bootstrap resamples for stderr of non-mean metrics
            (mean metrics such as acc / exact_match use a closed form); 0 = no stderr.

    Raises:
        NonFiniteScoreError: NaN/inf logits in a forward pass (naming the request type and
            the tasks in flight), or a NaN/inf per-sample log-likelihood or metric value in
            lm-eval's output (naming the task and doc / metric).
    """
    request = _checked_request(tasks, limit, task_manager, include_path)

    if device is not None:
        target = torch.device(device)
        if not _same_device(torch.device(model.device), target):
            log.warning("Moving model from %s to %s for evaluation", model.device, target)
            model.to(target)

    lm = _checked_hflm()(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=max_length,
        # log-softmax in float32 even for bf16/fp16 models: loglikelihood comparisons between
        # merged models should not hinge on half-precision rounding.
        softmax_dtype=torch.float32,
    )
    with _fail_on_non_finite_logits(lm):
        return _score(
            lm,
            request,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            device=str(lm.device),
            seed=seed,
            log_samples=log_samples,
            gen_kwargs=gen_kwargs,
            bootstrap_iters=bootstrap_iters,
        )


def evaluate_vllm(
    model_args: Mapping[str, Any],
    tasks: str | Sequence[str],
    *,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    task_manager: TaskManager | None = None,
    num_fewshot: int | Mapping[str, int] | None = None,
    limit: int | float | None = None,
    seed: int | None = 0,
    log_samples: bool = True,
    gen_kwargs: dict[str, Any] | str | None = None,
    bootstrap_iters: int = 100_000,
) -> EvalResult:
    """Score a checkpoint directory with lm-eval's vLLM model (``"vllm"``, ``VLLM``).

    ``model_args`` are ``VLLM``'s keyword arguments (``pretrained=<dir>``, dtype, parallel
    sizes, batch size...; :func:`evals.backends.vllm_model_args` builds them from the
    config). Everything else is :func:`evaluate`'s: the same task building, per-task
    few-shot counts, limit, seeds, generation overrides and samples, read into the same
    :class:`EvalResult`. Differences: the model and tokenizer are loaded by vLLM from the
    directory, and NaN/inf is caught in the per-sample log-likelihoods and metrics only
    (vLLM's forward passes cannot be hooked). The engine is shut down and its GPU memory
    released before returning, so a sweep in one process can start the next cell's.
    """
    from lm_eval.api.registry import get_model

    request = _checked_request(tasks, limit, task_manager, include_path)
    lm = get_model("vllm").create_from_arg_obj(dict(model_args))
    try:
        return _score(
            lm,
            request,
            num_fewshot=num_fewshot,
            batch_size=None,  # VLLM took it from model_args
            device=None,  # vLLM picks its GPUs from CUDA_VISIBLE_DEVICES
            seed=seed,
            log_samples=log_samples,
            gen_kwargs=gen_kwargs,
            bootstrap_iters=bootstrap_iters,
        )
    finally:
        _release_vllm(lm)


@dataclass(frozen=True)
class _Request:
    """What to score, checked before any model is loaded: the task names, a manager that
    knows them all, and the doc limit as lm-eval takes it."""

    names: list[str]
    task_manager: TaskManager
    limit: int | float | None


def _checked_request(
    tasks: str | Sequence[str],
    limit: int | float | None,
    task_manager: TaskManager | None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None,
) -> _Request:
    """Quiet lm-eval's logging and check ``tasks`` and ``limit`` (either backend)."""
    quiet_lm_eval_logging()
    names = _as_task_list(tasks)
    limit = _check_limit(limit)
    return _Request(names, _manager_for(names, task_manager, include_path), limit)


def _manager_for(
    names: Sequence[str],
    task_manager: TaskManager | None,
    include_path: str | os.PathLike | Sequence[str | os.PathLike] | None,
) -> TaskManager:
    """``task_manager`` if it knows every name, else one that does (or an error naming the
    unknown ones): :func:`validate_tasks` may have indexed only include_path."""
    if task_manager is not None and all(_resolvable(n, task_manager.task_index) for n in names):
        return task_manager
    if task_manager is not None and include_path is None:
        include_path = task_manager.include_path
    return validate_tasks(names, include_path)


def _score(
    lm: Any,
    request: _Request,
    *,
    num_fewshot: int | Mapping[str, int] | None,
    batch_size: int | str | None,
    device: str | None,
    seed: int | None,
    log_samples: bool,
    gen_kwargs: dict[str, Any] | str | None,
    bootstrap_iters: int,
) -> EvalResult:
    """Run ``lm_eval.simple_evaluate`` with an LM object (either backend): build the tasks,
    seed everything from ``seed``, check the output finite and read it."""
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED

    names, task_manager = request.names, request.task_manager

    random_seed = DEFAULT_RANDOM_SEED if seed is None else seed
    other_seed = DEFAULT_OTHER_SEED if seed is None else seed
    counts: Mapping[str, int] = {}
    if isinstance(num_fewshot, Mapping):
        counts, num_fewshot = num_fewshot, None
    with _preserve_global_rng(), _no_datasets_download_ping(), _no_cwd_git_probe():
        specs, built_tasks, built_groups = _build_specs(names, counts, task_manager)
        raw = lm_eval.simple_evaluate(
            model=lm,
            tasks=specs,
            task_manager=task_manager,
            num_fewshot=num_fewshot,
            limit=request.limit,
            batch_size=batch_size,
            device=device,
            log_samples=log_samples,
            gen_kwargs=gen_kwargs,
            bootstrap_iters=bootstrap_iters,
            random_seed=random_seed,
            numpy_random_seed=other_seed,
            torch_random_seed=other_seed,
            fewshot_random_seed=other_seed,
        )
    if raw is None:  # only non-zero ranks get None; we always run single-process
        raise RuntimeError("lm_eval.simple_evaluate returned no results")
    _check_finite_results(raw)
    return _build_result(raw, built_tasks, built_groups, names)


def _release_vllm(lm: Any) -> None:
    """Shut ``lm``'s vLLM engine down and free its GPU memory (best effort: a failure only
    warns, since the scores are already read)."""
    import gc
    import sys

    # VLLM keeps its vllm.LLM as the instance attribute ``model`` (none with
    # data_parallel_size > 1: ray workers own the engines); dropping it stops the engine.
    vars(lm).pop("model", None)
    gc.collect()
    if sys.modules.get("vllm") is not None:
        try:
            from vllm.distributed.parallel_state import (
                destroy_distributed_environment,
                destroy_model_parallel,
            )

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception as err:  # any failure here must not fail a scored cell
            log.warning("vLLM's parallel state was not torn down (%s: %s)", type(err).__name__, err)
    free_memory()


def _build_specs(
    names: Sequence[str], counts: Mapping[str, int], task_manager: TaskManager
) -> tuple[list[Task | Group], dict[str, Task], dict[str, Group]]:
    """Build each requested name's Task / Group objects (``simple_evaluate`` runs them as
    they are), giving every leaf task of a name in ``counts`` that few-shot count. Returns
    them in request order, plus every Task and Group built, by name: the configs the
    record's metric semantics are read from."""
    unknown = sorted(set(counts) - set(names))
    if unknown:
        raise ValueError(
            f"num_fewshot names {unknown}, which are not among the requested tasks {list(names)}; "
            "per-task few-shot counts must use the task (or group) names of task.tasks"
        )
    for name, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"num_fewshot[{name!r}] must be an int >= 0, got {count!r}")
    specs: list[Task | Group] = []
    tasks: dict[str, Task] = {}
    groups: dict[str, Group] = {}
    for name in names:
        loaded = task_manager.load(name)
        if name in counts:
            for task in loaded["tasks"].values():
                task.set_config(key="num_fewshot", value=counts[name])
        tasks.update(loaded["tasks"])
        groups.update(loaded["groups"])
        group = loaded["groups"].get(name)
        specs.extend([group] if group is not None else loaded["tasks"].values())
    return specs, tasks, groups


# --------------------------------------------------------------------------- samples file


def write_samples_jsonl(
    samples: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike
) -> Path:
    """Write ``{task: [sample, ...]}`` as JSON lines, each with a leading ``"task"`` key.

    Atomic: written to a temporary file in the same directory, then ``os.replace``d, so a
    reader never sees a half-written file. Parent directories are created. Returns the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for task, task_samples in samples.items():
                for sample in task_samples:
                    record = {"task": task, **{k: v for k, v in sample.items() if k != "task"}}
                    fh.write(json.dumps(_jsonable(record), ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
