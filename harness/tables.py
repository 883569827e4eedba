"""Run directories → tidy DataFrame → pivot tables, exports and a plot.

``load_records`` reads ``result.json`` files, ``tidy`` makes one row per
cell × task × metric, ``pivot`` and ``normalised`` make the label × task tables,
``export`` writes them as Markdown / CSV / LaTeX, ``plot_scores`` draws a grouped bar
chart and ``collect`` does all of it.

Labels: a merge is labelled by its method name plus the parameters that vary across the
collected records of that method (``ties(density=0.2)``); the reference rows of method
``pretrained`` are ``base`` and ``expert:<name>``. When the records span several pools
the tables are indexed by (pool, label) instead of label.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

__all__ = [
    "BASE_COLUMNS",
    "RecordError",
    "collect",
    "export",
    "latex",
    "load_records",
    "markdown",
    "normalised",
    "pivot",
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
    "seed",
    "specialist",  # the expert whose pool.experts[e].tasks lists this task (or None)
]
FLOAT_FORMAT = "#.4g"  # 4 significant digits, trailing zeros kept (0.6100)
MISSING_MD = "n/a"
MISSING_TEX = "--"


class RecordError(ValueError):
    """A result record that cannot be read or lacks a required field."""


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
        records.append({**record, "_path": str(f)})
    return records


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
            where = record.get("_path") or record.get("cell_id") or "record"
            raise RecordError(f"{where}: result record lacks {'.'.join(keys)}")
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


def tidy(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per cell × task × metric.

    Columns: ``cell_id, sweep, pool, method, label, task, metric, value, stderr,
    primary, seed, specialist`` and one ``param.<name>`` column per method parameter.
    ``primary`` marks the first metric of each task; ``specialist`` names the expert
    specialised in the task (from ``pool.experts[e].tasks``), used by
    :func:`normalised`.
    """
    records = list(records)
    varying = _varying_params(records)
    rows: list[dict[str, Any]] = []
    param_cols: list[str] = []
    for rec in records:
        name = _field(rec, "method", "name")
        params = rec["method"].get("params") or {}
        pool = rec.get("pool") or {}
        scores = _field(rec, "scores")
        stderr = rec.get("stderr") or {}
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
        for task, metrics in scores.items():
            for i, (metric, value) in enumerate((metrics or {}).items()):
                rows.append(
                    {
                        **base,
                        "task": task,
                        "metric": metric,
                        "value": _number(value),
                        "stderr": _number((stderr.get(task) or {}).get(metric)),
                        "primary": i == 0,
                        "seed": rec.get("seed"),
                        "specialist": specialists.get(task),
                        **pcols,
                    }
                )
    df = pd.DataFrame(rows, columns=BASE_COLUMNS + param_cols)
    df["primary"] = df["primary"].astype(bool)
    df["value"] = df["value"].astype(float)
    df["stderr"] = df["stderr"].astype(float)
    return df


# -- pivots --------------------------------------------------------------------------
# Lower-is-better likelihood metrics (lm-eval's loglikelihood_rolling): own_task leaves
# them out of its default (primary-metric) table rather than average them with accuracies.
PERPLEXITY_METRICS = frozenset(
    {"word_perplexity", "byte_perplexity", "bits_per_byte", "perplexity"}
)


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


def _table(sub: pd.DataFrame, order_from: pd.DataFrame, column: str = "value") -> pd.DataFrame:
    keys = _keys(order_from)
    tasks = list(dict.fromkeys(sub["task"]))
    if sub.empty:
        return pd.DataFrame(columns=["average"], dtype=float)
    tab = sub.groupby(keys + ["task"], sort=False, dropna=False)[column].mean().unstack("task")
    tab = tab.reindex(columns=tasks)
    # perplexities are not averaged with accuracies: the average covers the other tasks
    # (all of them when every task is a perplexity)
    ppl = set(sub.loc[sub["metric"].isin(PERPLEXITY_METRICS), "task"])
    averaged = [t for t in tasks if t not in ppl] or tasks
    tab["average"] = tab[averaged].mean(axis=1, skipna=False)
    order = [k for k in _row_order(order_from, keys) if k in tab.index]
    tab = tab.reindex(order)
    tab.columns.name = None
    return tab.astype(float)


def pivot(df: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Label × task table of mean scores (over seeds / duplicate cells) plus ``average``.

    Uses each task's primary metric unless ``metric`` is given (tasks without it are
    left out). Rows: ``base``, the experts, then the merges. ``average`` leaves out
    perplexity-type tasks (:data:`PERPLEXITY_METRICS`) when other tasks are present.
    """
    return _table(_select(df, metric), df)


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


def own_task(df: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Each cell on its own task, for methods whose cell emits one task's model (a
    ``task`` method parameter: BoRA's per-task adapters, scored on every task).

    Rows: the label without ``task=…`` (e.g. ``bora(tau=10)``); columns: the emitted
    tasks, in the order of their eval tasks; value: the cell's mean score on the eval
    tasks named after its task (see :func:`_is_own`; ``safety`` → both safety tasks), then
    ``mean`` over the columns. With ``metric=None`` the primary metrics are used, leaving
    out perplexity-type ones (:data:`PERPLEXITY_METRICS`), which would be averaged with
    accuracies; ask for them by name. Empty when no cell has a ``task`` parameter.
    """
    if "param.task" not in df.columns:
        return pd.DataFrame(columns=["mean"], dtype=float)
    sub = _select(df, metric)
    if metric is None:
        sub = sub[~sub["metric"].isin(PERPLEXITY_METRICS)]
    sub = sub[sub["param.task"].notna()]
    sub = sub[[_is_own(e, t) for e, t in zip(sub["task"], sub["param.task"], strict=True)]]
    if sub.empty:
        return pd.DataFrame(columns=["mean"], dtype=float)
    keys = _keys(df)
    rows = sub.assign(label=[_drop_param(lab, "task") for lab in sub["label"]])
    eval_order = list(dict.fromkeys(df["task"]))
    first_eval = rows.groupby("param.task", sort=False)["task"].first()
    tasks = sorted(first_eval.index, key=lambda t: eval_order.index(first_eval[t]))
    tab = rows.groupby(keys + ["param.task"], sort=False)["value"].mean().unstack("param.task")
    tab = tab.reindex(columns=tasks)
    tab["mean"] = tab[tasks].mean(axis=1, skipna=False)
    order = _row_order(df, keys)
    stripped = [
        (k[0], _drop_param(k[1], "task")) if isinstance(k, tuple) else _drop_param(k, "task")
        for k in order
    ]
    tab = tab.reindex([k for k in dict.fromkeys(stripped) if k in tab.index])
    tab.columns.name = None
    return tab.astype(float)


def normalised(df: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Each score divided by the score of the expert specialised in that task.

    The reference is that expert's ``pretrained`` row on the same pool and metric (so
    an expert scores 1 on its own tasks). Where it is missing the cell is NaN and a
    warning names the cells to run.
    """
    sub = _select(df, metric).copy()
    refs_df = sub[(sub["method"] == PRETRAINED) & sub["label"].str.startswith("expert:")]
    refs = refs_df.groupby(["pool", "label", "task", "metric"], dropna=False)["value"].mean()
    ref_map = refs.to_dict()
    missing: dict[Any, dict[str, set[str]]] = {}
    unowned: dict[Any, set[str]] = {}
    values: list[float] = []
    for row in sub.itertuples(index=False):
        spec = row.specialist
        if _is_missing(spec):
            unowned.setdefault(row.pool, set()).add(row.task)
            values.append(math.nan)
            continue
        ref = ref_map.get((row.pool, f"expert:{spec}", row.task, row.metric))
        if ref is None or _is_missing(ref):
            missing.setdefault(row.pool, {}).setdefault(spec, set()).add(row.task)
            values.append(math.nan)
        elif ref == 0:
            values.append(math.nan)
        else:
            values.append(row.value / ref)
    sub["normalised"] = values
    for pool, experts in missing.items():
        runs = "; ".join(
            f"`method=pretrained method.model={e}` (for {', '.join(sorted(t))})"
            for e, t in experts.items()
        )
        warnings.warn(
            f"normalised: no pretrained reference score for expert(s) {sorted(experts)} on "
            f"pool {pool!r}; their tasks are NaN. Run the missing cells: {runs}",
            stacklevel=2,
        )
    for pool, tasks in unowned.items():
        warnings.warn(
            f"normalised: no expert of pool {pool!r} lists task(s) {sorted(tasks)} in "
            "pool.experts[*].tasks; their normalised scores are NaN",
            stacklevel=2,
        )
    return _table(sub, df, "normalised")


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


def markdown(df: pd.DataFrame) -> str:
    """A GitHub (pipe) Markdown table, floats with 4 significant digits."""
    from tabulate import tabulate

    flat = _flat(df)
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


def latex(df: pd.DataFrame) -> str:
    """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``), floats with 4
    significant digits. Written directly: ``DataFrame.to_latex`` needs jinja2."""
    flat = _flat(df)
    spec = "".join("r" if _is_numeric(flat[c]) else "l" for c in flat.columns)
    lines = [
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(_tex_escape(str(c)) for c in flat.columns) + r" \\",
        "\\midrule",
    ]
    for row in flat.itertuples(index=False):
        cells = [_tex_escape(_fmt_cell(v, MISSING_TEX)) for v in row]
        lines.append(" & ".join(cells) + r" \\")
    lines += ["\\bottomrule", "\\end{tabular}", ""]
    return "\n".join(lines)


def export(
    tables: Mapping[str, pd.DataFrame],
    out_dir: str | Path,
    formats: Iterable[str] = ("md", "csv", "tex"),
) -> list[Path]:
    """Write each table as ``<out_dir>/<name>.<fmt>``; return the written paths.

    ``md``: pipe Markdown (tabulate); ``csv``: full precision; ``tex``: booktabs
    tabular. Floats in md/tex have 4 significant digits.
    """
    formats = list(formats)
    unknown = [f for f in formats if f not in ("md", "csv", "tex")]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}; choose from md, csv, tex")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, df in tables.items():
        for fmt in formats:
            path = out / f"{name}.{fmt}"
            if fmt == "csv":
                _flat(df).to_csv(path, index=False)
            elif fmt == "md":
                path.write_text(markdown(df) + "\n", encoding="utf-8")
            else:
                path.write_text(latex(df), encoding="utf-8")
            written.append(path)
    return written


# -- plot ----------------------------------------------------------------------------
def plot_scores(pivot_df: pd.DataFrame, path: str | Path, *, ylabel: str = "score") -> Path:
    """Grouped bar chart PNG: tasks (columns, ``average`` included) on x, one bar per
    row label. Drawn on an Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [str(c) for c in pivot_df.columns]
    labels = [" / ".join(map(str, i)) if isinstance(i, tuple) else str(i) for i in pivot_df.index]
    n = max(len(labels), 1)
    width = 0.8 / n
    fig = Figure(figsize=(max(6.0, 0.35 * n * len(columns) + 2.0), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, label in enumerate(labels):
        heights = [0.0 if _is_missing(v) else float(v) for v in pivot_df.iloc[i]]
        xs = [x + (i - (n - 1) / 2) * width for x in range(len(columns))]
        ax.bar(xs, heights, width=width, label=label)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
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
) -> dict[str, pd.DataFrame]:
    """Load records, build the tables and write them to ``out_dir``.

    Writes ``tidy.csv``, ``pivot.*`` and ``normalised.*`` (see :func:`export`) and
    ``scores.png``; returns ``{"tidy", "pivot", "normalised"}``, plus ``own_task`` (and
    ``own_task.*``, ``own_task.png``) when cells emit per-task models (:func:`own_task`).
    ``only`` (a regex) keeps the merge rows whose label it matches; base and expert
    reference rows are always kept.
    """
    paths = _as_paths(paths)
    records = load_records(paths)
    if not records:
        raise ValueError(f"no complete result.json under {[str(p) for p in paths]}")
    df = tidy(records)
    if only is not None:
        reference = df["method"] == "pretrained"
        df = df[reference | df["label"].str.fullmatch(only)].reset_index(drop=True)
    tables = {"pivot": pivot(df, metric), "normalised": normalised(df, metric)}
    own = own_task(df, metric)
    if not own.empty:
        tables["own_task"] = own
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "tidy.csv", index=False)
    export(tables, out, formats)
    plot_scores(tables["pivot"], out / "scores.png")
    if not own.empty:
        plot_scores(own, out / "own_task.png", ylabel=metric or "primary metric")
    return {"tidy": df, **tables}


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


def beside_reference(pivot_df: pd.DataFrame, reference: pd.DataFrame) -> pd.DataFrame:
    """Our average per label next to the paper's number for the same method name.

    A label matches a reference row when the label's method name (the part before any
    "(") equals the reference's ``method`` up to its first space, e.g. ``ties(density=0.2)``
    ↔ ``ties``; unmatched labels and paper rows both stay, with the other side empty.
    """
    ours = pivot_df.reset_index()
    label_col = ours.columns[0] if "label" not in ours.columns else "label"
    ours = pd.DataFrame(
        {
            "method": ours[label_col].astype(str).str.split("(").str[0],
            "ours (label)": ours[label_col].astype(str),
            "ours (average)": ours.get("average"),
        }
    )
    ref = reference.assign(method=reference["method"].astype(str).str.split(" ").str[0])
    ref = ref.rename(
        columns={"value": "paper value", "setup": "paper setup", "metric": "paper metric"}
    )
    cols = ["method", "paper", "paper setup", "paper metric", "paper value"]
    merged = ours.merge(ref[cols], on="method", how="outer")
    return merged.set_index("method")
