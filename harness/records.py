"""Cell ids, atomic result records and resume.

A cell is one resolved configuration (method × pool × tasks × eval × seed × device). Its
id is a hash of exactly those parts, so the same cell in two sweeps is the same directory
``<runs_dir>/<cell_id>/`` and is computed once. ``result.json`` is written last and
atomically: a cell with a complete result is finished; anything else is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

SCHEMA = 1
# Config keys that decide a cell's result; everything else (logging, paths, output
# options, dry-run) may change without making it a different cell.
CELL_KEYS = ("method", "model", "task", "eval", "seed", "device")
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
