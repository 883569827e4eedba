"""End to end through the real console scripts on the tiny pool built in conftest.

One module-scoped 3-method sweep feeds most checks: records, W&B offline files read back,
resume, tables, and the saved checkpoint reloaded with ``from_pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.tracking import read_offline_run

pytestmark = pytest.mark.e2e
METHODS = ("weight_average", "task_arithmetic", "ties")
ENV = {**os.environ, "WANDB_SILENT": "true", "TQDM_DISABLE": "1"}


def cli(conf: Path, runs: Path, *args: str, exe: str = "mergelab") -> list[str]:
    """The command line; Hydra wants its flags (-m) before the overrides."""
    if exe != "mergelab":
        return [shutil.which(exe) or exe, *args]
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    common = ["model=tiny", "task=tiny", f"runs_dir={runs}", "eval.batch_size=16"]
    return [shutil.which(exe) or exe, "--config-dir", str(conf), *flags, *common, *overrides]


def mergelab(
    conf: Path, runs: Path, *args: str, check: bool = True, exe: str = "mergelab"
) -> subprocess.CompletedProcess:
    cmd = cli(conf, runs, *args, exe=exe)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def results(runs: Path) -> dict[str, dict]:
    return {
        (r := json.loads(p.read_text()))["method"]["name"]: r for p in runs.glob("*/result.json")
    }


@pytest.fixture(scope="module")
def sweep(tiny_pool, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    mergelab(tiny_pool["conf"], runs, "-m", f"method={','.join(METHODS)}", "sweep=e2e")
    return runs


def test_sweep_writes_complete_records(sweep):
    recs = results(sweep)
    assert set(recs) == set(METHODS)
    for r in recs.values():
        assert r["status"] == "complete" and r["sweep"] == "e2e"
        assert len(r["cell_id"]) == 12 and sweep.joinpath(r["cell_id"]).is_dir()
        assert set(r["scores"]) == {"tiny_add", "tiny_color"}
        assert all(0.0 <= v["acc"] <= 1.0 for v in r["scores"].values())
        assert {"check", "merge", "load", "eval", "total"} <= set(r["timings"])
        assert r["versions"]["torch"].startswith("2.") and r["seed"] == 0
        assert r["config"]["method"]["_target_"].startswith("methods.")
        assert len(r["weights_sha256"]) == 64
        samples = (sweep / r["cell_id"] / "samples.jsonl").read_text().splitlines()
        assert len(samples) == 20 + 8  # every doc of both tasks
    # different methods, different weights
    assert len({r["weights_sha256"] for r in recs.values()}) == 3
    assert recs["ties"]["method"]["report"]  # e.g. the global trim thresholds


def test_wandb_offline_run_reads_back(sweep):
    for r in results(sweep).values():
        run = read_offline_run(sweep / r["cell_id"])
        assert run["config"]["method"]["_target_"] == r["config"]["method"]["_target_"]
        for task, metrics in r["scores"].items():
            assert run["summary"][f"{task}/acc"] == pytest.approx(metrics["acc"])


def test_saved_checkpoint_loads_and_scores_the_same(sweep, tiny_pool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evals.lm_eval import evaluate

    r = results(sweep)["ties"]
    merged = sweep / r["cell_id"] / "merged"
    assert (merged / "README.md").read_text().count("ties") >= 1
    model = AutoModelForCausalLM.from_pretrained(merged)
    tok = AutoTokenizer.from_pretrained(merged)
    again = evaluate(
        model, tok, ["tiny_add", "tiny_color"], include_path=str(tiny_pool["tasks"]), batch_size=16
    )
    assert again.scores == r["scores"]


def test_rerun_skips_finished_cells(sweep, tiny_pool):
    before = {p: p.stat().st_mtime_ns for p in sweep.glob("*/result.json")}
    proc = mergelab(tiny_pool["conf"], sweep, "-m", f"method={','.join(METHODS)}", "sweep=e2e")
    assert proc.stdout.count("[mergelab] skip") == 3
    assert {p: p.stat().st_mtime_ns for p in sweep.glob("*/result.json")} == before


def test_dry_run_lists_cells_and_status(sweep, tiny_pool):
    proc = mergelab(
        tiny_pool["conf"],
        sweep,
        "-m",
        "method=task_arithmetic",
        "method.scaling=0.3,0.9",
        "dry_run=true",
    )
    lines = [ln for ln in proc.stdout.splitlines() if "dry-run" in ln]
    assert len(lines) == 2
    assert sum("[finished]" in ln for ln in lines) == 1  # 0.3 is the default, already run
    assert len(list(sweep.glob("*/result.json"))) == 3  # nothing new was run


def test_crashed_cell_leaves_no_result_and_sweep_resumes(tiny_pool, tmp_path):
    runs = tmp_path / "runs"
    # scaling 1e39 overflows float32: that cell fails with a NaN/inf error naming the tensor;
    # Hydra still runs the other cells, and the failure makes the sweep exit non-zero.
    proc = mergelab(
        tiny_pool["conf"],
        runs,
        "-m",
        "method=task_arithmetic",
        "method.scaling=0.3,1e39,0.5",
        check=False,
    )
    assert proc.returncode != 0
    assert "produced NaN/inf in tensor" in proc.stderr
    done = sorted(runs.glob("*/result.json"))
    assert len(done) == 2
    crashed = [d for d in runs.iterdir() if d.name != ".hydra" and not (d / "result.json").exists()]
    assert len(crashed) == 1 and not (crashed[0] / "merged").exists()
    mtimes = [p.stat().st_mtime_ns for p in done]
    proc = mergelab(
        tiny_pool["conf"], runs, "-m", "method=task_arithmetic", "method.scaling=0.3,0.5,0.7"
    )
    assert proc.stdout.count("[mergelab] skip") == 2 and proc.stdout.count("[mergelab] done") == 1
    assert [p.stat().st_mtime_ns for p in done] == mtimes
    assert len(list(runs.glob("*/result.json"))) == 3


def test_killed_sweep_resumes_without_redoing(tiny_pool, tmp_path):
    import signal
    import time

    runs = tmp_path / "runs"
    args = ["-m", "method=task_arithmetic", "method.scaling=0.2,0.4"]
    cmd = cli(tiny_pool["conf"], runs, *args)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, start_new_session=True
    )
    deadline = time.monotonic() + 600
    while not list(runs.glob("*/result.json")) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # hard kill while the second cell is under way
    proc.wait()
    (first,) = runs.glob("*/result.json")
    assert json.loads(first.read_text())["status"] == "complete"
    mtime = first.stat().st_mtime_ns
    out = mergelab(tiny_pool["conf"], runs, *args)
    assert out.stdout.count("[mergelab] skip") == 1 and out.stdout.count("[mergelab] done") == 1
    assert first.stat().st_mtime_ns == mtime
    assert len(list(runs.glob("*/result.json"))) == 2


def test_stream_mode_gives_identical_weights(sweep, tiny_pool, tmp_path):
    runs = tmp_path / "runs"
    mergelab(tiny_pool["conf"], runs, "method=ties", "stream=true", "max_shard_size=20KB")
    (r,) = [json.loads(p.read_text()) for p in runs.glob("*/result.json")]
    merged = runs / r["cell_id"] / "merged"
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert r["weights_sha256"] == results(sweep)["ties"]["weights_sha256"]
    assert r["scores"] == results(sweep)["ties"]["scores"]


def test_unknown_task_fails_before_merging(tiny_pool, tmp_path):
    runs = tmp_path / "runs"
    proc = mergelab(tiny_pool["conf"], runs, "task.tasks=[tiny_ad]", check=False)
    assert proc.returncode != 0
    assert "tiny_ad" in proc.stderr and "tiny_add" in proc.stderr
    assert not list(runs.glob("*/merged"))


def test_bad_method_value_is_named(tiny_pool, tmp_path):
    proc = mergelab(tiny_pool["conf"], tmp_path, "method=ties", "method.density=1.5", check=False)
    assert proc.returncode != 0 and "density" in proc.stderr


def test_collect_prints_and_writes_tables(sweep, tiny_pool, tmp_path):
    out = tmp_path / "tables"
    proc = mergelab(tiny_pool["conf"], sweep, str(sweep), "--out", str(out), exe="mergelab-collect")
    assert "ties" in proc.stdout and "average" in proc.stdout
    for f in ("pivot.md", "pivot.csv", "pivot.tex", "tidy.csv"):
        assert (out / f).is_file(), f
    ta = results(sweep)["task_arithmetic"]["scores"]
    assert f"{ta['tiny_add']['acc']:.4f}" in proc.stdout


@pytest.mark.parametrize(
    "method",
    [
        ["method=metagpt_ties"],
        ["method=adamerging_layerwise_pp", "method.steps=3", "method.batch_size=4"],
        ["method=sens_ties", "method.n_calibration=4"],
    ],
    ids=["metagpt_ties", "adamerging_layerwise_pp", "sens_ties"],
)
def test_seed_methods_run_from_the_cli_in_memory_and_streamed(tiny_pool, tmp_path, method):
    """Each seed method from the CLI, then again streamed tensor by tensor into a sharded
    checkpoint: the same merged weights (sha256) and scores."""
    records = {}
    for stream in ("false", "true"):
        runs = tmp_path / f"runs-{stream}"
        extra = [f"stream={stream}", "max_shard_size=20KB", "task.calibration={split: test, n: 8}"]
        mergelab(tiny_pool["conf"], runs, *method, *extra)
        (records[stream],) = [json.loads(p.read_text()) for p in runs.glob("*/result.json")]
    r, streamed = records["false"], records["true"]
    index = runs / streamed["cell_id"] / "merged" / "model.safetensors.index.json"
    assert len(set(json.loads(index.read_text())["weight_map"].values())) > 1  # sharded
    assert streamed["weights_sha256"] == r["weights_sha256"]
    assert streamed["scores"] == r["scores"]
    assert streamed["method"]["report"] == r["method"]["report"]
    report = r["method"]["report"]
    assert set(r["scores"]) == {"tiny_add", "tiny_color"}
    if r["method"]["name"] == "metagpt":
        assert sum(report["coefficients"].values()) == pytest.approx(1.0)
    elif r["method"]["name"] == "adamerging":
        run = read_offline_run(runs / r["cell_id"])
        assert len(run["history"]) >= 3  # entropy logged per step
    assert "calibration" in r["timings"] or r["method"]["name"] == "metagpt"


def _jsonl(path: Path, texts: list[str]) -> str:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def test_training_workflows_run_from_the_cli(tiny_pool, tmp_path):
    """BoRA and Merge to Learn train on their own data specs: they run on tasks without a
    calibration split (the configured split does not exist here and is never read)."""
    add = _jsonl(tmp_path / "add.jsonl", [f"{a}+{b}={a + b}" for a in range(6) for b in range(4)])
    color = _jsonl(tmp_path / "color.jsonl", ["sky is blue", "grass is green"] * 6)
    no_calibration = "task.calibration={split: validation, n: 8}"
    runs = tmp_path / "runs"
    bora = [
        "method=bora",
        f"method.tasks={{add: {{jsonl: {add}}}, color: {{jsonl: {color}}}}}",
        "method.task=color",
        "method.steps=3",
        "method.batch_size=4",
        "method.r=2",
        "method.tau=10",
    ]
    m2l = [
        "method=m2l_ptm",
        f"method.general_data=[{{jsonl: {color}}}]",
        "~method.skills",
        f"+method.skills={{add: {{jsonl: {add}}}}}",
        "method.batch_size=8",
        "method.epochs=1",
        "method.progress=false",
    ]
    for args in (bora, m2l):
        mergelab(tiny_pool["conf"], runs, *args, no_calibration)
    by_method = results(runs)
    assert set(by_method) == {"bora", "merge_to_learn"}
    for r in by_method.values():
        assert r["status"] == "complete" and "calibration" in r["timings"]
        assert set(r["scores"]) == {"tiny_add", "tiny_color"}
    assert by_method["merge_to_learn"]["method"]["report"]["omega"] == {"add": pytest.approx(2.0)}


def test_collect_only_keeps_matching_merges(sweep, tiny_pool, tmp_path):
    proc = mergelab(
        tiny_pool["conf"],
        sweep,
        str(sweep),
        "--out",
        str(tmp_path),
        "--only",
        "ties",
        exe="mergelab-collect",
    )
    pivot = proc.stdout.split("Normalised")[0]
    assert "| ties" in pivot and "task_arithmetic" not in pivot and "weight_average" not in pivot
