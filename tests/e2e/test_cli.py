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
        assert r["status"] == "complete" and r["sweep"] == "e2e" and r["schema"] == 2
        assert len(r["cell_id"]) == 12 and sweep.joinpath(r["cell_id"]).is_dir()
        assert set(r["scores"]) == {"tiny_add", "tiny_color"}
        assert all(0.0 <= v["acc"] <= 1.0 for v in r["scores"].values())
        assert {"check", "merge", "load", "eval", "total"} <= set(r["timings"])
        assert r["versions"]["torch"].startswith("2.") and r["seed"] == 0
        assert r["config"]["method"]["_target_"].startswith("methods.")
        assert len(r["weights_sha256"]) == 64
        samples = (sweep / r["cell_id"] / "samples.jsonl").read_text().splitlines()
        assert len(samples) == 20 + 8  # every doc of both tasks
        for task, scores in r["scores"].items():
            assert r["metrics"][task] == {
                "acc": {
                    "value": scores["acc"],
                    "stderr": r["stderr"][task]["acc"],
                    "higher_is_better": True,
                    "aggregation": "mean",
                    "primary": True,
                }
            }
        assert r["n_shot"] == {"tiny_add": 0, "tiny_color": 0} and r["groups"] == {}
        env = r["environment"]
        assert env["torch_threads"] >= 1 and env["packages"]["torch"] == r["versions"]["torch"]
        assert len(env["packages_sha256"]) == 64 and env["machine"] and env["cpu_capability"]
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


def by_status(runs: Path) -> dict[str, list[tuple[Path, dict]]]:
    out: dict[str, list[tuple[Path, dict]]] = {}
    for p in sorted(runs.glob("*/result.json")):
        r = json.loads(p.read_text())
        out.setdefault(r["status"], []).append((p, r))
    return out


def test_failed_cell_is_recorded_and_redone_while_the_sweep_resumes(tiny_pool, tmp_path):
    runs = tmp_path / "runs"
    # scaling 1e39 overflows float32: that cell fails with a NaN/inf error naming the tensor;
    # Hydra still runs the other cells, and the failure makes the sweep exit non-zero.
    args = ["-m", "method=task_arithmetic"]
    proc = mergelab(tiny_pool["conf"], runs, *args, "method.scaling=0.3,1e39,0.5", check=False)
    assert proc.returncode != 0
    assert "produced NaN/inf in tensor" in proc.stderr and "hyperparameters" in proc.stderr
    status = by_status(runs)
    assert len(status["complete"]) == 2
    ((failed_path, failed),) = status["failed"]
    assert failed["error"]["type"] == "NonFiniteError" and failed["method"]["params"]["scaling"]
    assert "produced NaN/inf in tensor" in failed["error"]["message"]
    assert "scores" not in failed and "metrics" not in failed
    assert not (failed_path.parent / "merged").exists()
    mtimes = [p.stat().st_mtime_ns for p, _ in status["complete"]]
    proc = mergelab(tiny_pool["conf"], runs, *args, "method.scaling=0.3,0.5,0.7")
    assert proc.stdout.count("[mergelab] skip") == 2 and proc.stdout.count("[mergelab] done") == 1
    assert [p.stat().st_mtime_ns for p, _ in status["complete"]] == mtimes
    assert len(by_status(runs)["complete"]) == 3
    proc = mergelab(tiny_pool["conf"], runs, *args, "method.scaling=1e39", check=False)
    assert proc.returncode != 0 and "[mergelab] skip" not in proc.stdout  # failed: redone


def test_overflowing_merge_fails_in_eval_naming_task_and_hyperparameters(tiny_pool, tmp_path):
    """scaling=1e18 keeps the weights finite but overflows the forward pass: every
    log-likelihood would be NaN, which lm-eval counts as a hit (accuracy 1.0)."""
    runs = tmp_path / "runs"
    proc = mergelab(
        tiny_pool["conf"], runs, "method=task_arithmetic", "method.scaling=1e18", check=False
    )
    assert proc.returncode != 0
    assert "NaN/inf logits while lm-eval ran loglikelihood requests of task(s) tiny_add" in (
        proc.stderr
    )
    assert "hyperparameters" in proc.stderr and "'scaling': 1e+18" in proc.stderr
    ((_, r),) = by_status(runs)["failed"]
    assert r["error"]["type"] == "NonFiniteScoreError" and "tiny_add" in r["error"]["message"]
    assert "scores" not in r and len(r["weights_sha256"]) == 64  # merged, then refused


def _expert_copy(tiny_pool, tmp_path: Path) -> tuple[Path, Path, bytes, int]:
    bad = tmp_path / "bad_add"
    shutil.copytree(tiny_pool["add"], bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    return bad, weights, data, 8 + int.from_bytes(data[:8], "little")


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_nan_expert_fails_before_merging_naming_member_and_file(tiny_pool, tmp_path, method):
    """Payload bytes set to 0xFF (NaN), header intact; TIES would trim NaNs away unseen."""
    bad, weights, data, start = _expert_copy(tiny_pool, tmp_path)
    weights.write_bytes(data[:start] + b"\xff" * (len(data) - start))
    runs = tmp_path / "runs"
    proc = mergelab(
        tiny_pool["conf"], runs, f"method={method}", f"model.experts.add.path={bad}", check=False
    )
    assert proc.returncode != 0
    assert "pool member 'add' holds NaN/inf in tensor" in proc.stderr
    assert str(weights) in proc.stderr and "re-download or rebuild" in proc.stderr
    ((path, r),) = by_status(runs)["failed"]
    assert r["error"]["type"] == "NonFiniteMemberError" and "weights_sha256" not in r
    assert not (path.parent / "merged").exists()


def test_truncated_expert_fails_in_the_checks_naming_member_and_file(tiny_pool, tmp_path):
    bad, weights, data, _ = _expert_copy(tiny_pool, tmp_path)
    weights.write_bytes(data[: len(data) // 2])
    runs = tmp_path / "runs"
    proc = mergelab(tiny_pool["conf"], runs, f"model.experts.add.path={bad}", check=False)
    assert proc.returncode != 0
    assert f"pool member 'add' ({bad}): cannot read {weights}" in proc.stderr
    assert "incomplete metadata" in proc.stderr and "re-download" in proc.stderr
    assert not list(runs.glob("*/result.json"))  # before the record is started


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
    """BoRA and Merge to Learn train on their own data specs, from a pool with no experts,
    on tasks without a calibration split (the configured split does not exist here and is
    never read). What they trained is then a pool of experts for an ordinary merge."""
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
        mergelab(tiny_pool["conf"], runs, *args, no_calibration, "~model.experts")
    by_method = results(runs)
    assert set(by_method) == {"bora", "merge_to_learn"}
    for r in by_method.values():
        assert r["status"] == "complete" and "calibration" in r["timings"]
        assert set(r["scores"]) == {"tiny_add", "tiny_color"} and r["pool"]["experts"] == {}
    assert by_method["merge_to_learn"]["method"]["report"]["omega"] == {"add": pytest.approx(2.0)}

    adapters = by_method["bora"]["method"]["report"]["members"]
    trained = by_method["merge_to_learn"]["method"]["report"]["members"]
    experts = (
        f"+model.experts={{color: {{adapter: {adapters['color']}}}, "
        f"add: {{adapter: {adapters['add']}}}, skill: {{path: {trained['skill/add']}}}}}"
    )
    mergelab(tiny_pool["conf"], runs, "method=task_arithmetic", "~model.experts", experts)
    ta = results(runs)["task_arithmetic"]
    assert ta["status"] == "complete" and set(ta["pool"]["experts"]) == {"color", "add", "skill"}


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


def test_concurrent_runs_of_one_cell_compute_it_once(tiny_pool, tmp_path):
    cmd = cli(tiny_pool["conf"], tmp_path, "method=task_arithmetic", "method.scaling=0.7")
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    stdout = "".join(o[0] for o in outs)
    assert stdout.count("[mergelab] done ") == 1, stdout
    assert stdout.count("finished by a concurrent run") == 1, stdout
    assert len(list(tmp_path.glob("*/result.json"))) == 1


def test_a_sweep_over_merge_only_options_fits_once(tiny_pool, tmp_path):
    """Sens-Merging's σ comes from the experts alone: a second cell that changes only the
    base merge reuses the cached fit and merges bit-identically to a fresh fit of it."""
    runs, fresh = tmp_path / "runs", tmp_path / "fresh"
    common = ["method.n_calibration=4", "task.calibration={split: test, n: 8}"]
    for method in ("sens_ta", "sens_ties"):
        mergelab(tiny_pool["conf"], runs, f"method={method}", *common)
    mergelab(tiny_pool["conf"], fresh, "method=sens_ties", "fit_cache=false", *common)
    by_base = {
        r["method"]["params"]["base_method"]: r
        for r in (json.loads(p.read_text()) for p in runs.glob("*/result.json"))
    }
    first, second = by_base["task_arithmetic"], by_base["ties"]
    assert first["method"]["fit_cache"]["fit"] == "stored"
    assert second["method"]["fit_cache"] == {**first["method"]["fit_cache"], "fit": "reused"}
    (alone,) = [json.loads(p.read_text()) for p in fresh.glob("*/result.json")]
    assert "fit_cache" not in alone["method"]
    assert alone["weights_sha256"] == second["weights_sha256"]
    assert alone["scores"] == second["scores"]
    assert (runs / ".fit_cache" / first["method"]["fit_cache"]["key"] / "state.json").is_file()


def test_a_composed_task_vector_merge_runs_and_tabulates(tiny_pool, tmp_path):
    """The README's composition runs through the CLI; its pieces become table params."""
    runs = tmp_path / "runs"
    composed = ["method=task_vector", "method/transform=drop", "method/coefficients=metagpt"]
    mergelab(tiny_pool["conf"], runs, "-m", *composed, "method.transform.drop_rate=0.3,0.6")
    recs = [json.loads(p.read_text()) for p in runs.glob("*/result.json")]
    assert len(recs) == 2 and all(r["status"] == "complete" for r in recs)
    params = recs[0]["method"]["params"]
    assert params["transform"] == "RandomDrop" and params["coefficients"] == "MetaGPTCoefficients"
    assert {r["method"]["params"]["transform.drop_rate"] for r in recs} == {0.3, 0.6}
    assert sum(recs[0]["method"]["report"]["coefficients"].values()) == pytest.approx(1.0)
    out = mergelab(
        tiny_pool["conf"], runs, str(runs), "--out", str(tmp_path), exe="mergelab-collect"
    )
    assert "task_vector(transform.drop_rate=0.3)" in out.stdout
