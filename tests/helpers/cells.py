"""Cells of the built-in zoo shared by every test that needs them: the cell cache.

All such tests run the real ``mergelab`` CLI into one persistent runs directory
(``$MERGELAB_TEST_RUNS``, default ``<mergelab cache>/test-runs``). A cell's id is a hash of
its config, and a finished cell is skipped, so a cell computed by one test (or by the
default run) is reused by every other (and by the slow run) instead of recomputed.
Sweeps run through Hydra's joblib launcher with one worker per core, each single-threaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from harness.zoo import cache_root

ENV = {**os.environ, "TQDM_DISABLE": "1", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


def runs_dir() -> Path:
    return Path(os.environ.get("MERGELAB_TEST_RUNS") or cache_root() / "test-runs")


def jobs() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def mergelab(*args: str, runs: Path | None = None, timeout: float = 5400) -> str:
    """Run ``mergelab`` (Hydra flags first, then overrides) into the cell cache; return
    its stdout, or fail with the end of its output."""
    runs = runs or runs_dir()
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    if "-m" in flags:
        overrides += ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs()}"]
    cmd = [shutil.which("mergelab") or "mergelab", *flags, f"runs_dir={runs}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-6000:]}")  # fmt: skip
    return proc.stdout


def records(runs: Path | None = None) -> list[dict[str, Any]]:
    """Every complete record in the cell cache."""
    out = []
    for path in sorted((runs or runs_dir()).glob("*/result.json")):
        record = json.loads(path.read_text())
        if record.get("status") == "complete":
            out.append({**record, "_dir": str(path.parent)})
    return out


def select(recs: Iterable[dict[str, Any]], method: str, **params: Any) -> list[dict[str, Any]]:
    """Records of ``method`` (its config name, e.g. ``ties``) whose params include ``params``."""
    out = []
    for r in recs:
        if r["method"]["name"] != method:
            continue
        if all(r["method"]["params"].get(k) == v for k, v in params.items()):
            out.append(r)
    return out
