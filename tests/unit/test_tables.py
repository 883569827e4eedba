"""harness.tables on synthetic schema-2 result.json + samples.jsonl files in tmp_path."""

from __future__ import annotations

import json
import math
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harness import tables
from harness.cli import collect_main
from results import stats

N_ITEMS = 100
N_BOOT = 2000
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
TA3, TA5 = "task_arithmetic(scaling=0.3)", "task_arithmetic(scaling=0.5)"


def entry(value, *, primary=False, hib=True, agg="mean", stderr=None):
    return {
        "value": value,
        "stderr": stderr,
        "higher_is_better": hib,
        "aggregation": agg,
        "primary": primary,
    }


def record(cid, method, params, metrics, *, seed=0, pool=POOL, status="complete", groups=None):
    """A schema-2 record; ``metrics``: {task: {key: entry(...)}}."""
    return {
        "schema": 2,
        "status": status,
        "cell_id": cid,
        "sweep": "2026-11-21_12-00-00",
        "config": {"seed": seed},
        "method": {"name": method, "params": params, "report": {}},
        "pool": pool,
        "seed": seed,
        "metrics": metrics,
        "n_shot": {t: 0 for t in metrics},
        "groups": groups or {},
        "scores": {t: {k: e["value"] for k, e in m.items()} for t, m in metrics.items()},
        "stderr": {t: {k: e["stderr"] for k, e in m.items()} for t, m in metrics.items()},
        "n_samples": {t: N_ITEMS for t in metrics},
        "versions": {"python": "3.11.7", "torch": "2.5.1", "mergelab_commit": f"commit-{cid}"},
        "environment": {
            "torch_threads": 1,
            "cpu_capability": "AVX2",
            "machine": "x86_64",
            "packages_sha256": "abc",
            "packages": {"torch": "2.5.1"},
        },
    }


def make_record(cid, method, params, acc, acc_norm, em, **kw):
    metrics = {
        "tiny_math": {
            "acc": entry(acc, primary=True, stderr=0.02),
            "acc_norm": entry(acc_norm, stderr=0.02),
        },
        "tiny_code": {EM: entry(em, primary=True)},
    }
    return record(cid, method, params, metrics, **kw)


def items_for(value: float, aggregation: str, n: int = N_ITEMS) -> list:
    """Per-item values whose aggregate is ``value``: the first value·n items 1 (binary)
    when that is whole, else all equal; perplexities as identical (ll, 1) pairs."""
    if aggregation == "weighted_perplexity":
        return [[-math.log(value), 1.0]] * n
    k = value * n
    if abs(k - round(k)) < 1e-9:
        return [1.0 if i < round(k) else 0.0 for i in range(n)]
    return [value] * n


def write(root: Path, rec: dict, *, samples: bool = True, items: dict | None = None) -> Path:
    """result.json, and samples.jsonl with one line per (task, doc, filter) (plus the keys
    lm-eval writes that collect must ignore); ``items`` overrides {(task, key): values}."""
    path = root / rec["cell_id"] / "result.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    if not samples:
        return path
    lines: dict[tuple, dict] = {}
    for task, metrics in rec["metrics"].items():
        if task in rec.get("groups", {}):
            continue
        for key, e in metrics.items():
            name, _, filt = key.partition("/")
            values = (items or {}).get((task, key)) or items_for(e["value"], e["aggregation"])
            for doc_id, v in enumerate(values):
                line = lines.setdefault(
                    (task, doc_id, filt or "none"),
                    {"task": task, "doc_id": doc_id, "filter": filt or "none", "doc": {"q": "?"}},
                )
                line[name] = v
                line.setdefault("metrics", []).append(name)
    text = "".join(json.dumps(line) + "\n" for line in lines.values())
    (path.parent / "samples.jsonl").write_text(text)
    return path


def intervals_for(root: Path, n_boot: int = N_BOOT) -> tables.Intervals:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tables.Intervals(tables.load_samples(tables.load_records([root])), n_boot=n_boot)


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    for cell in CELLS:
        write(root, make_record(*cell))
    return root


@pytest.fixture
def df(runs: Path) -> pd.DataFrame:
    return tables.tidy(tables.load_records([runs]))


# -- tidy ------------------------------------------------------------------------------
def test_tidy_rows_columns_and_labels(df):
    assert len(df) == len(CELLS) * 3  # tiny_math acc + acc_norm, tiny_code em
    for col in tables.BASE_COLUMNS + ["param.model", "param.scaling", "param.weights"]:
        assert col in df.columns
    assert set(df["label"]) == {"base", "expert:math", "expert:code", TA3, TA5}
    row = df[(df.cell_id == "c3ta03") & (df.metric == "acc_norm")].iloc[0]
    assert row["value"] == 0.51 and row["stderr"] == 0.02 and not row["primary"]
    assert row["task"] == "tiny_math" and row["specialist"] == "math"
    assert row["param.scaling"] == 0.3 and row["pool"] == "tiny" and row["seed"] == 0
    assert row["higher_is_better"] is True and row["aggregation"] == "mean"
    em = df[(df.cell_id == "c3ta03") & (df.task == "tiny_code")].iloc[0]
    assert em["primary"] and math.isnan(em["stderr"])
    assert df.groupby("cell_id")["primary"].sum().eq(2).all()  # one primary per task


def test_primary_comes_from_the_record_not_key_order():
    rec = make_record("c", "ties", {}, 0.3, 0.7, 0.1)
    rec["metrics"]["tiny_math"]["acc"]["primary"] = False
    rec["metrics"]["tiny_math"]["acc_norm"]["primary"] = True
    p = tables.pivot(tables.tidy([rec]))
    assert p.value.loc["ties", "tiny_math"] == pytest.approx(0.7)


def test_schema1_record_is_refused_naming_the_file(tmp_path):
    rec = make_record("old", "ties", {}, 0.3, 0.3, 0.1)
    del rec["metrics"]
    rec["schema"] = 1
    path = write(tmp_path / "runs", rec, samples=False)
    with pytest.raises(tables.RecordError, match=rf"{path}.*schema-1.*force=true"):
        tables.collect([tmp_path / "runs"], tmp_path / "out")


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


# -- pivot -------------------------------------------------------------------------------
def test_pivot_values_order_and_average(df):
    p = tables.pivot(df)
    assert list(p.value.columns) == ["tiny_math", "tiny_code", "average"]
    assert list(p.value.index) == ["base", "expert:math", "expert:code", TA3, TA5]
    assert p.value.loc["base", "tiny_math"] == pytest.approx(0.30)  # primary = acc
    assert p.value.loc[TA5, "tiny_code"] == pytest.approx(0.36)
    assert p.value.loc[TA3, "average"] == pytest.approx(0.40)
    assert p.value.loc["expert:math", "average"] == pytest.approx(0.325)
    assert p.ci_low.isna().all().all()  # no intervals asked for
    assert (p.n_replicates == 1).all().all() and p.sd.isna().all().all()

    by_norm = tables.pivot(df, metric="acc_norm")
    assert list(by_norm.value.columns) == ["tiny_math", "average"]
    assert by_norm.value.loc[TA5, "tiny_math"] == pytest.approx(0.50)
    with pytest.raises(ValueError, match="f1"):
        tables.pivot(df, metric="f1")


def test_pivot_intervals_by_hand(tmp_path):
    """Two cells: the interval is the documented bootstrap (items resampled on the task's
    stream), constant items give a zero-width one, the average's lies between."""
    root = tmp_path / "runs"
    write(root, make_record("c0base", "pretrained", {"model": "base"}, 0.30, 0.3, 0.10))
    write(
        root,
        make_record("c1ties", "ties", {}, 0.55, 0.5, 0.25),
        items={("tiny_code", EM): [0.25] * N_ITEMS},
    )
    df = tables.tidy(tables.load_records([root]))
    p = tables.pivot(df, intervals=intervals_for(root))
    math_items = np.array(items_for(0.55, "mean"))
    draws = stats.resample_items(math_items, n_boot=N_BOOT, stream=zlib.crc32(b"tiny_math"))[0]
    low, high = np.quantile(draws, [0.025, 0.975])
    assert p.ci_low.loc["ties", "tiny_math"] == pytest.approx(low)
    assert p.ci_high.loc["ties", "tiny_math"] == pytest.approx(high)
    half = 1.96 * math.sqrt(0.55 * 0.45 / N_ITEMS)
    assert (low, high) == pytest.approx((0.55 - half, 0.55 + half), abs=0.02)
    assert p.ci_low.loc["ties", "tiny_code"] == p.ci_high.loc["ties", "tiny_code"] == 0.25
    avg = (p.ci_low.loc["ties", "average"], p.ci_high.loc["ties", "average"])
    assert avg == pytest.approx(((low + 0.25) / 2, (high + 0.25) / 2))  # tiny_code constant
    assert p.value.loc["ties", "average"] == pytest.approx(0.40)
    assert p.n_items.loc["ties", "tiny_math"] == N_ITEMS
    assert p.n_items.loc["base", "average"] == 2 * N_ITEMS

    long = p.long()
    assert list(long.columns) == ["label", "task", *tables.STATS]
    row = long[(long.label == "ties") & (long.task == "tiny_math")].iloc[0]
    assert (row.value, row.ci_low, row.ci_high) == pytest.approx((0.55, low, high))
    assert row.n_replicates == 1 and row.n_items == N_ITEMS and math.isnan(row.sd)
    md = tables.markdown(p)
    assert f"0.5500 [{low:#.4g}, {high:#.4g}]" in md and "0.2500 [0.2500, 0.2500]" in md


def test_replicates_give_mean_sd_and_a_two_level_interval(tmp_path):
    root = tmp_path / "runs"
    write(root, make_record("b", "pretrained", {"model": "base"}, 0.5, 0.5, 0.5))
    for cid, seed, acc in (("r0", 0, 0.40), ("r1", 1, 0.60), ("r2", 2, 0.50)):
        write(root, make_record(cid, "ties", {}, acc, 0.5, 0.5, seed=seed))
    df = tables.tidy(tables.load_records([root]))
    p = tables.pivot(df, intervals=intervals_for(root))
    assert p.value.loc["ties", "tiny_math"] == pytest.approx(0.5)
    assert p.sd.loc["ties", "tiny_math"] == pytest.approx(0.1)
    assert p.n_replicates.loc["ties", "tiny_math"] == 3
    assert p.sd.loc["ties", "average"] == pytest.approx(0.05)  # per-replicate averages
    one = p.ci_high.loc["base", "tiny_math"] - p.ci_low.loc["base", "tiny_math"]
    three = p.ci_high.loc["ties", "tiny_math"] - p.ci_low.loc["ties", "tiny_math"]
    assert three > 1.3 * one  # seeds that disagree widen the interval
    assert "± 0.1000 (n=3)" in tables.markdown(p)
    assert r"$\pm$ 0.1000 (n=3)" in tables.latex(p)
    long = p.long()
    assert long[(long.label == "ties") & (long.task == "tiny_math")].iloc[0].n_replicates == 3


def test_average_leaves_out_lower_is_better_tasks_by_their_flag(tmp_path):
    """Direction comes from higher_is_better, not the metric's name."""
    rec = record(
        "c1",
        "ties",
        {},
        {
            "x_a": {"acc": entry(0.5, primary=True)},
            "x_b": {"acc": entry(0.7, primary=True)},
            "x_err": {"error_rate": entry(0.9, primary=True, hib=False)},
            "x_ppl": {"word_perplexity": entry(12.0, primary=True, hib=None, agg="x")},
        },
    )
    df = tables.tidy([rec])
    assert tables.pivot(df).value.loc["ties", "average"] == pytest.approx((0.5 + 0.7 + 12) / 3)
    only_lower = tables.tidy(
        [record("c", "ties", {}, {"e1": {"err": entry(0.2, primary=True, hib=False)}})]
    )
    assert tables.pivot(only_lower).value.loc["ties", "average"] == pytest.approx(0.2)


def test_groups_are_one_column_with_their_subtasks_interval(tmp_path):
    root = tmp_path / "runs"
    metrics = {
        "grp": {"acc": entry(0.3667, primary=True)},
        "grp_in": {"acc": entry(0.3, primary=True)},
        "grp_a": {"acc": entry(0.3, primary=True)},
        "grp_b": {"acc": entry(0.5, primary=True)},
        "solo": {"acc": entry(0.6, primary=True)},
    }
    groups = {
        "grp": {"subtasks": ["grp_a", "grp_b"], "weight_by_size": True, "aggregation": "mean"},
        "grp_in": {"subtasks": ["grp_a"], "weight_by_size": False, "aggregation": "mean"},
    }
    rec = record("c1", "ties", {}, metrics, groups=groups)
    write(root, rec, items={("grp_b", "acc"): items_for(0.5, "mean", 50)})
    df = tables.tidy(tables.load_records([root]))
    parents = df.set_index("task")["group"]
    assert parents[["grp_in", "grp_a", "grp_b"]].tolist() == ["grp", "grp", "grp"]
    assert parents[["grp", "solo"]].isna().all()
    p = tables.pivot(df, intervals=intervals_for(root))
    assert list(p.value.columns) == ["grp", "solo", "average"]  # leaves and nested group hidden
    assert p.value.loc["ties", "grp"] == pytest.approx(0.3667)
    assert p.n_items.loc["ties", "grp"] == 150
    # weighted by size: the interval of the micro average over the 150 items
    pooled = np.array(items_for(0.3, "mean") + items_for(0.5, "mean", 50))
    low, high = p.ci_low.loc["ties", "grp"], p.ci_high.loc["ties", "grp"]
    assert low < pooled.mean() < high
    expected = stats.interval(pooled, n_boot=N_BOOT)  # stratified ≈ pooled item bootstrap
    assert high - low == pytest.approx(expected.high - expected.low, rel=0.2)


# -- samples -------------------------------------------------------------------------------
def test_cells_without_samples_tabulate_with_one_warning(runs, tmp_path):
    for cid in ("c0base", "c3ta03"):
        (runs / cid / "samples.jsonl").unlink()
    with pytest.warns(UserWarning, match=r"no samples\.jsonl for cell\(s\) c0base, c3ta03") as w:
        out = tables.collect([runs], tmp_path / "t", n_boot=200)
    assert sum("samples.jsonl" in str(x.message) for x in w) == 1
    p = out["pivot"]
    assert p.value.loc["base", "tiny_math"] == pytest.approx(0.30)
    assert p.ci_low.loc[["base", TA3]].isna().all().all()
    assert p.ci_low.loc[["expert:math", TA5]].notna().all().all()


def test_item_sets_that_differ_pair_on_the_shared_items_with_a_warning(tmp_path):
    root = tmp_path / "runs"
    write(root, make_record("c0base", "pretrained", {"model": "base"}, 0.3, 0.3, 0.1))
    short = {("tiny_math", "acc"): items_for(0.55, "mean")[:80]}
    write(root, make_record("c1ties", "ties", {}, 0.55, 0.5, 0.1), items=short)
    df = tables.tidy(tables.load_records([root]))
    iv = intervals_for(root)
    with pytest.warns(UserWarning, match=r"c0base \(100\), c1ties \(80\).*80 they share") as w:
        c = tables.compare(df, "base", intervals=iv)
    assert len(w) == 1
    assert c.n_items.loc["ties", "tiny_math"] == 80
    assert c.value.loc["ties", "tiny_math"] == pytest.approx(55 / 80 - 30 / 80)


def test_bad_samples_line_names_the_file(runs):
    bad = runs / "c1math" / "samples.jsonl"
    bad.write_text(bad.read_text() + "{not json\n")
    with pytest.raises(tables.RecordError, match=r"c1math/samples\.jsonl:\d+"):
        tables.load_samples(tables.load_records([runs]))


# -- normalised, compare ---------------------------------------------------------------------
def test_normalised_by_hand(runs, df):
    n = tables.normalised(df, intervals=intervals_for(runs))
    assert list(n.value.columns) == ["tiny_math", "tiny_code", "average"]
    assert n.value.index[0] == "base"
    # references: expert:math on tiny_math = 0.60, expert:code on tiny_code = 0.40
    ta3 = n.value.loc[TA3]
    assert ta3["tiny_math"] == pytest.approx(0.50 / 0.60)
    assert ta3["tiny_code"] == pytest.approx(0.30 / 0.40)
    assert ta3["average"] == pytest.approx((0.50 / 0.60 + 0.30 / 0.40) / 2)
    assert n.value.loc[TA5, "tiny_math"] == pytest.approx(0.55 / 0.60)
    assert n.value.loc["base", "tiny_code"] == pytest.approx(0.25)
    # the expert against itself: exactly 1 on every resample
    assert (
        n.ci_low.loc["expert:math", "tiny_math"],
        n.ci_high.loc["expert:math", "tiny_math"],
    ) == (
        1.0,
        1.0,
    )
    assert n.ci_low.loc[TA3, "tiny_math"] < 0.50 / 0.60 < n.ci_high.loc[TA3, "tiny_math"]


def test_normalised_missing_expert_warns_with_cells_to_run(tmp_path):
    root = tmp_path / "runs"
    for cell in CELLS:
        if cell[0] != "c2code":
            write(root, make_record(*cell))
    df = tables.tidy(tables.load_records([root]))
    with pytest.warns(UserWarning, match=r"method=pretrained method\.model=code"):
        n = tables.normalised(df)
    assert n.value["tiny_code"].isna().all() and n.value["average"].isna().all()
    assert n.value.loc[TA3, "tiny_math"] == pytest.approx(0.50 / 0.60)


def test_compare_marks_a_better_cell_significant_and_an_identical_one_not(tmp_path):
    root = tmp_path / "runs"
    write(root, make_record("c0base", "pretrained", {"model": "base"}, 0.30, 0.3, 0.10))
    write(root, make_record("c1good", "ties", {"density": 0.2}, 0.80, 0.3, 0.60))
    write(root, make_record("c2same", "ties", {"density": 0.4}, 0.30, 0.3, 0.10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no item or environment warnings here
        warnings.filterwarnings("ignore", "normalised: no pretrained reference")
        out = tables.collect([root], tmp_path / "t", n_boot=N_BOOT, baseline="base")
    c = out["compare"]
    good, same = "ties(density=0.2)", "ties(density=0.4)"
    assert list(c.value.index) == [good, same] and c.baseline == "base"
    assert c.value.loc[good, "tiny_math"] == pytest.approx(0.5)
    assert c.value.loc[good, "average"] == pytest.approx(0.5)
    assert c.significant.loc[good].tolist() == [True, True, True]
    assert c.mcnemar_p.loc[good, "tiny_math"] == pytest.approx(2 * 0.5**50)
    assert math.isnan(c.mcnemar_p.loc[good, "average"])
    assert c.significant.loc[same].tolist() == [False, False, False]
    assert c.ci_low.loc[same].tolist() == c.ci_high.loc[same].tolist() == [0.0, 0.0, 0.0]
    assert c.mcnemar_p.loc[same, "tiny_math"] == 1.0

    md = (tmp_path / "t" / "compare.md").read_text()
    assert "+0.5000 [" in md and "] * p=1.8e-15" in md and "+0.000 [+0.000, +0.000] p=1" in md
    csv = pd.read_csv(tmp_path / "t" / "compare.csv")
    assert {"baseline", "significant", "mcnemar_p", "ci_low", "ci_high"} <= set(csv.columns)
    assert (tmp_path / "t" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match=r"'nope'.*labels: \['base', 'ties\(density=0.2\)'"):
        tables.compare(out["tidy"], "nope")


def test_compare_pairs_replicates_with_a_single_baseline(tmp_path):
    root = tmp_path / "runs"
    write(root, make_record("b", "pretrained", {"model": "base"}, 0.30, 0.3, 0.10))
    for cid, seed, acc in (("r0", 0, 0.50), ("r1", 1, 0.70)):
        write(root, make_record(cid, "ties", {}, acc, 0.3, 0.1, seed=seed))
    df = tables.tidy(tables.load_records([root]))
    c = tables.compare(df, "base", intervals=intervals_for(root))
    assert c.value.loc["ties", "tiny_math"] == pytest.approx(0.3)
    assert c.sd.loc["ties", "tiny_math"] == pytest.approx(math.sqrt(0.02))
    assert c.n_replicates.loc["ties", "tiny_math"] == 2
    # largest of the two McNemar p-values: 20 discordant pairs (0.5 vs 0.3)
    assert c.mcnemar_p.loc["ties", "tiny_math"] == pytest.approx(2 * 0.5**20)


# -- environments ------------------------------------------------------------------------------
def test_mixed_versions_and_threads_warn_once_naming_cells(runs, tmp_path):
    rec = json.loads((runs / "c3ta03" / "result.json").read_text())
    rec["versions"]["torch"] = "2.6.0"
    rec["environment"]["torch_threads"] = 4
    (runs / "c3ta03" / "result.json").write_text(json.dumps(rec))
    with pytest.warns(UserWarning, match="different environments") as w:
        tables.collect([runs], tmp_path / "t", n_boot=100)
    (msg,) = [str(x.message) for x in w if "environments" in str(x.message)]
    assert 'versions.torch = "2.5.1" (c0base, c1math, c2code, c4ta05) | "2.6.0" (c3ta03)' in msg
    assert "environment.torch_threads = 1 (" in msg and "4 (c3ta03)" in msg
    assert "mergelab_commit" not in msg


def test_same_environment_does_not_warn(runs, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # different mergelab_commit per cell is fine
        tables.collect([runs], tmp_path / "t", n_boot=100)


# -- export, plots, collect ----------------------------------------------------------------------
def test_export_writes_md_csv_tex(runs, df, tmp_path):
    iv = intervals_for(runs)
    tabs = {"pivot": tables.pivot(df, intervals=iv), "normalised": tables.normalised(df)}
    written = tables.export(tabs, tmp_path / "out")
    names = sorted(p.name for p in written)
    assert names == sorted(f"{t}.{f}" for t in tabs for f in ("md", "csv", "tex"))

    md = (tmp_path / "out" / "pivot.md").read_text()
    assert "| label" in md and TA3 in md
    assert "0.3000 [" in md and "0.4550 [" in md and "0.3250 [" in md  # 4 significant digits
    assert "0.8333" in (tmp_path / "out" / "normalised.md").read_text()

    back = pd.read_csv(tmp_path / "out" / "pivot.csv")
    assert list(back.columns) == ["label", "task", *tables.STATS]
    assert len(back) == 5 * 3
    wide = back.pivot(index="label", columns="task", values="value")
    assert wide.loc[TA5, "average"] == pytest.approx(0.455)
    assert back["ci_low"].notna().all() and (back["n_items"] > 0).all()

    tex = (tmp_path / "out" / "pivot.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "tiny\\_math" in tex
    assert tex.count("task\\_arithmetic(scaling=0.3) & 0.5000 [") == 1
    ntex = (tmp_path / "out" / "normalised.tex").read_text()
    assert "task\\_arithmetic(scaling=0.3) & 0.8333 & 0.7500 & 0.7917 \\\\" in ntex
    with pytest.raises(ValueError, match="html"):
        tables.export(tabs, tmp_path / "out", formats=("html",))


def test_plot_writes_png(runs, df, tmp_path):
    p = tables.pivot(df, intervals=intervals_for(runs, n_boot=200))
    path = tables.plot_scores(p, tmp_path / "plots" / "scores.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_collect_end_to_end(runs, tmp_path):
    out = tmp_path / "tables"
    result = tables.collect([runs], out, n_boot=500)
    assert set(result) == {"tidy", "pivot", "normalised"}
    for name in ("tidy.csv", "pivot.md", "pivot.csv", "pivot.tex", "normalised.md"):
        assert (out / name).is_file(), name
    assert (out / "scores.png").stat().st_size > 0
    assert result["pivot"].value.loc[TA5, "average"] == pytest.approx(0.455)
    assert result["pivot"].ci_low.notna().all().all()
    assert len(pd.read_csv(out / "tidy.csv")) == 15
    none = tables.collect([runs], tmp_path / "none", n_boot=0)
    assert none["pivot"].ci_low.isna().all().all()


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
    df = tables.tidy(recs)
    p = tables.pivot(df)
    assert p.value.index.names == ["pool", "label"]
    assert p.value.index[0] == ("other", "base") and len(p.value) == 10
    assert "| pool" in tables.markdown(p)
    c = tables.compare(df, "base")
    assert len(c.value) == 8 and ("tiny", TA3) in c.value.index
    assert c.value.loc[("other", TA3), "tiny_math"] == pytest.approx(0.2)


# -- own task ------------------------------------------------------------------------------------
def bora_record(cid, tau, task, scores, hib=False, agg="weighted_perplexity"):
    metrics = {
        t: {m: entry(v, primary=i == 0, hib=hib, agg=agg) for i, (m, v) in enumerate(ms.items())}
        for t, ms in scores.items()
    }
    return record(cid, "bora", {"tau": tau, "task": task}, metrics)


def test_own_task_table_takes_each_cells_own_task(tmp_path):
    """Per-task cells (BoRA-style ``task`` parameter) scored on every task: the own-task
    table keeps the diagonal, one row per setting, with the mean over tasks."""
    root = tmp_path / "runs"
    ppl = {("a", 0): 3.0, ("b", 0): 5.0, ("a", 10): 2.0, ("b", 10): 4.5}
    for (task, tau), own in ppl.items():
        other = "b" if task == "a" else "a"
        scores = {
            f"x_{task}_ppl": {"word_perplexity": own},
            f"x_{other}_ppl": {"word_perplexity": 99.0},
        }
        write(root, bora_record(f"c{task}{tau}", tau, task, scores))
    out = tables.collect([root], tmp_path / "tables", metric="word_perplexity", n_boot=200)
    own = out["own_task"]
    assert list(own.value.index) == ["bora(tau=0)", "bora(tau=10)"]
    assert list(own.value.columns) == ["a", "b", "mean"]
    assert own.value.loc["bora(tau=0)"].tolist() == pytest.approx([3.0, 5.0, 4.0])
    assert own.value.loc["bora(tau=10)"].tolist() == pytest.approx([2.0, 4.5, 3.25])
    # every item has the same perplexity: zero-width intervals
    assert own.ci_low.loc["bora(tau=10)"].tolist() == pytest.approx([2.0, 4.5, 3.25])
    assert (tmp_path / "tables" / "own_task.md").exists()
    assert (tmp_path / "tables" / "own_task.png").exists()
    # lower-is-better only: the primary-metric table keeps them
    assert "own_task" in tables.collect([root], tmp_path / "primary", n_boot=0)


def test_no_own_task_table_without_a_task_parameter(runs, tmp_path):
    assert "own_task" not in tables.collect([runs], tmp_path / "t", n_boot=0)
    assert tables._drop_param("bora(tau=1, task=m)", "task") == "bora(tau=1)"
    assert tables._drop_param("bora(task=m)", "task") == "bora"


def test_own_task_and_average_leave_out_lower_is_better_beside_higher(tmp_path):
    rec = bora_record(
        "c1", 1, "a", {"x_a": {"acc": 0.5}, "x_b": {"acc": 0.7}}, hib=True, agg="mean"
    )
    rec["metrics"]["x_a_ppl"] = {
        "word_perplexity": entry(12.0, primary=True, hib=False, agg="weighted_perplexity"),
        "bits_per_byte": entry(0.8, hib=False, agg="bits_per_byte"),
    }
    df = tables.tidy([rec])
    assert tables.pivot(df).value.loc["bora", "average"] == pytest.approx(0.6)
    assert tables.pivot(df, "word_perplexity").value.loc["bora", "average"] == pytest.approx(12.0)
    assert tables.own_task(df).value.loc["bora", "a"] == pytest.approx(0.5)  # x_a, not x_a_ppl


# -- CLI and W&B ---------------------------------------------------------------------------------
def test_cli_prints_tables_and_comparison(runs, tmp_path, capsys):
    out = tmp_path / "t"
    argv = [str(runs), "--out", str(out), "--bootstrap", "300", "--baseline", "base"]
    collect_main([*argv, "--wandb", "disabled", "--level", "0.9"])
    printed = capsys.readouterr().out
    assert "90% bootstrap interval" in printed and "Normalised" in printed
    assert f"| {TA5}" in printed and "0.4550 [" in printed
    assert "Δ = label − base" in printed and "+0.2000 [" in printed
    assert (out / "compare.md").is_file() and not (out / "wandb").exists()
    with pytest.raises(SystemExit):
        collect_main([str(runs), "--level", "95"])


def test_log_wandb_offline_writes_one_collect_run(runs, tmp_path):
    from harness.tracking import read_offline_run, read_transaction_log

    out = tmp_path / "t"
    result = tables.collect([runs], out, n_boot=100, baseline="base")
    assert tables.log_wandb(result, out, mode="disabled") is None and not (out / "wandb").exists()
    run_dir = tables.log_wandb(result, out, mode="offline", project="mergelab-test")
    assert run_dir is not None and run_dir.parent == out / "wandb"
    run = read_offline_run(run_dir)
    assert run["project"] == "mergelab-test" and run["exit_code"] == 0
    (row,) = run["history"]
    assert {"pivot", "normalised", "compare"} <= set(row)
    assert row["pivot"]["_type"] == "table-file" and row["pivot"]["nrows"] == 15
    (log,) = run_dir.glob("run-*.wandb")
    job_types = {r.run.job_type for r in read_transaction_log(log) if r.HasField("run")}
    assert job_types == {"collect"}
