"""Cell ids, atomic result records and resume.

A cell is one resolved configuration (method × pool × tasks × eval × seed × device). Its
id is a hash of exactly those parts, so the same cell in two sweeps is the same directory
``<runs_dir>/<cell_id>/`` and is computed once. ``result.json`` is written last and
atomically: a cell with a complete result is finished; anything else (no record, a torn
one, ``status: "failed"`` with its ``error``) is redone.

``result.json`` schema 2 (``SCHEMA``) carries each score's meaning with it, so readers
never guess a metric's direction from its name or the primary metric from key order::

    "metrics": {task_or_group: {metric_key: {"value": float, "stderr": float | None,
                "higher_is_better": bool | None, "aggregation": str | None,
                "primary": bool}}},           # exactly one primary per task/group
    "n_shot": {task_or_group: int},            # few-shot count lm-eval used
    "groups": {group: {"subtasks": [task, ...], "weight_by_size": bool,
               "aggregation": str}},           # requested, aggregated groups; {} if none
    "scores" / "stderr": {task_or_group: {metric_key: value}}, "n_samples": {task: int},
    "versions": versions(), "environment": environment()

(see ``evals.lm_eval.EvalResult`` for how each field is read from lm-eval).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA = 2
# Config keys that decide a cell's result; everything else (logging, paths, output
# options, dry-run) may change without making it a different cell.
CELL_KEYS = ("method", "model", "task", "eval", "seed", "device", "threads")
_PACKAGES = (
    "torch",
    "transformers",
    "lm_eval",
    "peft",
    "safetensors",
    "datasets",
    "hydra-core",
    "wandb",
    "pandas",
    "mergelab",
)


def split_metric_key(key: str) -> tuple[str, str]:
    """A record's metric key as lm-eval's (metric, filter): ``acc`` → (acc, none),
    ``exact_match/strict-match`` → (exact_match, strict-match) (the inverse of
    :func:`evals.lm_eval.metric_key`)."""
    name, sep, filter_name = key.partition("/")
    return (name, filter_name) if sep else (name, "none")


def method_params(method_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The method's options as flat table parameters: a nested piece (a mapping with a
    ``_target_``, as ``method=task_vector``'s ``transform``) becomes ``transform: <class>``
    plus ``transform.<option>`` entries."""
    out: dict[str, Any] = {}
    for k, v in method_cfg.items():
        if k == "_target_":
            continue
        if isinstance(v, Mapping) and "_target_" in v:
            out[k] = str(v["_target_"]).rsplit(".", 1)[-1]
            out.update({f"{k}.{sk}": sv for sk, sv in method_params(v).items()})
        else:
            out[k] = v
    return out


def cell_id(cfg: dict[str, Any]) -> str:
    """12 hex digits of the sha256 of the result-deciding parts of a resolved config."""
    missing = [k for k in CELL_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"config lacks {missing}; a cell needs all of {list(CELL_KEYS)}")
    key = json.dumps({k: cfg[k] for k in CELL_KEYS}, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def result_path(runs_dir: str | Path, cid: str) -> Path:
    return Path(runs_dir) / cid / "result.json"


def load_finished(runs_dir: str | Path, cid: str) -> dict[str, Any] | None:
    """The cell's record if it finished, else ``None`` (missing, partial or unreadable)."""
    path = result_path(runs_dir, cid)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("status") == "complete" else None


@contextmanager
def cell_lock(runs_dir: str | Path, cid: str) -> Iterator[None]:
    """An exclusive lock on one cell (``<runs_dir>/.locks/<cid>.lock``, ``flock``): a
    concurrent sweep reaching a cell another process is computing waits for it, then finds
    it finished instead of computing it twice. The OS drops the lock if the holder dies."""
    locks = Path(runs_dir) / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{cid}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file in the same directory, fsync, then rename over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def versions() -> dict[str, str]:
    """Python, key package versions and the mergelab git commit, for the record."""
    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        out["mergelab_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["mergelab_commit"] = "unknown"
    return out


def environment() -> dict[str, Any]:
    """What else can change scores: torch's thread count and CPU kernel set (reductions
    differ with both), the machine, and every installed distribution with a sha256 of
    their sorted ``name==version`` lines (equal hashes: equal package sets)."""
    import torch

    packages: dict[str, str] = {}
    for dist in metadata.distributions():  # first on sys.path wins, as for metadata.version
        if dist.name:
            packages.setdefault(dist.name, dist.version)
    lines = "\n".join(sorted(f"{name}=={version}" for name, version in packages.items()))
    return {
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "packages_sha256": hashlib.sha256(lines.encode()).hexdigest(),
        "packages": dict(sorted(packages.items())),
    }
