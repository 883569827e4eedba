"""The real ``mergelab-collect`` console script on hand-made schema-2 run directories,
run from outside the repository (so the installed packages, ``results`` included, are used)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from tests.unit.test_tables import CELLS, make_record, write

pytestmark = pytest.mark.e2e
ENV = {**os.environ, "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


def collect(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("mergelab-collect") or "mergelab-collect"
    return subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, env=ENV, timeout=300
    )


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for cell in CELLS:
        write(root, make_record(*cell))
    for cid, seed, acc in (("r0", 0, 0.62), ("r1", 1, 0.70), ("r2", 2, 0.66)):
        write(root, make_record(cid, "ties", {"density": 0.2}, acc, 0.6, 0.33, seed=seed))
    return root


def test_collect_writes_intervals_and_the_comparison(runs, tmp_path):
    out = tmp_path / "tables"
    args = [str(runs), "--out", str(out), "--bootstrap", "1000", "--baseline", "base"]
    proc = collect(tmp_path, *args, "--wandb", "disabled")
    assert proc.returncode == 0, proc.stderr
    assert "95% bootstrap interval" in proc.stdout and "Δ = label − base" in proc.stdout
    assert "| ties " in proc.stdout and "± 0.0400 (n=3)" in proc.stdout
    for name in ("pivot", "normalised", "compare"):
        for fmt in ("md", "csv", "tex"):
            assert (out / f"{name}.{fmt}").is_file(), f"{name}.{fmt}"
    for png in ("scores.png", "compare.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    pivot = pd.read_csv(out / "pivot.csv")
    ties = pivot[(pivot.label == "ties") & (pivot.task == "tiny_math")].iloc[0]
    assert ties.value == pytest.approx(0.66) and ties.n_replicates == 3
    assert ties.ci_low < 0.66 < ties.ci_high and ties.n_items == 100
    compare = pd.read_csv(out / "compare.csv")
    assert compare[compare.label == "ties"]["significant"].all()
    assert not (out / "wandb").exists()


def test_collect_errors_name_the_fix(runs, tmp_path):
    proc = collect(
        tmp_path,
        str(runs),
        "--out",
        str(tmp_path / "t"),
        "--baseline",
        "nope",
        "--wandb",
        "disabled",
    )
    assert proc.returncode != 0 and "'nope': no such label; labels: ['base'" in proc.stderr
    old = runs / "c3ta03" / "result.json"
    rec = json.loads(old.read_text())
    del rec["metrics"]
    old.write_text(json.dumps(rec))
    proc = collect(tmp_path, str(runs), "--out", str(tmp_path / "t"), "--wandb", "disabled")
    assert proc.returncode != 0 and "c3ta03/result.json" in proc.stderr
    assert "force=true" in proc.stderr
