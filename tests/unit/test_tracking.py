"""harness.tracking against real offline W&B runs written to tmp_path (no mocks of the
logging path; failures are provoked by patching single wandb entry points)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest

from harness import tracking

wandb = pytest.importorskip("wandb")

FAST = {"x_disable_stats": True}  # no system-metrics sampler: quicker start and finish
CELL = "3f2a9c1b7d4e"
SWEEP = "2026-11-21_12-00-00"
CFG = {
    "method": {"_target_": "methods.ties.TIES", "density": 0.2, "trim_scope": "global"},
    "model": {"name": "tiny", "experts": {"math": {"tasks": ["tiny_math"]}}},
    "seed": 0,
    "weights": None,
    "notes": "n" * 50_000,  # > one 32 KiB block: the config record spans several fragments
}
RECORD = {
    "cell_id": CELL,
    "scores": {"tiny_math": {"acc": 0.61, "acc_norm": 0.6}, "tiny_code": {"em": 0.3}},
    "timings": {"load": 0.1, "merge": 1.2, "total": 6.7},
    "weights_sha256": "abc123",
}


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory) -> tuple[Path, tracking.Tracker]:
    """One real offline run: config, a history row and a result summary."""
    root = tmp_path_factory.mktemp("cell")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a healthy run warns about nothing
        with tracking.start(
            CFG, name=CELL, group=SWEEP, dir=root, tags=["ties"], settings=FAST
        ) as tracker:
            assert tracker.active and tracker.mode == "offline"
            tracker.log_metrics({"merge": {"progress": 1.0}}, step=0)
            tracker.log_result(RECORD)
    assert not tracker.active
    return root, tracker


def test_offline_run_reads_back(offline_run):
    root, tracker = offline_run
    assert tracker.run_dir is not None and tracker.run_dir.name.startswith("offline-run-")
    run = tracking.read_offline_run(root)
    assert run == tracking.read_offline_run(tracker.run_dir)
    assert run["name"] == CELL and run["group"] == SWEEP and run["tags"] == ["ties"]
    assert run["project"] == "mergelab" and run["exit_code"] == 0
    assert run["config"] == CFG
    s = run["summary"]
    assert s["tiny_math/acc"] == 0.61 and s["tiny_math/acc_norm"] == 0.6
    assert s["tiny_code/em"] == 0.3
    assert s["time/merge"] == 1.2 and s["time/total"] == 6.7
    assert s["weights_sha256"] == "abc123"
    assert run["history"][0]["merge/progress"] == 1.0 and run["history"][0]["_step"] == 0


def test_reader_agrees_with_wandb_leet(offline_run):
    """Cross-check against wandb's own (Go) transaction-log reader, when the CLI has it."""
    run = tracking.read_offline_run(offline_run[0])
    proc = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", run["path"]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0 or not proc.stdout.lstrip().startswith("{"):
        pytest.skip(f"`wandb leet inspect` unavailable: {proc.stderr[-200:]}")
    theirs = json.loads(proc.stdout)
    assert theirs["config"] == run["config"]
    assert theirs["summary"] == run["summary"]


def test_truncated_log_reads_what_precedes(offline_run, tmp_path):
    src = Path(tracking.read_offline_run(offline_run[0])["path"])
    cut = tmp_path / src.name
    cut.write_bytes(src.read_bytes()[:-5])
    with pytest.warns(UserWarning, match="ends early"):
        run = tracking.read_offline_run(cut)
    assert run["config"] == CFG and run["exit_code"] is None
    (tmp_path / "junk.wandb").write_bytes(b"not a log")
    with pytest.raises(ValueError, match="not a W&B transaction log"):
        list(tracking.read_transaction_log(tmp_path / "junk.wandb"))


def test_module_level_functions(tmp_path):
    tracker = tracking.start({"a": 1}, name="cellB", dir=tmp_path, settings=FAST)
    tracking.log_metrics({"x": 2}, step=3)
    tracking.log_summary({"tiny_math": {"acc": 0.5}})
    tracking.finish()
    assert not tracker.active
    tracking.log_summary({"ignored": 1})  # nothing active: a no-op
    run = tracking.read_offline_run(tmp_path / "wandb")
    assert run["config"] == {"a": 1} and run["summary"]["tiny_math/acc"] == 0.5
    assert run["history"][0]["x"] == 2 and run["history"][0]["_step"] == 3


def test_failing_init_warns_and_disables(monkeypatch, tmp_path):
    def boom(*args, **kwargs):
        raise RuntimeError("no route to W&B")

    monkeypatch.setattr(wandb, "init", boom)
    monkeypatch.setattr(tracking, "_unavailable", None)
    assert tracking.available()
    with pytest.warns(RuntimeWarning, match=r"wandb\.init failed.*no route to W&B"):
        tracker = tracking.start({"a": 1}, name=CELL, dir=tmp_path)
    assert not tracker.active and not tracking.available()  # optional repairs: skipped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with tracker:
            tracker.log_metrics({"x": 1})
            tracker.log_result(RECORD)
    assert not list(tmp_path.rglob("*.wandb"))


def test_failing_log_warns_once_and_closes_run(monkeypatch, tmp_path):
    tracker = tracking.start({"a": 1}, name=CELL, dir=tmp_path, settings=FAST)
    assert tracker.active

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tracker.run, "log", boom)
    with pytest.warns(RuntimeWarning, match=r"run\.log failed.*disk full.*disabled"):
        tracker.log_metrics({"x": 1})
    assert not tracker.active
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker.log_summary({"y": 2})  # disabled: silently dropped
        tracker.finish()
    assert tracking.read_offline_run(tmp_path)["exit_code"] == 1


def test_bogus_mode_warns_and_writes_nothing(tmp_path):
    with pytest.warns(RuntimeWarning, match="mode 'sideways'"):
        tracker = tracking.start({"a": 1}, mode="sideways", dir=tmp_path / "w")
    assert not tracker.active
    tracker.log_summary({"x": 1})
    tracker.finish()
    assert not (tmp_path / "w").exists()


def test_disabled_mode_writes_nothing(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with tracking.start({"a": 1}, mode="disabled", dir=tmp_path / "w") as tracker:
            tracker.log_metrics({"x": 1}, step=0)
            tracker.log_result(RECORD)
    assert not tracker.active and tracker.run_dir is None
    assert not (tmp_path / "w").exists()
    with pytest.raises(FileNotFoundError):
        tracking.read_offline_run(tmp_path)


def test_summary_from_result_and_flatten():
    assert tracking.summary_from_result(RECORD) == {
        "tiny_math/acc": 0.61,
        "tiny_math/acc_norm": 0.6,
        "tiny_code/em": 0.3,
        "time/load": 0.1,
        "time/merge": 1.2,
        "time/total": 6.7,
        "weights_sha256": "abc123",
    }
    assert tracking.flatten({"a": {"b": {"c": 1}}, "d": None}) == {"a/b/c": 1, "d": None}


def test_a_run_id_replaces_earlier_offline_attempts(tmp_path):
    """Offline, wandb would write a second directory for a repeated id: the new attempt
    replaces the old one, and only a run that exited with code 0 counts as closed."""
    assert not tracking.closed(tmp_path, CELL)
    with (
        pytest.raises(RuntimeError),
        tracking.start({"a": 1}, dir=tmp_path, run_id=CELL, settings=FAST),
    ):
        raise RuntimeError("killed attempt")  # closes with exit code 1
    (first,) = tmp_path.glob("wandb/offline-run-*")
    assert first.name.endswith(f"-{CELL}") and not tracking.closed(tmp_path, CELL)
    with tracking.start({"a": 1}, dir=tmp_path, run_id=CELL, settings=FAST) as tracker:
        tracker.log_result(RECORD)
    (run_dir,) = tmp_path.glob("wandb/offline-run-*")
    run = tracking.read_offline_run(run_dir)
    assert run["run_id"] == CELL and run["summary"]["weights_sha256"] == "abc123"
    assert tracking.closed(tmp_path, CELL)


def test_only_the_newest_run_of_the_id_tells_whether_it_closed(tmp_path):
    """A closed run of another id, or an earlier (online) attempt of this one, must not
    hide a killed newer attempt."""
    with tracking.start({"a": 1}, dir=tmp_path, settings=FAST):  # a random id, closed
        pass
    assert not tracking.closed(tmp_path, CELL)
    with tracking.start({"a": 1}, dir=tmp_path, run_id=CELL, settings=FAST):
        pass
    (attempt,) = tmp_path.glob(f"wandb/offline-run-*-{CELL}")
    assert tracking.closed(tmp_path, CELL)
    shutil.copytree(attempt, tmp_path / "wandb" / f"run-20000101_000000-{CELL}")
    assert tracking.closed(tmp_path, CELL)  # an earlier online attempt, closed
    with (
        pytest.raises(RuntimeError),
        tracking.start({"a": 1}, dir=tmp_path, run_id=CELL, settings=FAST),
    ):
        raise RuntimeError("killed attempt")
    assert not tracking.closed(tmp_path, CELL)


def test_wandb_that_cannot_be_imported_is_reported_once(monkeypatch):
    monkeypatch.setattr(tracking, "_unavailable", None)
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.warns(RuntimeWarning, match="W&B cannot be imported .*ModuleNotFoundError"):
        assert not tracking.available()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not tracking.available()


def finished_cell(tmp_path: Path) -> tuple[dict, Path]:
    """A finished cell whose W&B run never closed, and the config the skip path reads."""
    c = {
        "runs_dir": str(tmp_path),
        "logger": {"mode": "offline", "project": "mergelab"},
        "claim": {"heartbeat": 0.05, "timeout": 60},
    }
    record = {**RECORD, "status": "complete", "sweep": SWEEP, "method": {"name": "ties"}}
    (tmp_path / CELL).mkdir()
    (tmp_path / CELL / "result.json").write_text(json.dumps(record))
    return c, tmp_path / CELL


def test_the_skip_path_leaves_a_cell_held_by_a_live_worker_at_once(tmp_path):
    from harness import records
    from harness.run import _skip_finished

    c, cell_dir = finished_cell(tmp_path)
    holder = records.CellClaim(tmp_path, CELL, **c["claim"])  # e.g. a forced rerun
    assert holder.try_acquire()
    skip = threading.Thread(target=_skip_finished, args=(c, CELL, cell_dir), daemon=True)
    skip.start()
    skip.join(30)
    assert not skip.is_alive() and not (cell_dir / "wandb").exists()
    holder.check()
    holder.release()


def test_the_skip_path_claims_nothing_when_wandb_cannot_start(tmp_path, monkeypatch):
    from harness.run import _skip_finished

    c, cell_dir = finished_cell(tmp_path)
    monkeypatch.setattr(tracking, "_unavailable", "ImportError: no wandb")  # warned before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            assert _skip_finished(c, CELL, cell_dir) is None
    assert not (tmp_path / ".claims").exists() and not (cell_dir / "wandb").exists()
    monkeypatch.setattr(tracking, "_unavailable", None)
    assert _skip_finished(c, CELL, cell_dir)["cell_id"] == CELL  # repaired, under the claim
    assert tracking.closed(cell_dir, CELL) and not list((tmp_path / ".claims").iterdir())
    summary = tracking.read_offline_run(cell_dir)["summary"]
    assert tracking.summary_from_result(RECORD).items() <= summary.items()
