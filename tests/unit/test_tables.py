"""harness.tables on synthetic result.json files written to tmp_path."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pandas as pd
import pytest

from harness import tables

POOL = {
    "name": "tiny",
    "base": "hub/base",
    "experts": {
        "math": {"path": "hub/math", "tasks": ["tiny_math"]},
        "code": {"path": "hub/code", "tasks": ["tiny_code"]},
    },
}

# (cell_id, method, params, tiny_math acc, tiny_math acc_norm, tiny_code exact_match)
CELLS = [
    ("c0base", "pretrained", {"model": "base"}, 0.30, 0.32, 0.10),
    ("c1math", "pretrained", {"model": "math"}, 0.60, 0.62, 0.05),
    ("c2code", "pretrained", {"model": "code"}, 0.20, 0.22, 0.40),
    ("c3ta03", "task_arithmetic", {"scaling": 0.3, "weights": None}, 0.50, 0.51, 0.30),
    ("c4ta05", "task_arithmetic", {"scaling": 0.5, "weights": None}, 0.55, 0.50, 0.36),
]
EM = "exact_match/strict-match"


def make_record(cid, method, params, acc, acc_norm, em, *, status="complete", seed=0, pool=POOL):
    return {
        "schema": 1,
        "status": status,
        "cell_id": cid,
        "sweep": "2026-11-21_12-00-00",
        "created": "2026-11-21T12:00:00+00:00",
        "config": {"seed": seed},
        "method": {"name": method, "params": params, "report": {}},
        "pool": pool,
        "seed": seed,
        "scores": {"tiny_math": {"acc": acc, "acc_norm": acc_norm}, "tiny_code": {EM: em}},
        "stderr": {"tiny_math": {"acc": 0.02, "acc_norm": 0.02}, "tiny_code": {EM: None}},
        "timings": {"load": 0.1, "merge": 1.2, "save": 0.3, "eval": 5.0, "total": 6.6},
        "versions": {"python": "3.11.7"},
        "weights_sha256": "abc",
    }


def write(root: Path, record: dict) -> Path:
    path = root / record["cell_id"] / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for cell in CELLS:
        write(root, make_record(*cell))
    return root


@pytest.fixture
def df(runs: Path) -> pd.DataFrame:
    return tables.tidy(tables.load_records([runs]))


def test_tidy_rows_columns_and_labels(df):
    assert len(df) == len(CELLS) * 3  # tiny_math acc + acc_norm, tiny_code em
    for col in tables.BASE_COLUMNS + ["param.model", "param.scaling", "param.weights"]:
        assert col in df.columns
    assert set(df["label"]) == {
        "base",
        "expert:math",
        "expert:code",
        "task_arithmetic(scaling=0.3)",
        "task_arithmetic(scaling=0.5)",
    }
    row = df[(df.cell_id == "c3ta03") & (df.metric == "acc_norm")].iloc[0]
    assert row["value"] == 0.51 and row["stderr"] == 0.02 and not row["primary"]
    assert row["task"] == "tiny_math" and row["specialist"] == "math"
    assert row["param.scaling"] == 0.3 and row["pool"] == "tiny" and row["seed"] == 0
    em = df[(df.cell_id == "c3ta03") & (df.task == "tiny_code")].iloc[0]
    assert em["primary"] and math.isnan(em["stderr"])
    assert df.groupby("cell_id")["primary"].sum().eq(2).all()  # one primary per task


def test_label_lists_only_varying_params():
    recs = [
        make_record("a", "ties", {"density": 0.2, "trim_scope": "global"}, 0, 0, 0),
        make_record("b", "ties", {"density": 0.4, "trim_scope": "global"}, 0, 0, 0),
        make_record("c", "weight_average", {"weights": None}, 0, 0, 0),
        make_record("d", "dare_ties", {"drop_rate": 0.5, "weights": [1, 2]}, 0, 0, 0),
        make_record("e", "dare_ties", {"drop_rate": 0.5, "weights": None}, 0, 0, 0),
    ]
    labels = list(dict.fromkeys(tables.tidy(recs)["label"]))
    assert labels == [
        "ties(density=0.2)",
        "ties(density=0.4)",
        "weight_average",
        "dare_ties(weights=[1,2])",
        "dare_ties(weights=null)",
    ]


def test_pivot_values_order_and_average(df):
    p = tables.pivot(df)
    assert list(p.columns) == ["tiny_math", "tiny_code", "average"]
    assert list(p.index) == [
        "base",
        "expert:math",
        "expert:code",
        "task_arithmetic(scaling=0.3)",
        "task_arithmetic(scaling=0.5)",
    ]
    assert p.loc["base", "tiny_math"] == pytest.approx(0.30)  # primary = acc
    assert p.loc["task_arithmetic(scaling=0.5)", "tiny_code"] == pytest.approx(0.36)
    assert p.loc["task_arithmetic(scaling=0.3)", "average"] == pytest.approx(0.40)
    assert p.loc["expert:math", "average"] == pytest.approx(0.325)

    by_norm = tables.pivot(df, metric="acc_norm")
    assert list(by_norm.columns) == ["tiny_math", "average"]
    assert by_norm.loc["task_arithmetic(scaling=0.5)", "tiny_math"] == pytest.approx(0.50)
    with pytest.raises(ValueError, match="f1"):
        tables.pivot(df, metric="f1")


def test_pivot_sorts_params_numerically_and_averages_seeds():
    recs = [
        make_record("s10", "task_arithmetic", {"scaling": 10}, 0.1, 0, 0.1),
        make_record("s2", "task_arithmetic", {"scaling": 2}, 0.2, 0, 0.2),
        make_record("s2b", "task_arithmetic", {"scaling": 2}, 0.4, 0, 0.4, seed=1),
        make_record("base", "pretrained", {"model": "base"}, 0.0, 0, 0.0),
    ]
    p = tables.pivot(tables.tidy(recs))
    assert list(p.index) == [
        "base",
        "task_arithmetic(scaling=2)",
        "task_arithmetic(scaling=10)",
    ]
    assert p.loc["task_arithmetic(scaling=2)", "tiny_math"] == pytest.approx(0.3)


def test_normalised_by_hand(df):
    n = tables.normalised(df)
    assert list(n.columns) == ["tiny_math", "tiny_code", "average"]
    assert n.index[0] == "base"
    # references: expert:math on tiny_math = 0.60, expert:code on tiny_code = 0.40
    ta3 = n.loc["task_arithmetic(scaling=0.3)"]
    assert ta3["tiny_math"] == pytest.approx(0.50 / 0.60)
    assert ta3["tiny_code"] == pytest.approx(0.30 / 0.40)
    assert ta3["average"] == pytest.approx((0.50 / 0.60 + 0.30 / 0.40) / 2)
    ta5 = n.loc["task_arithmetic(scaling=0.5)"]
    assert ta5["tiny_math"] == pytest.approx(0.55 / 0.60)
    assert ta5["tiny_code"] == pytest.approx(0.36 / 0.40)
    assert n.loc["expert:math", "tiny_math"] == pytest.approx(1.0)
    assert n.loc["expert:code", "tiny_code"] == pytest.approx(1.0)
    assert n.loc["base", "tiny_code"] == pytest.approx(0.25)


def test_normalised_missing_expert_warns_with_cells_to_run(tmp_path):
    root = tmp_path / "runs"
    for cell in CELLS:
        if cell[0] != "c2code":
            write(root, make_record(*cell))
    df = tables.tidy(tables.load_records([root]))
    with pytest.warns(UserWarning, match=r"method=pretrained method\.model=code"):
        n = tables.normalised(df)
    assert n["tiny_code"].isna().all() and n["average"].isna().all()
    assert n.loc["task_arithmetic(scaling=0.3)", "tiny_math"] == pytest.approx(0.50 / 0.60)


def test_export_writes_md_csv_tex(df, tmp_path):
    tabs = {"pivot": tables.pivot(df), "normalised": tables.normalised(df)}
    written = tables.export(tabs, tmp_path / "out")
    names = sorted(p.name for p in written)
    assert names == sorted(f"{t}.{f}" for t in tabs for f in ("md", "csv", "tex"))

    md = (tmp_path / "out" / "pivot.md").read_text()
    assert "| label" in md and "task_arithmetic(scaling=0.3)" in md
    assert "0.3000" in md and "0.4550" in md and "0.3250" in md  # 4 significant digits
    assert "0.8333" in (tmp_path / "out" / "normalised.md").read_text()

    back = pd.read_csv(tmp_path / "out" / "pivot.csv", index_col="label")
    pd.testing.assert_frame_equal(back, tabs["pivot"], check_names=False)

    tex = (tmp_path / "out" / "pivot.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "tiny\\_math" in tex
    assert "task\\_arithmetic(scaling=0.3) & 0.5000 & 0.3000 & 0.4000 \\\\" in tex
    with pytest.raises(ValueError, match="html"):
        tables.export(tabs, tmp_path / "out", formats=("html",))


def test_plot_writes_png(df, tmp_path):
    path = tables.plot_scores(tables.pivot(df), tmp_path / "plots" / "scores.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_collect_end_to_end(runs, tmp_path):
    out = tmp_path / "tables"
    result = tables.collect([runs], out)
    assert set(result) == {"tidy", "pivot", "normalised"}
    for name in ("tidy.csv", "pivot.md", "pivot.csv", "pivot.tex", "normalised.md"):
        assert (out / name).is_file(), name
    assert (out / "scores.png").stat().st_size > 0
    assert result["pivot"].loc["task_arithmetic(scaling=0.5)", "average"] == pytest.approx(0.455)
    assert len(pd.read_csv(out / "tidy.csv")) == 15


def test_incomplete_records_skipped_with_warning(runs):
    write(runs, make_record("c9run", "ties", {"density": 0.2}, 0, 0, 0, status="running"))
    with pytest.warns(UserWarning, match=r"c9run.*'running'"):
        recs = tables.load_records([runs])
    assert sorted(r["cell_id"] for r in recs) == [c[0] for c in CELLS]


def test_single_file_and_duplicates(runs):
    one = runs / "c3ta03" / "result.json"
    assert [r["cell_id"] for r in tables.load_records([one])] == ["c3ta03"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same file twice is silently read once
        assert len(tables.load_records([runs, one])) == len(CELLS)


def test_bad_json_raises_naming_the_file(runs):
    bad = runs / "cbad" / "result.json"
    bad.parent.mkdir()
    bad.write_text('{"status": "complete", ')
    with pytest.raises(tables.RecordError, match="cbad/result.json"):
        tables.load_records([runs])
    with pytest.raises(FileNotFoundError):
        tables.load_records([runs / "nope"])


def test_several_pools_index_by_pool_and_label():
    other = {**POOL, "name": "other"}
    recs = [make_record(*c) for c in CELLS] + [
        make_record("o" + c[0], *c[1:], pool=other) for c in CELLS
    ]
    p = tables.pivot(tables.tidy(recs))
    assert p.index.names == ["pool", "label"]
    assert p.index[0] == ("other", "base") and len(p) == 10
    assert "| pool" in tables.markdown(p)


def test_own_task_table_takes_each_cells_own_task(tmp_path):
    """Per-task cells (BoRA-style ``task`` parameter) scored on every task: the own-task
    table keeps the diagonal, one row per setting, with the mean over tasks."""
    root = tmp_path / "runs"
    ppl = {("a", 0): 3.0, ("b", 0): 5.0, ("a", 10): 2.0, ("b", 10): 4.5}
    for (task, tau), own in ppl.items():
        other = "b" if task == "a" else "a"
        rec = make_record(f"c{task}{tau}", "bora", {"tau": tau, "task": task}, 0, 0, 0)
        rec["scores"] = {
            f"x_{task}_ppl": {"word_perplexity": own},
            f"x_{other}_ppl": {"word_perplexity": 99.0},
        }
        rec["stderr"] = {}
        write(root, rec)
    out = tables.collect([root], tmp_path / "tables", metric="word_perplexity")
    assert "own_task" not in tables.collect([root], tmp_path / "primary")  # perplexity only
    own = out["own_task"]
    assert list(own.index) == ["bora(tau=0)", "bora(tau=10)"]
    assert list(own.columns) == ["a", "b", "mean"]
    assert own.loc["bora(tau=0)"].tolist() == [3.0, 5.0, 4.0]
    assert own.loc["bora(tau=10)"].tolist() == [2.0, 4.5, 3.25]
    assert (tmp_path / "tables" / "own_task.md").exists()
    assert (tmp_path / "tables" / "own_task.png").exists()


def test_no_own_task_table_without_a_task_parameter(runs, tmp_path):
    assert "own_task" not in tables.collect([runs], tmp_path / "t")
    assert tables._drop_param("bora(tau=1, task=m)", "task") == "bora(tau=1)"
    assert tables._drop_param("bora(task=m)", "task") == "bora"


def test_average_leaves_out_perplexities_beside_accuracies(tmp_path):
    root = tmp_path / "runs"
    rec = make_record("c1", "bora", {"tau": 1, "task": "a"}, 0, 0, 0)
    rec["scores"] = {
        "x_a": {"acc": 0.5},
        "x_b": {"acc": 0.7},
        "x_a_ppl": {"word_perplexity": 12.0, "bits_per_byte": 0.8},
    }
    rec["stderr"] = {}
    write(root, rec)
    df = tables.tidy(tables.load_records([root]))
    assert tables.pivot(df).loc["bora", "average"] == pytest.approx(0.6)
    assert tables.pivot(df, "word_perplexity").loc["bora", "average"] == pytest.approx(12.0)
    assert tables.own_task(df).loc["bora", "a"] == pytest.approx(0.5)  # x_a, not x_a_ppl
