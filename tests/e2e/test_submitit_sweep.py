"""Grids through Hydra's submitit launcher (``conf/hydra/launcher/``).

``hydra/launcher=local``: a 6-cell grid runs as one process per cell, two at a time,
while a second sweep of the same grid (in-process, the other way round) shares its runs
directory: each cell is computed once, by a job or by the second sweep, two jobs run at
once and never more, and ``mergelab-collect`` over the runs directory tabulates every cell.

``hydra/launcher=slurm`` (no SLURM here): the README's array command gets as far as
``sbatch``, a stand-in that keeps the script and submits nothing; the script asks for what
``slurm.yaml`` says, one array task per cell.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from tests.e2e.test_cli import ENV, cli

pytestmark = pytest.mark.e2e
GRID = ["method=task_arithmetic,ties", "method.scaling=0.2,0.4,0.6", "sweep=submitit"]
LOCAL = ["-m", "hydra/launcher=local", "hydra.sweeper.max_batch_size=2", *GRID]
REVERSED = ["method=ties,task_arithmetic", "method.scaling=0.6,0.4,0.2", "sweep=submitit"]
# submitit's own log lines in each job's log: when the job process started and ended.
STARTED = re.compile(r"submitit INFO \(([^)]+)\) - Starting with JobEnvironment")
ENDED = re.compile(r"submitit INFO \(([^)]+)\) - Job completed successfully")


def launch(conf: Path, runs: Path, *args: str) -> subprocess.Popen:
    cmd = cli(conf, runs, *args)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def finish(*procs: subprocess.Popen) -> list[str]:
    """Each process's stdout, once all exited 0."""
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), [err[-3000:] for _, err in outs]
    return [out for out, _ in outs]


def job_logs(sweep_dir: Path) -> list[Path]:
    """Each submitit job's stdout log (``<submitit_folder>/<job id>_0_log.out``)."""
    return sorted((sweep_dir / ".submitit").glob("*/*_0_log.out"))


def job_texts(sweep_dir: Path) -> list[str]:
    """What each finished submitit job wrote, stdout then stderr."""
    return [p.read_text() + p.with_suffix(".err").read_text() for p in job_logs(sweep_dir)]


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The largest number of (start, end) spans open at one time (touching ones do not)."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def job_span(log: str) -> tuple[float, float]:
    (start,), (end,) = STARTED.findall(log), ENDED.findall(log)
    fmt = "%Y-%m-%d %H:%M:%S,%f"
    return datetime.strptime(start, fmt).timestamp(), datetime.strptime(end, fmt).timestamp()


def cell_span(path: Path) -> tuple[float, float]:
    """When the cell was computed: ``result.json`` is written last, ``timings.total`` after
    the claim was taken."""
    end = path.stat().st_mtime
    return end - json.loads(path.read_text())["timings"]["total"], end


def test_local_launcher_grid_two_at_a_time_each_cell_once(tiny_pool, tmp_path):
    runs, conf = tmp_path / "runs", tiny_pool["conf"]
    sweep_dir = runs / ".hydra" / "local"
    local = launch(conf, runs, *LOCAL, f"hydra.sweep.dir={sweep_dir}")
    deadline = time.monotonic() + 300  # until its first jobs start: they claim cells first
    while not job_logs(sweep_dir) and local.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    # the same grid meanwhile, in-process and from the other end
    other = launch(conf, runs, "-m", *REVERSED, f"hydra.sweep.dir={runs / '.hydra' / 'second'}")
    out, second = finish(local, other)
    assert "Submitit 'local' sweep output dir" in out
    paths = sorted(runs.glob("*/result.json"))
    records = {p.parent.name: json.loads(p.read_text()) for p in paths}
    assert len(records) == 6 and {r["status"] for r in records.values()} == {"complete"}
    params = {(r["method"]["name"], r["method"]["params"]["scaling"]) for r in records.values()}
    assert params == {(m, s) for m in ("task_arithmetic", "ties") for s in (0.2, 0.4, 0.6)}
    logs = job_texts(sweep_dir)
    assert len(logs) == 6, "one submitit job per cell"
    text = "\n".join([*logs, second])
    for cid in records:  # computed by one job or the second sweep, skipped by the other
        assert text.count(f"[mergelab] done {cid}") == 1, text
        assert text.count(f"[mergelab] skip {cid}") == 1, text
    assert "[mergelab] failed" not in text and not list((runs / ".claims").iterdir())
    # Two jobs at a time, never three; two of the cells the jobs computed, at the same time.
    assert most_at_once([job_span(log) for log in logs]) == 2, logs
    by_jobs = [runs / cid / "result.json" for cid in records if f"done {cid}" in "".join(logs)]
    assert most_at_once([cell_span(p) for p in by_jobs]) == 2, (logs, second)

    # mergelab-collect over the shared runs directory: all six cells, every task scored.
    tables = tmp_path / "tables"
    collect = [shutil.which("mergelab-collect") or "mergelab-collect", str(runs)]
    args = ["--out", str(tables), "--bootstrap", "200", "--wandb", "disabled"]
    proc = subprocess.run([*collect, *args], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    pivot = pd.read_csv(tables / "pivot.csv")
    scored = pivot[pivot.task.isin(["tiny_add", "tiny_color"])]
    labels = {f"{m}(scaling={s})" for m in ("task_arithmetic", "ties") for s in (0.2, 0.4, 0.6)}
    assert set(pivot.label) == labels and len(scored) == 12
    assert scored.value.between(0, 1).all() and (scored.n_items > 0).all()
    for cid, r in records.items():
        label = f"{r['method']['name']}(scaling={r['method']['params']['scaling']})"
        for task in ("tiny_add", "tiny_color"):
            row = scored[(scored.label == label) & (scored.task == task)].iloc[0]
            assert row.value == pytest.approx(r["scores"][task]["acc"]), (cid, task)


def test_the_job_function_pickles_by_reference():
    """Launchers pickle Hydra's task function into every job: as a reference, the job
    imports ``harness.cli`` (CPU kernels pinned before torch loads, resolvers registered)
    rather than running a copy of the function's code."""
    import cloudpickle

    from harness.cli import job

    assert pickle.loads(cloudpickle.dumps(job)) is job


STAND_IN = """#!/bin/sh
# A stand-in for {name}: {what}
{body}
"""


def test_slurm_array_command_reaches_sbatch_with_the_config(tiny_pool, tmp_path):
    """The README's command with hydra/launcher=slurm, as far as submission: the script
    submitit hands to sbatch asks for one array task per cell, at most array_parallelism at
    once, and each task's resources as slurm.yaml documents them."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = tmp_path / "submitted.sh"
    sbatch = f'cp "$1" {script}\necho "sbatch: stand-in, nothing submitted" >&2\nexit 1'
    srun = 'echo "srun: stand-in, runs nothing" >&2\nexit 1'  # submitit looks for it
    for name, what, body in (
        ("sbatch", "keep the job script, submit nothing", sbatch),
        ("srun", "submitit only checks that it exists", srun),
    ):
        (bin_dir / name).write_text(STAND_IN.format(name=name, what=what, body=body))
        (bin_dir / name).chmod(0o755)
    runs = tmp_path / "runs"
    args = ["-m", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", *GRID, "device=cuda"]
    env = {**ENV, "PATH": f"{bin_dir}:{ENV['PATH']}"}
    proc = subprocess.run(
        cli(tiny_pool["conf"], runs, *args), capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode != 0 and "sbatch: stand-in, nothing submitted" in proc.stderr
    assert not list(runs.glob("*/result.json"))
    lines = script.read_text().splitlines()
    flags = dict(ln.removeprefix("#SBATCH --").split("=", 1) for ln in lines if "#SBATCH" in ln)
    assert {k: flags[k] for k in ("array", "partition", "gpus-per-node", "cpus-per-task")} == {
        "array": "0-5%6",
        "partition": "gpu",
        "gpus-per-node": "1",
        "cpus-per-task": "4",
    }
    assert (flags["mem"], flags["time"], flags["job-name"]) == ("64GB", "240", "mergelab")
    assert (flags["nodes"], flags["ntasks-per-node"], flags["signal"]) == ("1", "1", "USR2@120")
    submitit = str(runs / ".hydra")  # submitit_folder: under runs_dir, so on the shared disk
    assert flags["output"].startswith(submitit) and flags["output"].endswith("%A_%a_0_log.out")
    (command,) = [ln for ln in lines if ln.startswith("srun ")]
    assert "-m submitit.core._submit" in command and submitit in command
