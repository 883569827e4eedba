"""Claims as statistical tests: a paired interval over several seeds, and a verdict.

A claim compares A with B on the same items (per task, or the macro average over tasks)
over several seeds: per-item values are stacked as ``(n_seeds, n_items)`` arrays, items
aligned by document across seeds and sides, and :func:`results.stats.paired` (one task) or
:func:`results.stats.macro_paired` (the average) gives the two-level bootstrap interval of
A − B (seeds resampled, then items). :func:`results.stats.verdict` turns it into
*reproduced*, *not reproduced* or *inconclusive*. Tests assert the verdict that was
measured; :func:`markdown` prints the table the README quotes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness.tables import load_samples
from results.stats import Paired, macro_paired, paired, verdict

N_BOOT = 10_000


@dataclass(frozen=True)
class Verdict:
    """One claim's paired interval of A − B and its verdict."""

    claim: str
    diff: Paired
    direction: int
    verdict: str

    def row(self) -> str:
        d = self.diff
        sign = ">" if self.direction > 0 else "<"
        return (
            f"| {self.claim} | A {sign} B | {d.estimate:+.4f} [{d.low:+.4f}, {d.high:+.4f}] "
            f"| {d.n_seeds} | {d.n_items} | **{self.verdict}** |"
        )


def judge(claim: str, diff: Paired, direction: int = 1) -> Verdict:
    return Verdict(claim, diff, direction, verdict(diff, direction))


def compare(
    claim: str,
    a: Sequence[Mapping[int, float] | Mapping[int, Sequence[float]]],
    b: Sequence[Mapping[int, float] | Mapping[int, Sequence[float]]],
    *,
    direction: int = 1,
    aggregation: str = "mean",
) -> Verdict:
    """``a`` and ``b``: one ``{item id: value}`` per seed (same seeds, in order) of one
    task; items are the ids both sides have in every seed."""
    x, y = _aligned(a, b)
    return judge(claim, paired(x, y, aggregation, n_boot=N_BOOT), direction)


def compare_average(
    claim: str,
    a: Mapping[str, Sequence[Mapping[int, float]]],
    b: Mapping[str, Sequence[Mapping[int, float]]],
    *,
    direction: int = 1,
    aggregation: str = "mean",
) -> Verdict:
    """The macro average over the tasks of ``a`` (``{task: per-seed {item: value}}``)."""
    pairs = [_aligned(a[t], b[t]) for t in a]
    diff = macro_paired([p[0] for p in pairs], [p[1] for p in pairs], aggregation, n_boot=N_BOOT)
    return judge(claim, diff, direction)


def _aligned(a: Sequence[Mapping], b: Sequence[Mapping]) -> tuple[np.ndarray, np.ndarray]:
    if len(a) != len(b) or not a:
        raise ValueError(f"paired seeds: {len(a)} on one side, {len(b)} on the other")
    common = sorted(set.intersection(*(set(m) for m in [*a, *b])))
    if not common:
        raise ValueError("no item is shared by every seed of both sides")
    return (
        np.asarray([[m[i] for i in common] for m in a], dtype=float),
        np.asarray([[m[i] for i in common] for m in b], dtype=float),
    )


def primary_items(record: Mapping[str, Any], task: str) -> dict[int, float]:
    """``{doc_id: value}`` of ``task``'s primary metric in a cell record (read from the
    ``samples.jsonl`` beside its ``result.json``; ``record["_dir"]`` is the cell dir)."""
    metrics = record["metrics"][task]
    (key,) = [k for k, m in metrics.items() if m["primary"]]
    rec = {**record, "_path": str(Path(record["_dir"]) / "result.json")}
    docs, values = load_samples([rec])[record["cell_id"]][(task, key)]
    return dict(zip(docs.tolist(), values.tolist(), strict=True))


def markdown(verdicts: Sequence[Verdict]) -> str:
    """The claims table: A − B with its interval, seeds, items and the verdict."""
    lines = [
        "| claim | test | A − B [95% CI] | seeds | items | verdict |",
        "|:--|:--|--:|--:|--:|:--|",
    ]
    return "\n".join(lines + [v.row() for v in verdicts])
