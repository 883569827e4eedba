"""Run directories → tidy DataFrame → tables with intervals, exports, plots and W&B.

``load_records`` reads ``result.json`` files (schema 2), ``load_samples`` their per-item
``samples.jsonl``, ``tidy`` makes one row per cell × task × metric, and ``pivot``,
``normalised``, ``own_task`` and ``compare`` make label × task :class:`Table` s: every score
with its percentile-bootstrap interval (:class:`Intervals`, built on :mod:`results.stats`),
the sd across replicates and their number. ``export`` writes tables as Markdown / CSV /
LaTeX, ``plot_scores`` and ``plot_compare`` draw them, ``check_environments`` warns about
cells run with different packages, ``collect`` does all of it and ``log_wandb`` logs the
tables to W&B.

Labels: a merge is labelled by its method name plus the parameters that vary across the
collected records of that method (``ties(density=0.2)``); the reference rows of method
``pretrained`` are ``base`` and ``expert:<name>``. When the records span several pools the
tables are indexed by (pool, label) instead of label.

Replicates: cells with the same pool name and label — so differing only in ``seed`` and
``pool.seed`` — are one row: its value is the mean over them, ``sd`` their standard
deviation, ``n_replicates`` their number and the interval a two-level bootstrap (seeds,
then items, :mod:`results.stats`). Items pair across cells by (task, doc_id, filter); where
cells that are combined or compared have different items, the common items are used and a
warning names the cells.

Direction and primary metric come from each record's ``metrics`` (``higher_is_better``,
``primary``); averages leave out lower-is-better tasks when others are present. Columns are
the top-level tasks: an lm-eval group is one column (its interval combines its subtasks'
as lm-eval does: weighted by size or not) and its subtasks are left out of the tables.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.records import split_metric_key
from results import stats

__all__ = [
    "BASE_COLUMNS",
    "Intervals",
    "RecordError",
    "STATS",
    "Table",
    "beside_reference",
    "check_environments",
    "collect",
    "compare",
    "export",
    "latex",
    "load_records",
    "load_reference",
    "load_samples",
    "log_wandb",
    "markdown",
    "normalised",
    "own_task",
    "pivot",
    "plot_compare",
    "plot_scores",
    "tidy",
]

PRETRAINED = "pretrained"
BASE_COLUMNS = [
    "cell_id",
    "sweep",
    "pool",
    "method",
    "label",
    "task",
    "metric",
    "value",
    "stderr",
    "primary",
    "higher_is_better",  # True / False / None (unknown), from the record's metrics
    "aggregation",  # lm-eval's aggregation name (a group's: from the record's groups)
    "group",  # the outermost scored lm-eval group covering this task (or None), see tidy
    "subtasks",  # groups only: the leaf tasks the group's score averages (a tuple)
    "weight_by_size",  # groups only: whether the group score weights subtasks by size
    "seed",
    "pool_seed",
    "specialist",  # the expert whose pool.experts[e].tasks lists this task (or None)
]
STATS = ("value", "ci_low", "ci_high", "sd", "n_replicates", "n_items")
FLOAT_FORMAT = "#.4g"  # 4 significant digits, trailing zeros kept (0.6100)
MISSING_MD = "n/a"
MISSING_TEX = "--"

CellItems = dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]


class RecordError(ValueError):
    """A result record that cannot be read or lacks a required field."""


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


# -- loading -------------------------------------------------------------------------
def _as_paths(paths: Iterable[str | Path] | str | Path) -> list[Path]:
    if isinstance(paths, (str, Path)):
        return [Path(paths)]
    return [Path(p) for p in paths]


def load_records(paths: Iterable[str | Path] | str | Path) -> list[dict[str, Any]]:
    """Read complete ``result.json`` records.

    Each path is a ``result.json`` (any file name) or a directory searched recursively
    for ``result.json``. Records whose ``status`` is not ``"complete"`` are skipped with
    a warning; a file that is not valid JSON raises :class:`RecordError` naming it; the
    same cell found twice is kept once (with a warning). Each returned record carries
    its source file under ``"_path"``.
    """
    files: list[Path] = []
    for p in _as_paths(paths):
        if p.is_dir():
            files.extend(sorted(p.rglob("result.json")))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such result file or run directory")

    records: list[dict[str, Any]] = []
    seen_files: set[Path] = set()
    seen_cells: dict[str, Path] = {}
    for f in files:
        resolved = f.resolve()
        if resolved in seen_files:
            continue
        seen_files.add(resolved)
        try:
            record = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RecordError(f"{f}: unreadable result record ({exc})") from exc
        if not isinstance(record, dict):
            raise RecordError(f"{f}: result record is not a JSON object")
        status = record.get("status")
        if status != "complete":
            warnings.warn(f"{f}: skipping record with status {status!r}", stacklevel=2)
            continue
        cid = str(record.get("cell_id") or f.parent.name)
        if cid in seen_cells:
            warnings.warn(
                f"{f}: cell {cid} already read from {seen_cells[cid]}; keeping the first",
                stacklevel=2,
            )
            continue
        seen_cells[cid] = f
        records.append({**record, "cell_id": cid, "_path": str(f)})
    return records


def _where(record: Mapping[str, Any]) -> str:
    return str(record.get("_path") or record.get("cell_id") or "record")


def _read_samples(path: Path, wanted: Mapping[tuple[str, str], Mapping[str, str]]) -> CellItems:
    """One pass over a samples.jsonl, keeping (task, doc_id, filter) and the wanted metric
    values: ``{(task, metric_key): (sorted doc ids, values)}``."""
    found: dict[tuple[str, str], tuple[list[Any], list[Any]]] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RecordError(f"{path}:{lineno}: not a JSON line ({exc})") from exc
            task = sample.get("task")
            names = wanted.get((task, sample.get("filter", "none")))
            if not names:
                continue
            for name, key in names.items():
                if name in sample:
                    docs, values = found.setdefault((task, key), ([], []))
                    docs.append(sample.get("doc_id"))
                    values.append(sample[name])
    items: CellItems = {}
    for (task, key), (docs, values) in found.items():
        try:
            doc_ids = np.asarray(docs, dtype=np.int64)
            vals = np.asarray(values, dtype=float)
        except (TypeError, ValueError) as exc:
            raise RecordError(
                f"{path}: task {task!r} metric {key!r}: doc_ids must be integers and values "
                f"numbers or [loglikelihood, weight] pairs ({exc})"
            ) from exc
        order = np.argsort(doc_ids, kind="stable")
        doc_ids, vals = doc_ids[order], vals[order]
        repeated = doc_ids[1:][doc_ids[1:] == doc_ids[:-1]]
        if repeated.size:
            raise RecordError(
                f"{path}: task {task!r} metric {key!r} lists doc_id {int(repeated[0])} twice"
            )
        items[(task, key)] = (doc_ids, vals)
    return items


def load_samples(records: Iterable[Mapping[str, Any]]) -> dict[str, CellItems]:
    """Per-item values from each record's ``samples.jsonl`` (beside its ``result.json``).

    Returns ``{cell_id: {(task, metric_key): (doc_ids, values)}}``, doc ids sorted; values
    are numbers, or ``(n, 2)`` [loglikelihood, weight] pairs for perplexity metrics. Each
    file is read once, keeping only the metrics the record scores. Cells without the file
    (``eval.log_samples=false``) are left out, with one warning naming them: their
    intervals stay empty.
    """
    out: dict[str, CellItems] = {}
    missing: list[str] = []
    for rec in records:
        cid = str(rec.get("cell_id"))
        path = Path(rec["_path"]).with_name("samples.jsonl") if rec.get("_path") else None
        if path is None or not path.is_file():
            missing.append(cid)
            continue
        wanted: dict[tuple[str, str], dict[str, str]] = {}
        for task, entries in (rec.get("metrics") or {}).items():
            for key in entries or {}:
                name, filter_name = split_metric_key(key)
                wanted.setdefault((task, filter_name), {})[name] = key
        out[cid] = _read_samples(path, wanted)
    if missing:
        _warn(
            f"no samples.jsonl for cell(s) {', '.join(missing)}: their intervals are left "
            "empty (re-run them with eval.log_samples=true force=true to get intervals)"
        )
    return out


# -- tidy ----------------------------------------------------------------------------
def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _fmt_param(value: Any) -> str:
    if value is None or isinstance(value, (bool, list, dict)):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def _cell_value(value: Any) -> Any:
    """Param values as table cells: scalars kept, lists/dicts as compact JSON."""
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"), default=str)
    return value


def _number(value: Any) -> float:
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _field(record: Mapping[str, Any], *keys: str) -> Any:
    cur: Any = record
    for k in keys:
        if not isinstance(cur, Mapping) or k not in cur:
            raise RecordError(f"{_where(record)}: result record lacks {'.'.join(keys)}")
        cur = cur[k]
    return cur


def _varying_params(records: list[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Per method: the param names whose values differ across its records (in order)."""
    seen: dict[str, dict[str, set[str]]] = {}
    order: dict[str, list[str]] = {}
    for rec in records:
        name = _field(rec, "method", "name")
        params = rec["method"].get("params") or {}
        values = seen.setdefault(name, {})
        keys = order.setdefault(name, [])
        for k in params:
            if k not in values:
                keys.append(k)
                values[k] = set()
    for rec in records:
        name = rec["method"]["name"]
        params = rec["method"].get("params") or {}
        for k in order[name]:
            seen[name][k].add(_canon(params[k]) if k in params else "<missing>")
    return {name: [k for k in order[name] if len(seen[name][k]) > 1] for name in order}


def _label(name: str, params: Mapping[str, Any], varying: list[str]) -> str:
    if name == PRETRAINED:
        model = params.get("model", "base")
        return "base" if model == "base" else f"expert:{model}"
    shown = [f"{k}={_fmt_param(params[k])}" for k in varying if k in params]
    return f"{name}({', '.join(shown)})" if shown else name


def _specialists(pool: Mapping[str, Any]) -> dict[str, str]:
    """task → the first expert whose ``tasks`` lists it."""
    out: dict[str, str] = {}
    for expert, spec in (pool.get("experts") or {}).items():
        for task in (spec or {}).get("tasks") or []:
            out.setdefault(task, expert)
    return out


def _metrics(record: Mapping[str, Any]) -> Mapping[str, Any]:
    metrics = record.get("metrics")
    if not isinstance(metrics, Mapping):
        raise RecordError(
            f"{_where(record)}: a schema-{record.get('schema', 1)} result record without "
            "'metrics' (direction, aggregation and primary flag per metric); re-run that "
            "cell with force=true to write a schema-2 record"
        )
    return metrics


def _covering_groups(leaves: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """Task or group → the scored group with the most leaves that lists it as a leaf, or
    whose leaves strictly contain its own (a nested group that was also requested)."""
    out: dict[str, str] = {}
    for group in sorted(leaves, key=lambda g: -len(leaves[g])):  # outermost first
        for task in leaves[group]:
            out.setdefault(task, group)
        for other, own in leaves.items():
            if set(own) < set(leaves[group]):
                out.setdefault(other, group)
    return out


def tidy(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per cell × task × metric, from each record's ``metrics``.

    Columns: :data:`BASE_COLUMNS` and one ``param.<name>`` column per method parameter.
    ``primary`` and ``higher_is_better`` are the record's. From the record's ``groups``
    (requested groups, with their leaf ``subtasks``): ``group`` names the outermost scored
    group covering the task (tables show only uncovered ones), ``subtasks`` and
    ``weight_by_size`` describe a group's row. Sub-groups lm-eval scores but the record's
    ``groups`` does not list are not recognised: they stay top-level columns without an
    interval. ``specialist`` names the expert
    specialised in the task (from ``pool.experts[e].tasks``), used by :func:`normalised`.
    A record without ``metrics`` (schema 1) raises :class:`RecordError`.
    """
    records = list(records)
    varying = _varying_params(records)
    rows: list[dict[str, Any]] = []
    param_cols: list[str] = []
    for rec in records:
        name = _field(rec, "method", "name")
        metrics = _metrics(rec)
        params = rec["method"].get("params") or {}
        pool = rec.get("pool") or {}
        groups = rec.get("groups") or {}
        leaves = {
            g: tuple((spec or {}).get("subtasks") or ())
            for g, spec in groups.items()
            if g in metrics
        }
        parent = _covering_groups(leaves)
        specialists = _specialists(pool)
        base = {
            "cell_id": rec.get("cell_id"),
            "sweep": rec.get("sweep"),
            "pool": pool.get("name"),
            "method": name,
            "label": _label(name, params, varying.get(name, [])),
        }
        pcols = {f"param.{k}": _cell_value(v) for k, v in params.items()}
        for col in pcols:
            if col not in param_cols:
                param_cols.append(col)
        for task, entries in metrics.items():
            group_spec = groups.get(task) or {}
            for key, entry in (entries or {}).items():
                if not isinstance(entry, Mapping):
                    raise RecordError(
                        f"{_where(rec)}: metrics.{task}.{key} is not an object with "
                        "value / stderr / higher_is_better / aggregation / primary"
                    )
                hib = entry.get("higher_is_better")
                rows.append(
                    {
                        **base,
                        "task": task,
                        "metric": key,
                        "value": _number(entry.get("value")),
                        "stderr": _number(entry.get("stderr")),
                        "primary": bool(entry.get("primary")),
                        "higher_is_better": None if hib is None else bool(hib),
                        "aggregation": entry.get("aggregation") or group_spec.get("aggregation"),
                        "group": parent.get(task),
                        "subtasks": leaves.get(task),
                        "weight_by_size": group_spec.get("weight_by_size") if group_spec else None,
                        "seed": rec.get("seed"),
                        "pool_seed": pool.get("seed"),
                        "specialist": specialists.get(task),
                        **pcols,
                    }
                )
    df = pd.DataFrame(rows, columns=BASE_COLUMNS + param_cols)
    df["primary"] = df["primary"].astype(bool)
    df["value"] = df["value"].astype(float)
    df["stderr"] = df["stderr"].astype(float)
    df["higher_is_better"] = df["higher_is_better"].astype(object)  # True / False / None
    return df


# -- environments ----------------------------------------------------------------------
def _cells_text(cells: list[str], shown: int = 6) -> str:
    more = f" +{len(cells) - shown} more" if len(cells) > shown else ""
    return ", ".join(cells[:shown]) + more


def check_environments(records: Iterable[Mapping[str, Any]]) -> None:
    """Warn once when the records ran with different package versions (``versions``
    without ``mergelab_commit``; ``environment.packages_sha256``, with the packages that
    differ) or different ``environment.torch_threads``, naming the cells and values."""
    records = list(records)
    fields: dict[str, dict[str, Any]] = {}
    for rec in records:
        env = rec.get("environment") or {}
        values = {
            f"versions.{k}": v
            for k, v in (rec.get("versions") or {}).items()
            if k != "mergelab_commit"
        }
        values["environment.packages_sha256"] = env.get("packages_sha256")
        values["environment.torch_threads"] = env.get("torch_threads")
        for pkg, version in (env.get("packages") or {}).items():
            values[f"environment.packages.{pkg}"] = version
        fields[str(rec.get("cell_id"))] = values
    keys = list(dict.fromkeys(k for v in fields.values() for k in v))
    parts: list[str] = []
    for key in keys:
        by_value: dict[str, list[str]] = {}
        for cid, values in fields.items():
            by_value.setdefault(json.dumps(values.get(key), default=str), []).append(cid)
        if len(by_value) > 1:
            shown = " | ".join(f"{v} ({_cells_text(c)})" for v, c in by_value.items())
            parts.append(f"{key} = {shown}")
    if parts:
        _warn(
            "collect: the cells ran in different environments, so their scores may differ "
            "for that reason alone: " + "; ".join(parts)
        )


# -- intervals -----------------------------------------------------------------------
def _digest(docs: np.ndarray) -> bytes:
    return hashlib.blake2b(docs.tobytes(), digest_size=16).digest()


class Intervals:
    """Bootstrap replicates for the tables, shared by all tables of one collect.

    ``samples`` is :func:`load_samples`' output; ``n_boot`` resamples, percentile
    intervals at ``level``, seeded by ``seed``. Item resamples are drawn per task (stream
    = crc32 of the task name, :mod:`results.stats`), the same for every cell on the same
    items, so any two cells' replicates are paired; each distinct item set is resampled
    once for all cells that have it (one matrix product). Warnings (different item sets,
    unsupported aggregations) are given once each.
    """

    def __init__(
        self,
        samples: Mapping[str, CellItems],
        *,
        n_boot: int = 10_000,
        level: float = 0.95,
        seed: int = 0,
    ) -> None:
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must lie strictly between 0 and 1, got {level!r}")
        if n_boot < 1 or seed < 0:
            raise ValueError(f"n_boot must be >= 1 and seed >= 0; got {n_boot}, {seed}")
        self.samples = samples
        self.n_boot = n_boot
        self.level = level
        self.seed = seed
        self._cache: dict[tuple[str, str, bytes], dict[str, tuple[np.ndarray, float]]] = {}
        self._warned: set[str] = set()

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            _warn(message)

    def items(self, cell: str, task: str, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
        return self.samples.get(cell, {}).get((task, metric))

    def values_on(self, cell: str, task: str, metric: str, docs: np.ndarray) -> np.ndarray:
        """The cell's per-item values on ``docs`` (a subset of its doc ids), in that order."""
        own_docs, values = self.samples[cell][(task, metric)]
        return values[np.searchsorted(own_docs, docs)]

    def common_docs(self, cells: Sequence[str], task: str, metric: str) -> np.ndarray | None:
        """The doc ids every cell has for (task, metric); ``None`` if one has no samples.
        Different item sets warn once, naming the cells."""
        found = [self.items(c, task, metric) for c in cells]
        docs = [f[0] for f in found if f is not None]
        if not cells or len(docs) < len(cells):
            return None
        common = reduce(np.intersect1d, docs) if len(docs) > 1 else docs[0]
        if any(len(d) != len(common) for d in docs):
            pairs = sorted(zip(cells, docs, strict=True), key=lambda pair: pair[0])
            counts = ", ".join(f"{c} ({len(d)})" for c, d in pairs)
            self._warn_once(
                f"{task} ({metric}): cells {counts} have different items; paired on the "
                f"{len(common)} they share"
            )
        return common if len(common) else None

    def _batch(self, task: str, metric: str, aggregation: str, docs: np.ndarray) -> None:
        """Replicates on ``docs`` for every cell whose items include them."""
        cells, rows = [], []
        for cell, items in self.samples.items():
            found = items.get((task, metric))
            if found is not None and np.isin(docs, found[0], assume_unique=True).all():
                cells.append(cell)
                rows.append(found[1][np.searchsorted(found[0], docs)])
        values = np.stack(rows)
        draws = stats.resample_items(
            values,
            aggregation,
            n_boot=self.n_boot,
            seed=self.seed,
            stream=zlib.crc32(task.encode()),
        )
        self._cache[(task, metric, _digest(docs))] = {
            c: (d, stats.aggregate(v, aggregation))
            for c, d, v in zip(cells, draws, values, strict=True)
        }

    def replicates(
        self,
        cells: Sequence[str],
        task: str,
        metric: str,
        aggregation: str | None,
        partner: Sequence[str] = (),
    ) -> stats.Replicates | None:
        """Two-level replicates of the mean over ``cells`` (replicates of one row, in seed
        order) on the items they share — with ``partner`` cells too, for a comparison.
        ``None`` without samples or for an aggregation :mod:`results.stats` lacks."""
        if aggregation not in stats.AGGREGATIONS:
            self._warn_once(
                f"{task} ({metric}): no interval for aggregation {aggregation!r} "
                f"(supported: {', '.join(stats.AGGREGATIONS)})"
            )
            return None
        docs = self.common_docs([*cells, *partner], task, metric)
        if docs is None:
            return None
        key = (task, metric, _digest(docs))
        if key not in self._cache:
            self._batch(task, metric, aggregation, docs)
        found = [self._cache[key][c] for c in cells]
        return stats.resample_seeds(
            np.stack([d for d, _ in found]), [e for _, e in found], len(docs), seed=self.seed
        )


# -- the tables' data ------------------------------------------------------------------
def _select(df: pd.DataFrame, metric: str | None) -> pd.DataFrame:
    if metric is None:
        return df[df["primary"]]
    sub = df[df["metric"] == metric]
    if sub.empty:
        raise ValueError(f"no metric {metric!r} in the table; metrics: {sorted(set(df['metric']))}")
    return sub


def _keys(df: pd.DataFrame) -> list[str]:
    return ["pool", "label"] if df["pool"].nunique(dropna=False) > 1 else ["label"]


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _sortable(value: Any) -> tuple[int, Any]:
    if _is_missing(value):
        return (2, "")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value))
    return (1, str(value))


def _row_order(df: pd.DataFrame, keys: list[str]) -> list[Any]:
    """Rows: base, then experts (in task order of their specialisation), then merges
    (by method name, then by parameter values, numbers compared as numbers)."""
    param_cols = [c for c in df.columns if c.startswith("param.")]
    experts = [e for e in dict.fromkeys(df["specialist"]) if not _is_missing(e)]
    firsts = df.drop_duplicates(keys)

    def key(row: Mapping[str, Any]) -> tuple:
        label = row["label"]
        pool = (str(row["pool"]),) if len(keys) > 1 else ()
        if row["method"] == PRETRAINED and label == "base":
            return (*pool, 0, 0, "", ())
        if row["method"] == PRETRAINED:
            name = label.removeprefix("expert:")
            rank = experts.index(name) if name in experts else len(experts)
            return (*pool, 1, rank, name, ())
        return (*pool, 2, 0, row["method"], tuple(_sortable(row[c]) for c in param_cols))

    ordered = sorted(firsts.to_dict("records"), key=key)
    return [tuple(r[k] for k in keys) if len(keys) > 1 else r[keys[0]] for r in ordered]


@dataclass(frozen=True)
class _Row:
    """One table row: a (pool, label) and its replicate cells in (seed, pool seed) order."""

    key: Any
    pool: Any
    label: str
    cells: tuple[str, ...]
    task_param: Any


@dataclass(frozen=True)
class _Est:
    """One table cell: ``per_replicate`` values (positional, NaN where missing; ``None``
    when its parts' replicates do not line up), their count, and bootstrap replicates."""

    value: float
    per_replicate: np.ndarray | None
    n_replicates: int
    reps: stats.Replicates | None
    mcnemar_p: float | None = None

    @classmethod
    def of(cls, per_replicate: np.ndarray, reps: stats.Replicates | None) -> _Est:
        ok = per_replicate[~np.isnan(per_replicate)]
        value = float(ok.mean()) if ok.size else math.nan
        return cls(value, per_replicate, int(ok.size), reps)

    @property
    def sd(self) -> float:
        if self.per_replicate is None:
            return math.nan
        ok = self.per_replicate[~np.isnan(self.per_replicate)]
        return float(np.std(ok, ddof=1)) if ok.size > 1 else math.nan


_NAN_EST = _Est(math.nan, None, 0, None)


def _average(parts: Sequence[_Est | None]) -> _Est:
    """The mean of several table cells (NaN if one is missing), replicates averaged
    position by position and bootstrap replicates draw by draw."""
    full = [p for p in parts if p is not None and not math.isnan(p.value)]
    if not full or len(full) < len(parts):
        return _NAN_EST
    value = float(np.mean([p.value for p in full]))
    arrays = [p.per_replicate for p in full if p.per_replicate is not None]
    per_rep = None
    if len(arrays) == len(full) and len({len(a) for a in arrays}) == 1:
        per_rep = np.mean(np.stack(arrays), axis=0)
        n = int((~np.isnan(per_rep)).sum())
    else:
        n = min(p.n_replicates for p in full)
    reps = [p.reps for p in full if p.reps is not None]
    return _Est(value, per_rep, n, stats.mean_of(reps) if len(reps) == len(full) else None)


class _View:
    """The tidy frame indexed for the tables: the metric shown per task, per-cell values,
    each metric's aggregation and direction, lm-eval groups, and the rows."""

    def __init__(self, df: pd.DataFrame, metric: str | None, intervals: Intervals | None):
        self.intervals = intervals
        sel = _select(df, metric)
        self.keys = _keys(df)
        first = sel.drop_duplicates("task")
        self.metric_of: dict[str, str] = dict(zip(first["task"], first["metric"], strict=True))
        cols = ["cell_id", "task", "metric", "value", "aggregation", "higher_is_better"]
        self.value: dict[tuple[str, str, str], float] = {}
        self.aggregation: dict[tuple[str, str], str] = {}
        self.hib: dict[tuple[str, str], bool] = {}
        for cell, task, key, value, agg, hib in df[cols].itertuples(index=False):
            self.value[(cell, task, key)] = value
            if not _is_missing(agg):
                self.aggregation.setdefault((task, key), agg)
            if not _is_missing(hib):
                self.hib.setdefault((task, key), bool(hib))
        self.parent: dict[str, str] = {}
        self.children: dict[str, tuple[str, ...]] = {}
        self.weight_by_size: dict[str, bool] = {}
        groups = df[["task", "group", "subtasks", "weight_by_size"]]
        for task, group, subtasks, by_size in groups.itertuples(index=False):
            if not _is_missing(group):
                self.parent.setdefault(task, group)
            if isinstance(subtasks, tuple) and subtasks:
                self.children.setdefault(task, subtasks)
            if not _is_missing(by_size):
                self.weight_by_size.setdefault(task, bool(by_size))
        self.specialist = {
            (c, t): s for c, t, s in df[["cell_id", "task", "specialist"]].itertuples(index=False)
        }
        self.tasks = [t for t in self.metric_of if not self._shown_ancestor(t)]
        self.rows = self._rows(df, sel)
        self.by_label = {(r.pool, r.label): r for r in self.rows}

    def _shown_ancestor(self, task: str) -> bool:
        seen = {task}
        while (task := self.parent.get(task)) is not None and task not in seen:
            if task in self.metric_of:
                return True
            seen.add(task)
        return False

    def _rows(self, df: pd.DataFrame, sel: pd.DataFrame) -> list[_Row]:
        present = set(zip(sel["pool"], sel["label"], strict=True))
        cells: dict[tuple[Any, str], list[tuple]] = {}
        task_param: dict[tuple[Any, str], Any] = {}
        has_task = "param.task" in df.columns
        for r in df.drop_duplicates("cell_id").to_dict("records"):
            k = (r["pool"], r["label"])
            order = (_sortable(r["seed"]), _sortable(r["pool_seed"]), str(r["cell_id"]))
            cells.setdefault(k, []).append((order, r["cell_id"]))
            task_param.setdefault(k, r["param.task"] if has_task else None)
        rows = []
        for key in _row_order(df, self.keys):
            pool, label = key if len(self.keys) > 1 else (df["pool"].iloc[0], key)
            if (pool, label) in present:
                ids = tuple(c for _, c in sorted(cells[(pool, label)]))
                rows.append(_Row(key, pool, label, ids, task_param[(pool, label)]))
        return rows

    def averaged(self, tasks: Sequence[str]) -> list[str]:
        """The tasks an average covers: lower-is-better ones are left out when others are
        present (all of them when every task is lower-is-better)."""
        kept = [t for t in tasks if self.hib.get((t, self.metric_of[t])) is not False]
        return kept or list(tasks)

    def reps(
        self, cells: Sequence[str], task: str, metric: str, partner: Sequence[str] = ()
    ) -> stats.Replicates | None:
        if self.intervals is None:
            return None
        kids = self.children.get(task)
        if kids:
            found = [self.reps(cells, k, metric, partner) for k in kids]
            parts = [p for p in found if p is not None]
            if len(parts) < len(found):
                return None
            weights = [p.n_items for p in parts] if self.weight_by_size.get(task) else None
            return stats.mean_of(parts, weights)
        return self.intervals.replicates(
            cells, task, metric, self.aggregation.get((task, metric)), partner
        )

    def _values(self, row: _Row, task: str) -> tuple[np.ndarray, list[str]]:
        metric = self.metric_of[task]
        vals = np.array([self.value.get((c, task, metric), math.nan) for c in row.cells])
        return vals, [c for c, v in zip(row.cells, vals, strict=True) if not math.isnan(v)]

    def score(self, row: _Row, task: str) -> _Est | None:
        """The row's mean recorded score on ``task`` and its interval; ``None`` if unscored."""
        vals, cells = self._values(row, task)
        if not cells:
            return None
        return _Est.of(vals, self.reps(cells, task, self.metric_of[task]))

    def paired(self, row: _Row, other: _Row, task: str, op: str) -> _Est | None:
        """``row`` − ``other`` (op ``"difference"``) or ÷ (``"ratio"``) on ``task``: value
        from the recorded scores (the paired bootstrap estimate for a difference), the
        interval from replicates of both on their common items, and for differences of
        0/1 metrics the exact McNemar p (the largest over replicate pairs)."""
        a_vals, a_cells = self._values(row, task)
        b_vals, b_cells = self._values(other, task)
        if not a_cells or not b_cells:
            return None
        metric = self.metric_of[task]
        ra = self.reps(a_cells, task, metric, partner=b_cells)
        rb = self.reps(b_cells, task, metric, partner=a_cells)
        a_ok, b_ok = a_vals[~np.isnan(a_vals)], b_vals[~np.isnan(b_vals)]
        if op == "ratio":
            ref = float(b_ok.mean())
            if ref == 0:
                return _NAN_EST
            both = stats.ratio(ra, rb) if ra is not None and rb is not None else None
            return _Est.of(a_vals / ref, both)
        per_rep = None
        if len(a_ok) == len(b_ok) or len(b_ok) == 1 or len(a_ok) == 1:
            per_rep = a_ok - b_ok
        diff = stats.difference(ra, rb) if ra is not None and rb is not None else None
        value = diff.estimate if diff is not None else float(a_ok.mean() - b_ok.mean())
        n = len(per_rep) if per_rep is not None else len(a_ok)
        p = self._mcnemar(a_cells, b_cells, task, metric) if diff is not None else None
        return _Est(value, per_rep, n, diff, p)

    def _mcnemar(self, a: list[str], b: list[str], task: str, metric: str) -> float | None:
        """Replicate pairs by position (or each against a single one); ``None`` unless
        every value is 0 or 1 (and for groups and unpairable replicate counts)."""
        if self.children.get(task) or self.aggregation.get((task, metric)) != "mean":
            return None
        if len(a) != len(b) and 1 not in (len(a), len(b)):
            return None
        assert self.intervals is not None
        docs = self.intervals.common_docs([*a, *b], task, metric)
        if docs is None:
            return None
        n = max(len(a), len(b))
        xs = [self.intervals.values_on(c, task, metric, docs) for c in a]
        ys = [self.intervals.values_on(c, task, metric, docs) for c in b]
        if not all(np.isin(v, (0.0, 1.0)).all() for v in xs + ys):
            return None
        pairs = [(xs[i % len(xs)], ys[i % len(ys)]) for i in range(n)]
        return max(stats.mcnemar(x, y) for x, y in pairs)


# -- tables --------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Table:
    """A label × column table of estimates with their uncertainty.

    Every field is a DataFrame on the same index (``label``, or ``pool, label``) and
    columns (tasks, then ``average`` / ``mean``): ``value``; ``ci_low`` / ``ci_high``, the
    percentile-bootstrap interval at ``level`` (NaN without samples); ``sd`` across
    replicates (NaN for one); ``n_replicates``; ``n_items`` behind the interval. A
    comparison (``baseline`` set) also has ``significant`` (the interval excludes 0) and
    ``mcnemar_p``.
    """

    value: pd.DataFrame
    ci_low: pd.DataFrame
    ci_high: pd.DataFrame
    sd: pd.DataFrame
    n_replicates: pd.DataFrame
    n_items: pd.DataFrame
    level: float = 0.95
    baseline: str | None = None
    significant: pd.DataFrame | None = None
    mcnemar_p: pd.DataFrame | None = None

    @property
    def empty(self) -> bool:
        return self.value.empty

    def _fields(self) -> list[str]:
        extra = ["significant", "mcnemar_p"] if self.baseline is not None else []
        return [*STATS, *extra]

    def long(self) -> pd.DataFrame:
        """One row per (row, column): the index columns, ``task``, :data:`STATS` (and
        ``baseline``, ``significant``, ``mcnemar_p`` for a comparison) — the CSV."""
        names = [str(n) for n in self.value.index.names]
        fields = self._fields()
        arrays = {f: getattr(self, f).to_numpy() for f in fields}
        rows = []
        for i, key in enumerate(self.value.index):
            head = dict(zip(names, key if isinstance(key, tuple) else (key,), strict=True))
            if self.baseline is not None:
                head["baseline"] = self.baseline
            for j, col in enumerate(self.value.columns):
                rows.append({**head, "task": col, **{f: arrays[f][i, j] for f in fields}})
        extra = ["baseline"] if self.baseline is not None else []
        out = pd.DataFrame(rows, columns=[*names, *extra, "task", *fields])
        for f in ("n_replicates", "n_items"):
            out[f] = out[f].astype("Int64")
        return out

    def text(self, fmt: str = FLOAT_FORMAT, *, style: str = "md") -> pd.DataFrame:
        """Cells as ``value [ci_low, ci_high]``, then `` ± sd (n=…)`` with replicates; a
        comparison signs its numbers and adds `` *`` when significant and ``p=…``."""
        missing, pm = (MISSING_TEX, r"$\pm$") if style == "tex" else (MISSING_MD, "±")
        num = f"+{fmt}" if self.baseline is not None else fmt
        a = {f: getattr(self, f).to_numpy() for f in self._fields()}
        out = np.empty(self.value.shape, dtype=object)
        for i in range(out.shape[0]):
            for j in range(out.shape[1]):
                v = a["value"][i, j]
                if _is_missing(v):
                    out[i, j] = missing
                    continue
                s = format(v, num)
                if not _is_missing(a["ci_low"][i, j]):
                    s += f" [{format(a['ci_low'][i, j], num)}, {format(a['ci_high'][i, j], num)}]"
                if self.baseline is not None and a["significant"][i, j] is True:
                    s += " *"
                n, sd = a["n_replicates"][i, j], a["sd"][i, j]
                if not _is_missing(n) and n >= 2 and not _is_missing(sd):
                    s += f" {pm} {format(sd, fmt)} (n={int(n)})"
                if self.baseline is not None and not _is_missing(a["mcnemar_p"][i, j]):
                    s += f" p={a['mcnemar_p'][i, j]:.2g}"
                out[i, j] = s
        return pd.DataFrame(out, index=self.value.index, columns=self.value.columns)


def _index(keys: Sequence[Any], names: list[str]) -> pd.Index:
    if len(names) > 1:
        return pd.MultiIndex.from_tuples(list(keys), names=names)
    return pd.Index(list(keys), name=names[0], dtype=object)


def _assemble(
    cells: Mapping[tuple[Any, str], _Est],
    keys: Sequence[Any],
    columns: Sequence[str],
    names: list[str],
    level: float,
    baseline: str | None = None,
) -> Table:
    shape = (len(keys), len(columns))
    arrays = {f: np.full(shape, np.nan) for f in STATS}
    significant = np.full(shape, None, dtype=object)
    p = np.full(shape, np.nan)
    for i, key in enumerate(keys):
        for j, col in enumerate(columns):
            est = cells.get((key, col))
            if est is None or math.isnan(est.value):
                continue
            arrays["value"][i, j] = est.value
            arrays["sd"][i, j] = est.sd
            arrays["n_replicates"][i, j] = est.n_replicates
            if est.reps is not None:
                iv = est.reps.interval(level)
                arrays["ci_low"][i, j], arrays["ci_high"][i, j] = iv.low, iv.high
                arrays["n_items"][i, j] = iv.n_items
                significant[i, j] = bool(iv.low > 0 or iv.high < 0)
            if est.mcnemar_p is not None:
                p[i, j] = est.mcnemar_p
    index = _index(keys, names)
    frames = {f: pd.DataFrame(a, index=index, columns=list(columns)) for f, a in arrays.items()}
    extra: dict[str, Any] = {}
    if baseline is not None:
        extra = {
            "significant": pd.DataFrame(significant, index=index, columns=list(columns)),
            "mcnemar_p": pd.DataFrame(p, index=index, columns=list(columns)),
        }
    return Table(**frames, level=level, baseline=baseline, **extra)


def _empty(names: list[str], column: str, level: float) -> Table:
    return _assemble({}, [], [column], names, level)


def _level(intervals: Intervals | None) -> float:
    return intervals.level if intervals is not None else 0.95


def pivot(df: pd.DataFrame, metric: str | None = None, intervals: Intervals | None = None) -> Table:
    """Label × task table of mean scores (over replicates) plus ``average``.

    Uses each task's primary metric unless ``metric`` is given (tasks without it are left
    out). Rows: ``base``, the experts, then the merges. ``average`` is the mean over the
    tasks, leaving out lower-is-better ones (``higher_is_better: false``) when others are
    present; its interval resamples each task's items independently. Without
    ``intervals`` (no samples) the intervals are empty.
    """
    view = _View(df, metric, intervals)
    cells: dict[tuple[Any, str], _Est] = {}
    averaged = view.averaged(view.tasks)
    for row in view.rows:
        for task in view.tasks:
            est = view.score(row, task)
            if est is not None:
                cells[(row.key, task)] = est
        cells[(row.key, "average")] = _average([cells.get((row.key, t)) for t in averaged])
    keys = [r.key for r in view.rows]
    return _assemble(cells, keys, [*view.tasks, "average"], view.keys, _level(intervals))


def normalised(
    df: pd.DataFrame, metric: str | None = None, intervals: Intervals | None = None
) -> Table:
    """Each score divided by the score of the expert specialised in that task.

    The reference is that expert's ``pretrained`` row on the same pool and metric (so an
    expert scores 1 on its own tasks); the ratio's interval is bootstrapped on the items
    both have. Where the reference is missing the cell is NaN and a warning names the
    cells to run.
    """
    view = _View(df, metric, intervals)
    missing: dict[Any, dict[str, set[str]]] = {}
    unowned: dict[Any, set[str]] = {}
    cells: dict[tuple[Any, str], _Est] = {}
    averaged = view.averaged(view.tasks)
    for row in view.rows:
        for task in view.tasks:
            _, scored = view._values(row, task)
            if not scored:
                continue
            spec = view.specialist.get((scored[0], task))
            if _is_missing(spec):
                unowned.setdefault(row.pool, set()).add(task)
                continue
            ref = view.by_label.get((row.pool, f"expert:{spec}"))
            est = view.paired(row, ref, task, "ratio") if ref is not None else None
            if est is None:
                missing.setdefault(row.pool, {}).setdefault(spec, set()).add(task)
                continue
            cells[(row.key, task)] = est
        cells[(row.key, "average")] = _average([cells.get((row.key, t)) for t in averaged])
    for pool, experts in missing.items():
        runs = "; ".join(
            f"`method=pretrained method.model={e}` (for {', '.join(sorted(t))})"
            for e, t in experts.items()
        )
        _warn(
            f"normalised: no pretrained reference score for expert(s) {sorted(experts)} on "
            f"pool {pool!r}; their tasks are NaN. Run the missing cells: {runs}"
        )
    for pool, tasks in unowned.items():
        _warn(
            f"normalised: no expert of pool {pool!r} lists task(s) {sorted(tasks)} in "
            "pool.experts[*].tasks; their normalised scores are NaN"
        )
    keys = [r.key for r in view.rows]
    return _assemble(cells, keys, [*view.tasks, "average"], view.keys, _level(intervals))


def _drop_param(label: str, key: str) -> str:
    """``bora(tau=10, task=math)`` → ``bora(tau=10)`` for ``key="task"``."""
    name, sep, inner = label.partition("(")
    if not sep:
        return label
    kept = [p for p in inner.removesuffix(")").split(", ") if not p.startswith(f"{key}=")]
    return f"{name}({', '.join(kept)})" if kept else name


def _is_own(eval_task: str, task: Any) -> bool:
    """Whether ``eval_task`` has ``task`` as an ``_``-delimited part of its name
    (``mergelab_knowledge_ppl`` for ``knowledge``, ``ton_speaker_01_ppl`` for ``speaker_01``)."""
    return f"_{task}_" in f"_{eval_task}_"


def own_task(
    df: pd.DataFrame, metric: str | None = None, intervals: Intervals | None = None
) -> Table:
    """Each cell on its own task, for methods whose cell emits one task's model (a
    ``task`` method parameter: BoRA's per-task adapters, scored on every task).

    Rows: the label without ``task=…`` (e.g. ``bora(tau=10)``); columns: the emitted
    tasks, in the order of their eval tasks; value: the mean score of that cell's row on
    the eval tasks named after its task (see :func:`_is_own`; ``safety`` → both safety
    tasks), then ``mean`` over the columns. With ``metric=None`` the primary metrics are
    used, leaving out lower-is-better ones when others are present (they would be averaged
    with accuracies); ask for them by name. Empty when no cell has a ``task`` parameter.
    """
    level = _level(intervals)
    names = _keys(df)
    if "param.task" not in df.columns:
        return _empty(names, "mean", level)
    view = _View(df, metric, intervals)
    evals = view.averaged(view.tasks) if metric is None else view.tasks
    out: dict[tuple[Any, str], _Est] = {}
    keys: list[Any] = []
    first_eval: dict[str, int] = {}
    for row in view.rows:
        if _is_missing(row.task_param):
            continue
        own = [i for i, e in enumerate(evals) if _is_own(e, row.task_param)]
        parts = [view.score(row, evals[i]) for i in own]
        if not own or all(p is None for p in parts):
            continue
        label = _drop_param(row.label, "task")
        key = (row.pool, label) if len(names) > 1 else label
        column = str(row.task_param)
        keys.append(key)
        first_eval[column] = min(first_eval.get(column, own[0]), own[0])
        out.setdefault((key, column), _average([p for p in parts if p is not None]))
    if not out:
        return _empty(names, "mean", level)
    columns = sorted(first_eval, key=first_eval.__getitem__)
    keys = list(dict.fromkeys(keys))
    for key in keys:
        out[(key, "mean")] = _average([out.get((key, c)) for c in columns])
    return _assemble(out, keys, [*columns, "mean"], names, level)


def compare(
    df: pd.DataFrame,
    baseline: str,
    metric: str | None = None,
    intervals: Intervals | None = None,
) -> Table:
    """Δ = label − ``baseline`` for every other label on the baseline's pool(s), per task
    and for the average (as in :func:`pivot`), on the items both have.

    The interval is a paired bootstrap (the same item and seed resamples for both sides);
    ``significant`` marks intervals that exclude 0; ``mcnemar_p`` is the exact McNemar
    p-value for 0/1 metrics (replicates paired by seed order; the largest p). An unknown
    ``baseline`` raises ``ValueError`` listing the labels; pools without it warn.
    """
    view = _View(df, metric, intervals)
    labels = list(dict.fromkeys(r.label for r in view.rows))
    if baseline not in labels:
        raise ValueError(f"--baseline {baseline!r}: no such label; labels: {labels}")
    averaged = view.averaged(view.tasks)
    cells: dict[tuple[Any, str], _Est] = {}
    keys: list[Any] = []
    skipped: list[Any] = []
    for row in view.rows:
        base = view.by_label.get((row.pool, baseline))
        if base is None:
            skipped.append(row.pool)
            continue
        if row is base:
            continue
        keys.append(row.key)
        for task in view.tasks:
            est = view.paired(row, base, task, "difference")
            if est is not None:
                cells[(row.key, task)] = est
        cells[(row.key, "average")] = _average([cells.get((row.key, t)) for t in averaged])
    if skipped:
        _warn(
            f"compare: no {baseline!r} row on pool(s) {sorted(set(map(str, skipped)))}; "
            "their labels are not compared"
        )
    columns = [*view.tasks, "average"]
    return _assemble(cells, keys, columns, view.keys, _level(intervals), baseline=baseline)


# -- export --------------------------------------------------------------------------
def _flat(df: pd.DataFrame) -> pd.DataFrame:
    """Index turned into leading columns (for writing)."""
    if isinstance(df.index, pd.MultiIndex) or df.index.name is not None:
        return df.reset_index()
    return df


def _fmt_cell(value: Any, missing: str) -> str:
    if _is_missing(value):
        return missing
    if isinstance(value, float):
        return format(value, FLOAT_FORMAT)
    return str(value)


def _is_numeric(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def markdown(table: Table | pd.DataFrame, fmt: str = FLOAT_FORMAT) -> str:
    """A GitHub (pipe) Markdown table. A :class:`Table` shows ``value [ci_low, ci_high]``
    (and ``± sd (n=…)``) per cell, numbers in ``fmt``; a DataFrame's floats get 4
    significant digits."""
    from tabulate import tabulate

    if isinstance(table, Table):
        n_index = table.value.index.nlevels
        flat = _flat(table.text(fmt))
        align = ["left"] * n_index + ["right"] * (len(flat.columns) - n_index)
        rows = [[MISSING_MD if _is_missing(v) else str(v) for v in r] for r in flat.to_numpy()]
    else:
        flat = _flat(table)
        rows = [[_fmt_cell(v, MISSING_MD) for v in row] for row in flat.itertuples(index=False)]
        align = ["right" if _is_numeric(flat[c]) else "left" for c in flat.columns]
    return tabulate(
        rows,
        headers=[str(c) for c in flat.columns],
        tablefmt="pipe",
        disable_numparse=True,
        colalign=align,
    )


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
}
_TEX_RE = re.compile("|".join(re.escape(c) for c in _TEX_ESCAPES))


def _tex_escape(text: str) -> str:
    return _TEX_RE.sub(lambda m: _TEX_ESCAPES[m.group()], text)


def latex(table: Table | pd.DataFrame) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``), numbers with 4
    significant digits (a :class:`Table` as in :func:`markdown`, ``$\\pm$`` for ±).
    Written directly: ``DataFrame.to_latex`` needs jinja2."""
    if isinstance(table, Table):
        n_index = table.value.index.nlevels
        flat = _flat(table.text(style="tex"))
        spec = "l" * n_index + "r" * (len(flat.columns) - n_index)
        body = [
            [_tex_escape(str(v)) for v in r[:n_index]] + [str(v) for v in r[n_index:]]
            for r in flat.to_numpy()
        ]
    else:
        flat = _flat(table)
        spec = "".join("r" if _is_numeric(flat[c]) else "l" for c in flat.columns)
        body = [
            [_tex_escape(_fmt_cell(v, MISSING_TEX)) for v in row]
            for row in flat.itertuples(index=False)
        ]
    lines = [
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(_tex_escape(str(c)) for c in flat.columns) + r" \\",
        "\\midrule",
    ]
    lines += [" & ".join(cells) + r" \\" for cells in body]
    lines += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(lines)


def export(
    tables: Mapping[str, Table | pd.DataFrame],
    out_dir: str | Path,
    formats: Iterable[str] = ("md", "csv", "tex"),
) -> list[Path]:
    """Write each table as ``<out_dir>/<name>.<fmt>``; return the written paths.

    ``md``: pipe Markdown (tabulate); ``tex``: booktabs tabular — a :class:`Table` with
    its intervals in each cell; ``csv``: full precision, a :class:`Table` in long form
    (:meth:`Table.long`: ``value, ci_low, ci_high, sd, n_replicates, n_items`` columns).
    """
    formats = list(formats)
    unknown = [f for f in formats if f not in ("md", "csv", "tex")]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; choose from md, csv, tex")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, table in tables.items():
        for fmt in formats:
            path = out / f"{name}.{fmt}"
            if fmt == "csv":
                frame = table.long() if isinstance(table, Table) else _flat(table)
                frame.to_csv(path, index=False)
            elif fmt == "md":
                path.write_text(markdown(table) + "\n", encoding="utf-8")
            else:
                path.write_text(latex(table), encoding="utf-8")
            written.append(path)
    return written


# -- plots ---------------------------------------------------------------------------
def _row_names(index: pd.Index) -> list[str]:
    return [" / ".join(map(str, i)) if isinstance(i, tuple) else str(i) for i in index]


def _figure(width: float, height: float) -> tuple[Any, Any]:
    """A figure on an Agg canvas (no pyplot, no global backend change) and its axes; at
    most 30 inches a side, however many rows are drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(min(width, 30.0), min(height, 30.0)), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _legend_width(labels: list[str]) -> float:
    """Inches the legend beside the axes takes: about 0.07 in per character of the
    longest label at ``fontsize="small"``, plus the marker."""
    return 0.07 * max((len(label) for label in labels), default=0) + 0.6


def _errors(table: Table, i: int) -> np.ndarray:
    """Row ``i``'s (below, above) error-bar lengths: NaN (no bar) without an interval, 0
    where the value lies outside it (rounding, or an interval on fewer paired items)."""
    value = table.value.iloc[i].to_numpy(dtype=float)
    low = table.ci_low.iloc[i].to_numpy(dtype=float)
    high = table.ci_high.iloc[i].to_numpy(dtype=float)
    return np.clip(np.vstack([value - low, high - value]), 0.0, None)


def plot_scores(table: Table, path: str | Path, *, ylabel: str = "score") -> Path:
    """Grouped bar chart PNG: columns (``average`` included) on x, one bar per row, with
    the intervals as error bars."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [str(c) for c in table.value.columns]
    labels = _row_names(table.value.index)
    n = max(len(labels), 1)
    width = 0.8 / n
    fig, ax = _figure(max(6.0, 0.35 * n * len(columns) + 2.0) + _legend_width(labels), 4.5)
    for i, label in enumerate(labels):
        heights = np.nan_to_num(table.value.iloc[i].to_numpy(dtype=float))
        xs = [x + (i - (n - 1) / 2) * width for x in range(len(columns))]
        ax.bar(xs, heights, width=width, label=label, yerr=_errors(table, i), capsize=2)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_ylabel(f"{ylabel} ({table.level:.0%} interval)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    if labels:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=150)
    return path


def plot_compare(table: Table, path: str | Path) -> Path:
    """Forest plot PNG of a :func:`compare` table: one line per column (tasks, then the
    average), Δ with its interval as a marker per label, a dashed line at 0; hollow
    markers are not significant."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [str(c) for c in table.value.columns]
    labels = _row_names(table.value.index)
    n = max(len(labels), 1)
    step = 0.8 / n
    fig, ax = _figure(7.0 + _legend_width(labels), max(3.0, 0.25 * n * len(columns) + 1.5))
    for i, label in enumerate(labels):
        xs = table.value.iloc[i].to_numpy(dtype=float)
        ys = np.arange(len(columns)) + (i - (n - 1) / 2) * step
        ax.errorbar(xs, ys, xerr=_errors(table, i), fmt="o", capsize=3, label=label)
        significant = table.significant.iloc[i].to_numpy() if table.significant is not None else []
        hollow = [j for j, s in enumerate(significant) if s is not True]
        ax.plot(xs[hollow], ys[hollow], "o", color="white", markersize=3.5)
    ax.axvline(0.0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(columns)), columns)
    ax.invert_yaxis()
    ax.set_xlabel(f"Δ vs {table.baseline} ({table.level:.0%} paired interval)")
    ax.grid(axis="x", alpha=0.3)
    if labels:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.savefig(path, dpi=150)
    return path


# -- all of it -----------------------------------------------------------------------
def collect(
    paths: Iterable[str | Path] | str | Path,
    out_dir: str | Path,
    metric: str | None = None,
    formats: Iterable[str] = ("md", "csv", "tex"),
    only: str | None = None,
    *,
    n_boot: int = 10_000,
    level: float = 0.95,
    seed: int = 0,
    baseline: str | None = None,
) -> dict[str, Any]:
    """Load records, build the tables and write them to ``out_dir``.

    Writes ``tidy.csv``, ``pivot.*`` and ``normalised.*`` (see :func:`export`) and
    ``scores.png``; returns ``{"tidy", "pivot", "normalised"}``, plus ``own_task`` (and
    ``own_task.*``, ``own_task.png``) when cells emit per-task models (:func:`own_task`)
    and ``compare`` (``compare.*``, ``compare.png``) with a ``baseline`` label.
    ``only`` (a regex) keeps the merge rows whose label it matches; base and expert
    reference rows are always kept. Intervals: ``n_boot`` resamples of the items in each
    cell's samples.jsonl (0: no intervals, samples not read), at ``level``, seeded by
    ``seed``. Warns when the combined cells ran in different environments.
    """
    paths = _as_paths(paths)
    records = load_records(paths)
    if not records:
        raise ValueError(f"no complete result.json under {[str(p) for p in paths]}")
    df = tidy(records)
    if only is not None:
        reference = df["method"] == PRETRAINED
        df = df[reference | df["label"].str.fullmatch(only)].reset_index(drop=True)
    kept = set(df["cell_id"])
    records = [r for r in records if r["cell_id"] in kept]
    check_environments(records)
    intervals = None
    if n_boot:
        intervals = Intervals(load_samples(records), n_boot=n_boot, level=level, seed=seed)
    tables: dict[str, Table] = {
        "pivot": pivot(df, metric, intervals),
        "normalised": normalised(df, metric, intervals),
    }
    own = own_task(df, metric, intervals)
    if not own.empty:
        tables["own_task"] = own
    if baseline is not None:
        tables["compare"] = compare(df, baseline, metric, intervals)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "tidy.csv", index=False)
    export(tables, out, formats)
    plot_scores(tables["pivot"], out / "scores.png")
    if "own_task" in tables:
        plot_scores(own, out / "own_task.png", ylabel=metric or "primary metric")
    if "compare" in tables:
        plot_compare(tables["compare"], out / "compare.png")
    return {"tidy": df, **tables}


def log_wandb(
    tables: Mapping[str, Any],
    out_dir: str | Path,
    *,
    mode: str = "offline",
    project: str = "mergelab",
) -> Path | None:
    """Log every :class:`Table` in ``tables`` (long form, as in the CSVs) as a
    ``wandb.Table`` in one run with ``job_type="collect"`` under ``<out_dir>/wandb``.
    Never raises: failures warn (:mod:`harness.tracking`). Returns the run directory
    (``None`` when disabled or failed)."""
    from harness import tracking

    logged = {name: t for name, t in tables.items() if isinstance(t, Table)}
    out = Path(out_dir)
    with tracking.start(
        {"tables": list(logged), "out": str(out)},
        project=project,
        mode=mode,
        dir=out,
        name=f"collect-{out.name}",
        settings={"run_job_type": "collect"},
    ) as tracker:
        if not tracker.active:
            return None
        try:
            import wandb

            frames = {name: t.long() for name, t in logged.items()}
            payload = {
                name: wandb.Table(dataframe=f.astype(object).where(f.notna(), None))
                for name, f in frames.items()
            }
        except Exception as exc:
            warnings.warn(
                f"W&B tables could not be built ({type(exc).__name__}: {exc}); not logged",
                RuntimeWarning,
                stacklevel=2,
            )
            return tracker.run_dir
        tracker.log_metrics(payload)
    return tracker.run_dir


REFERENCE_COLUMNS = ["paper", "arxiv", "setup", "method", "task", "metric", "value", "source"]


def load_reference(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Published numbers (results/reference/*.csv), checked for the expected columns."""
    frames = []
    for p in _as_paths(paths):
        ref = pd.read_csv(p)
        missing = [c for c in REFERENCE_COLUMNS if c not in ref.columns]
        if missing:
            raise RecordError(f"{p}: reference CSV lacks columns {missing}")
        frames.append(ref[REFERENCE_COLUMNS])
    return pd.concat(frames, ignore_index=True)


def beside_reference(pivot_table: Table, reference: pd.DataFrame) -> pd.DataFrame:
    """Our average (with its interval) per label next to the paper's number for the same
    method name.

    A label matches a reference row when the label's method name (the part before any
    "(") equals the reference's ``method`` up to its first space, e.g. ``ties(density=0.2)``
    ↔ ``ties``; unmatched labels and paper rows both stay, with the other side empty.
    """
    labels = [k[-1] if isinstance(k, tuple) else k for k in pivot_table.value.index]
    ours = pd.DataFrame(
        {
            "method": [str(lab).split("(")[0] for lab in labels],
            "ours (label)": [str(lab) for lab in labels],
            "ours (average)": pivot_table.value["average"].to_numpy(),
            "ours (ci_low)": pivot_table.ci_low["average"].to_numpy(),
            "ours (ci_high)": pivot_table.ci_high["average"].to_numpy(),
        }
    )
    ref = reference.assign(method=reference["method"].astype(str).str.split(" ").str[0])
    ref = ref.rename(
        columns={"value": "paper value", "setup": "paper setup", "metric": "paper metric"}
    )
    cols = ["method", "paper", "paper setup", "paper metric", "paper value"]
    merged = ours.merge(ref[cols], on="method", how="outer")
    return merged.set_index("method")
