"""Identical sweeps started together into one runs directory share its cells: each cell is
computed by exactly one process (the others wait on its claim, then skip it), every
process exits 0, and each cell has exactly one W&B run holding its summary. A worker
paused past the claim timeout loses the cell to the one that takes it over and writes
nothing to it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.tracking import closed, read_offline_run, summary_from_result
from tests.e2e.test_cli import ENV, cli, mergelab

pytestmark = pytest.mark.e2e
GRID = ["-m", "method=task_arithmetic", "method.scaling=0.2,0.4,0.6", "sweep=shared"]


@pytest.mark.parametrize(
    "n_sweeps", [2, pytest.param(4, marks=pytest.mark.slow)], ids=["2-sweeps", "4-sweeps"]
)
def test_identical_sweeps_compute_each_cell_once(tiny_pool, tmp_path, n_sweeps):
    cmd = cli(tiny_pool["conf"], tmp_path, *GRID)
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        for _ in range(n_sweeps)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0] * n_sweeps, [err[-2000:] for _, err in outs]
    stdout = "".join(out for out, _ in outs)
    records = [json.loads(p.read_text()) for p in tmp_path.glob("*/result.json")]
    assert len(records) == 3 and all(r["status"] == "complete" for r in records)
    for r in records:
        cid = r["cell_id"]
        assert stdout.count(f"[mergelab] done {cid}") == 1, stdout
        assert stdout.count(f"[mergelab] skip {cid}") == n_sweeps - 1, stdout
        (run_dir,) = (tmp_path / cid).glob("wandb/offline-run-*")
        run = read_offline_run(run_dir)
        assert run["exit_code"] == 0 and summary_from_result(r).items() <= run["summary"].items()
        assert not list((tmp_path / cid).glob("merged.*"))
    assert not list((tmp_path / ".claims").iterdir())


# The CLI, stopping itself (SIGSTOP) as it starts to evaluate: the test resumes it.
PAUSED = """
import os, signal, sys
import harness.cli, harness.run
evaluate = harness.run.evaluate
def paused(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGSTOP)
    return evaluate(*args, **kwargs)
harness.run.evaluate = paused
sys.argv = ["mergelab", *sys.argv[1:]]
harness.cli.main()
"""
CELL = ["method=task_arithmetic", "method.scaling=0.3", "claim.heartbeat=0.2", "claim.timeout=3"]


def stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] == "T"


def test_a_paused_worker_loses_its_cell_to_the_taker_and_writes_nothing(tiny_pool, tmp_path):
    cmd = [sys.executable, "-c", PAUSED, *cli(tiny_pool["conf"], tmp_path, *CELL)[1:]]
    logs = tmp_path / "slow.out", tmp_path / "slow.err"  # files: a full pipe would block it
    with open(logs[0], "w") as stdout, open(logs[1], "w") as stderr:
        slow = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, text=True, env=ENV)
    deadline = time.monotonic() + 600
    while slow.poll() is None and not stopped(slow.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert slow.poll() is None and stopped(slow.pid), logs[1].read_text()[-3000:]
    taker = mergelab(tiny_pool["conf"], tmp_path, *CELL).stdout  # waits 3 s, takes over
    os.kill(slow.pid, signal.SIGCONT)
    slow.wait(timeout=900)
    out = logs[0].read_text()
    assert slow.returncode == 0, logs[1].read_text()[-3000:]
    (path,) = tmp_path.glob("*/result.json")
    record, cell = json.loads(path.read_text()), path.parent
    cid = record["cell_id"]
    assert f"take over {cid}" in taker and f"[mergelab] done {cid}" in taker, taker
    assert f"[mergelab] lost {cid}: the claim on cell {cid} was taken over" in out, out
    assert f"[mergelab] skip {cid}: finished by a concurrent run" in out, out
    assert "[mergelab] done" not in out and "[mergelab] failed" not in out, out
    assert record["status"] == "complete" and (cell / "merged" / "model.safetensors").is_file()
    assert not [*cell.glob("merged.*"), *cell.glob(".result.json.*")]
    assert not list((tmp_path / ".claims").iterdir()) and closed(cell, cid)
