"""Published numbers printed beside ours."""

from __future__ import annotations

import pandas as pd
import pytest

from harness.tables import RecordError, Table, beside_reference, load_reference


def pivot_table(values: dict[str, list[float]], labels: list[str]) -> Table:
    index = pd.Index(labels, name="label")
    frame = pd.DataFrame(values, index=index)
    return Table(
        value=frame,
        ci_low=frame - 0.05,
        ci_high=frame + 0.05,
        sd=frame * float("nan"),
        n_replicates=frame * 0 + 1,
        n_items=frame * 0 + 100,
    )


def test_reference_rows_match_by_method_name(tmp_path):
    pivot = pivot_table({"t": [0.5, 0.7], "average": [0.5, 0.7]}, ["base", "ties(density=0.2)"])
    csv = tmp_path / "ref.csv"
    csv.write_text(
        "paper,arxiv,setup,method,task,metric,value,source\n"
        "P,1,S,ties,average,acc,30.2,x\nP,1,S,metagpt,average,acc,31.5,x\n"
    )
    side = beside_reference(pivot, load_reference([csv]))
    assert side.loc["ties", "ours (average)"] == 0.7
    assert side.loc["ties", "ours (ci_low)"] == pytest.approx(0.65)
    assert side.loc["ties", "ours (ci_high)"] == pytest.approx(0.75)
    assert side.loc["ties", "ours (label)"] == "ties(density=0.2)"
    assert side.loc["ties", "paper value"] == 30.2
    assert pd.isna(side.loc["metagpt", "ours (average)"])  # paper row kept, ours empty
    assert pd.isna(side.loc["base", "paper value"])


def test_reference_csv_missing_columns(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("paper,method,value\nP,ties,1\n")
    with pytest.raises(RecordError, match="lacks columns"):
        load_reference([csv])
