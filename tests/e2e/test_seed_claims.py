"""The seed papers' checkable claims (../shared/specs/methods.md) on the xs zoo.

Each comparison runs through the real CLI with the experiment configs the README documents;
cells shared between experiments (task arithmetic, TIES) run once. Scores are the mean of
each suite task's primary metric. Tolerances are stated per claim: the suite's test splits
hold 128-150 docs per task, so one doc moves a task score by ~0.7 points.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
TOL = 0.02  # 2 points of average score


def mergelab(runs: Path, *args: str) -> None:
    env = {**os.environ, "MERGELAB_RUNS": str(runs), "TQDM_DISABLE": "1", "WANDB_SILENT": "true"}
    proc = subprocess.run(
        [shutil.which("mergelab"), *args], capture_output=True, text=True, env=env, timeout=3600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def averages(runs: Path) -> dict[str, dict]:
    """label → {avg, report} for every finished cell under ``runs``."""
    out = {}
    for path in runs.glob("*/result.json"):
        r = json.loads(path.read_text())
        params = r["method"]["params"]
        label = r["config"]["method"]["_target_"].rsplit(".", 1)[1]
        for key in ("base_method", "granularity", "pp", "drop_rate", "model"):
            if key in params:
                label += f":{params[key]}"
        primary = [next(iter(m.values())) for m in r["scores"].values()]
        out[label] = {
            "avg": sum(primary) / len(primary),
            "scores": {task: next(iter(m.values())) for task, m in r["scores"].items()},
            "report": r["method"]["report"],
        }
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("claims")
    for experiment in ("zoo_references", "metagpt_zoo", "sens_merging_zoo", "adamerging_zoo"):
        mergelab(root, "-m", f"+experiment={experiment}")
    result = averages(root)
    print(json.dumps({k: round(v["avg"], 4) for k, v in sorted(result.items())}, indent=1))
    return result


def test_metagpt_coefficients_and_average(runs):
    lam = runs["MetaGPT:none"]["report"]["coefficients"]
    assert all(v >= 0 for v in lam.values()) and sum(lam.values()) == pytest.approx(1.0)
    # MetaGPT average >= task arithmetic (λ=0.3) average, within TOL
    assert runs["MetaGPT:none"]["avg"] >= runs["TaskArithmetic"]["avg"] - TOL


def test_adamerging_lowers_entropy_and_keeps_coefficients_in_range(runs):
    for label in (
        "AdaMerging:task:False",
        "AdaMerging:layer:False",
        "AdaMerging:task:True",
        "AdaMerging:layer:True",
    ):
        rep = runs[label]["report"]
        assert rep["entropy_final"] < rep["entropy_init"], label
        coefs = rep["coefficients"]  # task-wise: {expert: λ}; layer-wise: {tensor: {expert: λ}}
        rows = coefs.values() if rep["granularity"] == "layer" else [coefs]
        values = [v for row in rows for v in row.values()]
        assert values and all(0.0 <= v <= 1.0 for v in values), label


def test_adamerging_ordering(runs):
    """task-wise >= TA(0.3) init; layer-wise >= task-wise (each within TOL)."""
    ta = runs["TaskArithmetic"]["avg"]
    tw, lw = runs["AdaMerging:task:False"]["avg"], runs["AdaMerging:layer:False"]["avg"]
    assert tw >= ta - TOL
    assert lw >= tw - TOL


@pytest.mark.xfail(
    strict=True,
    reason="not reproduced on the xs zoo: ++ scores 6-7 points below plain AdaMerging. Its "
    "0.3-initialised coefficients scale task vectors already trimmed to density 0.2, a far "
    "weaker start than TIES' λ = 1.",
)
def test_adamerging_pp_beats_plain(runs):
    for granularity in ("task", "layer"):
        plain = runs[f"AdaMerging:{granularity}:False"]["avg"]
        assert runs[f"AdaMerging:{granularity}:True"]["avg"] >= plain - TOL, granularity


def test_sens_merging_improves_each_base_method(runs):
    for sens, alone in (
        ("SensMerging:task_arithmetic", "TaskArithmetic"),
        ("SensMerging:ties", "TIES"),
        ("SensMerging:dare_linear:0.5", "DARELinear:0.5"),
    ):
        assert runs[sens]["avg"] >= runs[alone]["avg"] - TOL, sens


@pytest.mark.xfail(
    strict=True,
    reason="not reproduced on the xs zoo: DARE (drop 0.5, λ = 1 for each of four task "
    "vectors) breaks code generation (0.00 vs the code expert's 0.98) and Sens-Merging's mild "
    "rescaling at T = 1 does not repair it.",
)
def test_sens_dare_beats_the_code_expert_on_code(runs):
    code = runs["SensMerging:dare_linear:0.5"]["scores"]["mergelab_code"]
    assert code > runs["Pretrained:code"]["scores"]["mergelab_code"]
