"""Evaluate an in-memory ``transformers`` model with lm-evaluation-harness (``lm_eval``).

Two entry points:

* :func:`validate_tasks` checks task names *before* any merging, so a typo fails in seconds
  rather than after an hour of merging. It returns the ``TaskManager`` it built; pass that
  to :func:`evaluate` to avoid indexing the task tree twice.
* :func:`evaluate` wraps the already-loaded model with ``lm_eval.models.huggingface.HFLM``
  (no second load from disk, no hub access) and runs ``lm_eval.simple_evaluate``.

Metric keys: lm-eval reports ``"<metric>,<filter>"`` (``"acc,none"``,
``"exact_match,strict-match"``). :class:`EvalResult` uses ``"<metric>"`` when the filter is
``"none"`` and ``"<metric>/<filter>"`` otherwise (``"acc"``, ``"exact_match/strict-match"``),
in lm-eval's order, so the first key of a task's scores is the metric lm-eval lists first.

This module is named ``lm_eval.py`` inside the ``evals`` package; ``import lm_eval`` here is an
absolute import (Python 3) and resolves to the installed library, never to this file.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
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

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "EvalResult",
    "evaluate",
    "metric_key",
    "quiet_lm_eval_logging",
    "validate_tasks",
    "write_samples_jsonl",
]

log = logging.getLogger(__name__)

# Keys of an lm-eval results row that are bookkeeping, not metrics.
_NON_METRIC_KEYS = frozenset({"alias", "name", "sample_len", "sample_count", "samples"})

# HFLM warns twice on every construction from an in-memory model; that is our design, not a
# problem, so these two messages are dropped (all other lm-eval warnings still show).
_EXPECTED_HFLM_WARNINGS = (
    "`pretrained` model kwarg is not of type `str`",
    "Passed an already-initialized model through `pretrained`",
)


# --------------------------------------------------------------------------- logging


class _DropExpectedHFLMWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(msg.startswith(prefix) for prefix in _EXPECTED_HFLM_WARNINGS)


_HFLM_FILTER = _DropExpectedHFLMWarnings()


def quiet_lm_eval_logging(level: int = logging.WARNING) -> None:
    """Set the ``lm_eval`` logger tree to ``level`` (default WARNING) and drop HFLM's
    "pre-initialized model" warnings. Idempotent. Left alone if ``LMEVAL_LOG_LEVEL`` is set,
    so a user can still ask lm-eval for INFO/DEBUG output."""
    if not os.environ.get("LMEVAL_LOG_LEVEL"):
        logging.getLogger("lm_eval").setLevel(level)
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    if _HFLM_FILTER not in hf_logger.filters:
        hf_logger.addFilter(_HFLM_FILTER)


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
        scores: ``{task_or_group: {metric_key: value}}`` in lm-eval's order (first key = the
            metric lm-eval lists first). ``metric_key`` is ``"acc"`` for filter ``"none"``,
            else ``"<metric>/<filter>"``. Groups with an ``aggregate_metric_list`` get a row.
        stderr: same keys as ``scores``; ``None`` where lm-eval gives no stderr ("N/A").
        samples: ``{task: [per-sample dict]}`` (empty lists if ``log_samples=False``). One entry
            per (doc, filter): a task with two filters has two entries per doc. Each has
            lm-eval's keys: ``doc_id, doc, target, arguments, resps, filtered_resps, filter,
            metrics`` (names), one key per metric with its per-sample value, and hashes.
        n_samples: docs evaluated per task (after ``limit``); for groups, the sum over members.
        n_samples_total: docs in each task's evaluation split (before ``limit``).
        higher_is_better: ``{task_or_group: {metric_key: bool | None}}``.
        n_shot: few-shot count per task/group as lm-eval ran it.
        group_subtasks: ``{group: [member names]}``; empty when no group was requested.
        configs: the task configs lm-eval reports (YAML after overrides), per task.
        lm_eval_version: the installed lm-eval version.
    """

    scores: dict[str, dict[str, float]]
    stderr: dict[str, dict[str, float | None]]
    samples: dict[str, list[dict[str, Any]]]
    n_samples: dict[str, int]
    n_samples_total: dict[str, int] = field(default_factory=dict)
    higher_is_better: dict[str, dict[str, bool | None]] = field(default_factory=dict)
    n_shot: dict[str, int] = field(default_factory=dict)
    group_subtasks: dict[str, list[str]] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    lm_eval_version: str = ""

    def primary(self, task: str) -> tuple[str, float]:
        """``(metric_key, value)`` of the first metric lm-eval reports for ``task``."""
        if not self.scores.get(task):
            raise KeyError(f"no scores for {task!r}; have {sorted(self.scores)}")
        return next(iter(self.scores[task].items()))

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


def _parse_row(row: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, float | None]]:
    pairs: dict[tuple[str, str], Any] = {}
    for key, value in row.items():
        if key in _NON_METRIC_KEYS or "," not in key:
            continue
        metric, filter_name = key.split(",", 1)
        pairs[(metric, filter_name)] = value
    scores: dict[str, float] = {}
    stderr: dict[str, float | None] = {}
    stderr_pairs = {
        (m, f) for (m, f) in pairs if m.endswith("_stderr") and (m[: -len("_stderr")], f) in pairs
    }
    for (metric, filter_name), value in pairs.items():
        if (metric, filter_name) in stderr_pairs:
            continue
        number = _to_float(value)
        if number is None:  # non-numeric (e.g. a dict or string metric): not a score
            continue
        key = metric_key(metric, filter_name)
        scores[key] = number
        err = pairs.get((f"{metric}_stderr", filter_name))
        stderr[key] = _to_float(err)
    return scores, stderr


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


def _build_result(raw: Mapping[str, Any]) -> EvalResult:
    results = raw.get("results", {})
    groups = set(raw.get("group_subtasks", {}))
    scores: dict[str, dict[str, float]] = {}
    stderr: dict[str, dict[str, float | None]] = {}
    n_samples: dict[str, int] = {}
    for name, row in results.items():
        row_scores, row_stderr = _parse_row(row)
        if not row_scores and name in groups:
            continue  # a group without aggregate_metric_list: lm-eval reports no numbers
        scores[name] = row_scores
        stderr[name] = row_stderr
        if "sample_len" in row:
            n_samples[name] = int(row["sample_len"])
    n_total: dict[str, int] = {}
    for name, counts in raw.get("n-samples", {}).items():
        n_samples.setdefault(name, int(counts["effective"]))
        n_total[name] = int(counts["original"])

    higher: dict[str, dict[str, bool | None]] = {}
    for name, row_scores in scores.items():
        hib = raw.get("higher_is_better", {}).get(name, {})
        higher[name] = {k: hib.get(k.split("/", 1)[0]) for k in row_scores}

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
        n_samples_total=n_total,
        higher_is_better=higher,
        n_shot={k: int(v) for k, v in raw.get("n-shot", {}).items() if v is not None},
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
    """
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED
    from lm_eval.models.huggingface import HFLM

    quiet_lm_eval_logging()
    names = _as_task_list(tasks)
    limit = _check_limit(limit)
    if task_manager is None or not all(_resolvable(n, task_manager.task_index) for n in names):
        # No manager, or one built for other names (validate_tasks may have indexed only
        # include_path): build one that knows these names, or raise naming the unknown ones.
        if task_manager is not None and include_path is None:
            include_path = task_manager.include_path
        task_manager = validate_tasks(names, include_path)

    if device is not None:
        target = torch.device(device)
        if not _same_device(torch.device(model.device), target):
            log.warning("Moving model from %s to %s for evaluation", model.device, target)
            model.to(target)

    random_seed = DEFAULT_RANDOM_SEED if seed is None else seed
    other_seed = DEFAULT_OTHER_SEED if seed is None else seed

    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=max_length,
        # log-softmax in float32 even for bf16/fp16 models: loglikelihood comparisons between
        # merged models should not hinge on half-precision rounding.
        softmax_dtype=torch.float32,
    )
    with _preserve_global_rng(), _no_datasets_download_ping():
        specs: list[Any] = list(names)
        if isinstance(num_fewshot, Mapping):
            specs = _with_fewshot(names, num_fewshot, task_manager)
            num_fewshot = None
        raw = lm_eval.simple_evaluate(
            model=lm,
            tasks=specs,
            task_manager=task_manager,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            device=str(lm.device),
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
    return _build_result(raw)


def _with_fewshot(
    names: Sequence[str], counts: Mapping[str, int], task_manager: TaskManager
) -> list[Any]:
    """``names`` with each one in ``counts`` replaced by its built Task / Group objects whose
    leaf tasks carry that few-shot count (lm-eval's ``simple_evaluate`` takes both)."""
    unknown = sorted(set(counts) - set(names))
    if unknown:
        raise ValueError(
            f"num_fewshot names {unknown}, which are not among the requested tasks {list(names)}; "
            "per-task few-shot counts must use the task (or group) names of task.tasks"
        )
    specs: list[Any] = []
    for name in names:
        if name not in counts:
            specs.append(name)
            continue
        count = counts[name]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"num_fewshot[{name!r}] must be an int >= 0, got {count!r}")
        loaded = task_manager.load(name)
        for task in loaded["tasks"].values():
            task.set_config(key="num_fewshot", value=count)
        specs.append(loaded["groups"].get(name) or list(loaded["tasks"].values()))
    return [s for spec in specs for s in (spec if isinstance(spec, list) else [spec])]


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
