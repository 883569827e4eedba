"""Weights & Biases logging that is never fatal.

One W&B run per cell: name = cell id, group = sweep, config = the resolved config,
summary = flattened scores (``"<task>/<metric>"``) and timings (``"time/<stage>"``).

Mode ``"offline"`` (default) needs no account and no network: the run is written under
``<dir>/wandb/offline-run-*/`` and can be uploaded later with ``wandb sync``.
``"online"`` logs to the server the user is logged in to; ``"disabled"`` turns W&B off
(wandb is not even imported and nothing is written).

A cell's run has a fixed id (``run_id``: the cell id) and is started with
``resume="allow"``: online, a rerun of a killed cell continues its run. Offline, wandb
ignores resumption and would write a second ``offline-run-*-<id>`` directory, so
:func:`start` first deletes the earlier attempts' directories of that id: the new attempt
replaces them and ``wandb sync`` never uploads an orphan. :func:`closed` tells whether the
newest run of an id finished cleanly (its log holds an exit record with code 0, which
wandb writes after everything logged before it): a run killed before that is not closed,
so the caller can log its summary again in a replacing run. :func:`available` says
whether W&B could start in this process, for such optional repairs.

Every wandb call is wrapped: an exception becomes a :func:`warnings.warn` naming the
failure, and W&B is disabled for the rest of that run. A logging failure never loses a
result and never raises.

In offline mode wandb 0.31 writes neither ``files/config.yaml`` nor
``files/wandb-summary.json`` (only the uploader writes those); everything logged lives in
the binary transaction log ``run-<id>.wandb``. :func:`read_offline_run` decodes that log
(LevelDB-style 32 KiB blocks of CRC-checked fragments holding wandb's own ``Record``
protobufs) to give back the config, summary and history.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "MODES",
    "Tracker",
    "available",
    "closed",
    "finish",
    "flatten",
    "log_metrics",
    "log_summary",
    "read_offline_run",
    "read_transaction_log",
    "start",
    "summary_from_result",
]

MODES = ("offline", "online", "disabled")

# Settings that keep wandb quiet and self-contained: no console capture (lm-eval and our
# own prints stay untouched), no banner, no code or git snapshot, no job creation.
_QUIET_SETTINGS: dict[str, Any] = {
    "silent": True,
    "console": "off",
    "save_code": False,
    "disable_git": True,
    "disable_job_creation": True,
}

_active: Tracker | None = None
_unavailable: str | None = None  # why W&B failed to start in this process (kept)


class Tracker:
    """One W&B run, or a no-op when W&B is disabled or has failed.

    Use as a context manager (``with start(...) as t:``) or call :meth:`finish`.
    ``active`` tells whether logging still goes to W&B; ``run_dir`` is the run's
    directory (``.../wandb/offline-run-*``) once started, for :func:`read_offline_run`.
    """

    flush_timeout = 10.0  # seconds finish() waits for the run's log to be complete on disk

    def __init__(self, run: Any = None, mode: str = "disabled") -> None:
        self.run = run
        self.mode = mode if run is not None else "disabled"
        self.run_dir: Path | None = None
        self.run_id: str | None = None
        self.finished = False
        if run is not None:
            self._capture_run_info()

    @property
    def active(self) -> bool:
        return self.run is not None and not self.finished

    # -- logging ---------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log a history row (nested mappings flattened to ``a/b`` keys)."""
        if self.active:
            self._call("run.log", lambda: self.run.log(flatten(metrics), step=step))

    def log_summary(self, summary: Mapping[str, Any]) -> None:
        """Set summary values (nested mappings flattened to ``a/b`` keys)."""
        if self.active:
            self._call("run.summary.update", lambda: self.run.summary.update(flatten(summary)))

    def log_result(self, record: Mapping[str, Any]) -> None:
        """Log a cell's ``result.json`` record as the run summary (see
        :func:`summary_from_result`)."""
        if self.active:
            try:
                summary = summary_from_result(record)
            except Exception as exc:  # a malformed record must not raise either
                _warn("building the summary from the result record", exc, disabled=False)
                return
            self.log_summary(summary)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (flushes the offline files). Safe to call more than once."""
        global _active
        if _active is self:
            _active = None
        if self.run is None or self.finished:
            self.finished = True
            return
        self.finished = True
        run, self.run = self.run, None
        try:
            run.finish(exit_code=exit_code)
        except Exception as exc:
            _warn("run.finish", exc)
            return
        self._await_log()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.finish(exit_code=0 if exc_type is None else 1)

    # -- internals -------------------------------------------------------------------
    def _call(self, what: str, fn: Any) -> None:
        try:
            fn()
        except Exception as exc:
            _warn(what, exc)
            self._disable()

    def _disable(self) -> None:
        """Stop using W&B for this run; try to close it without letting anything out."""
        global _active
        run, self.run = self.run, None
        self.finished = True
        if _active is self:
            _active = None
        if run is not None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    run.finish(exit_code=1)
            except Exception:
                return
            self._await_log()

    def _await_log(self) -> None:
        """Wait (at most ``flush_timeout`` s) until the run's exit record is on disk.

        ``run.finish()`` returns once wandb-core has handled the exit, but the stream's
        writer flushes and closes ``run-<id>.wandb`` asynchronously afterwards, so the
        last records can be missing from the file for a moment. Waiting here makes
        "finished" mean "complete on disk" for :func:`read_offline_run` and
        ``wandb sync``.
        """
        if self.run_dir is None:
            return
        deadline = time.monotonic() + self.flush_timeout
        while True:
            try:
                logs = sorted(self.run_dir.glob("run-*.wandb"))
                if not logs:
                    return  # no transaction log for this run: nothing to wait for
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    records = read_transaction_log(logs[-1])
                    if any(r.WhichOneof("record_type") == "exit" for r in records):
                        return
            except Exception:
                return
            if time.monotonic() >= deadline:
                return
            time.sleep(0.02)

    def _capture_run_info(self) -> None:
        try:
            self.run_id = str(self.run.id)
            files_dir = Path(self.run.dir)  # <wandb dir>/<offline-run-*>/files
            self.run_dir = files_dir.parent
        except Exception:
            pass

    def __repr__(self) -> str:
        state = "active" if self.active else "inactive"
        return f"Tracker(mode={self.mode!r}, {state}, run_dir={self.run_dir})"


def start(
    cfg: Mapping[str, Any] | Any = None,
    *,
    project: str = "mergelab",
    entity: str | None = None,
    group: str | None = None,
    name: str | None = None,
    mode: str = "offline",
    dir: str | Path | None = None,  # noqa: A002 -- mirrors wandb.init(dir=...)
    tags: Iterable[str] | None = None,
    settings: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> Tracker:
    """Start one W&B run and return its :class:`Tracker` (a no-op one on failure).

    ``cfg`` (dict or OmegaConf config) becomes the run config; ``name`` should be the
    cell id and ``group`` the sweep. ``dir`` is where ``wandb/`` is created (default:
    the current directory). ``settings`` are extra ``wandb.Settings`` fields, applied
    over the quiet defaults. ``run_id`` fixes the run's id and replaces earlier offline
    attempts of it (see the module docstring). Never raises: a failure warns and returns
    a disabled tracker.
    """
    global _active, _unavailable
    mode = (mode or "offline").lower()
    if mode == "disabled":
        return Tracker()
    if mode not in MODES:
        _warn(f"mode {mode!r} (expected one of {MODES})", None)
        return Tracker()
    try:
        import wandb

        config = _to_container(cfg)
        if run_id is not None:
            for earlier in (Path(dir or ".") / "wandb").glob(f"offline-run-*-{run_id}"):
                shutil.rmtree(earlier)
        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
        run_settings = wandb.Settings(mode=mode, **{**_QUIET_SETTINGS, **dict(settings or {})})
        run = wandb.init(
            project=project,
            entity=entity,
            group=group,
            name=name,
            config=config,
            tags=[str(t) for t in tags] if tags else None,
            dir=str(dir) if dir is not None else None,
            settings=run_settings,
            reinit="create_new",
            id=run_id,
            resume="allow" if run_id is not None else None,
        )
    except Exception as exc:
        _unavailable = f"{type(exc).__name__}: {exc}"
        _warn("wandb.init", exc)
        return Tracker()
    if run is None:
        _unavailable = "wandb.init returned no run"
        _warn("wandb.init", RuntimeError("returned no run"))
        return Tracker()
    tracker = Tracker(run, mode)
    _active = tracker
    return tracker


def closed(dir: str | Path, run_id: str) -> bool:  # noqa: A002 -- the ``dir`` given to start()
    """Whether the newest run of id ``run_id`` under ``dir`` (``dir/wandb/*run-<time>-<id>``)
    finished with exit code 0. Only that run counts: a closed run of another id, or an
    earlier (online) attempt of this one, does not hide a killed newer attempt."""
    runs = sorted(
        Path(dir).glob(f"wandb/*run-*-{run_id}"),
        key=lambda d: (d.name.partition("run-")[2], d.stat().st_mtime),
    )
    if not runs:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn log is simply not closed
        try:
            log = read_transaction_log(runs[-1] / f"run-{run_id}.wandb")
            return any(r.exit.exit_code == 0 for r in log if r.HasField("exit"))
        except (OSError, ValueError, ImportError):
            return False


def available() -> bool:
    """Whether W&B can start in this process: False once importing wandb or
    ``wandb.init`` has failed here (each warned about once), so optional W&B work (closing
    a finished cell's killed run) is skipped without a warning per cell."""
    global _unavailable
    if _unavailable is None:
        try:
            import wandb  # noqa: F401
        except Exception as exc:
            _unavailable = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"W&B cannot be imported ({_unavailable}): killed W&B runs of finished cells "
                "are not closed",
                RuntimeWarning,
                stacklevel=2,
            )
    return _unavailable is None


# -- module-level conveniences acting on the most recently started tracker ------------
def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """:meth:`Tracker.log_metrics` on the most recently started, unfinished tracker."""
    if _active is not None:
        _active.log_metrics(metrics, step=step)


def log_summary(summary: Mapping[str, Any]) -> None:
    """:meth:`Tracker.log_summary` on the most recently started, unfinished tracker."""
    if _active is not None:
        _active.log_summary(summary)


def finish(exit_code: int = 0) -> None:
    """:meth:`Tracker.finish` on the most recently started, unfinished tracker."""
    if _active is not None:
        _active.finish(exit_code=exit_code)


# -- helpers --------------------------------------------------------------------------
def flatten(d: Mapping[str, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a/b": 1}``; non-mapping values are kept as they are."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        full = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, sep, full))
        else:
            out[full] = value
    return out


def summary_from_result(record: Mapping[str, Any]) -> dict[str, Any]:
    """A result record as a W&B summary: ``"<task>/<metric>"`` scores and
    ``"time/<stage>"`` timings (plus ``weights_sha256`` when present)."""
    out: dict[str, Any] = {}
    for task, metrics in (record.get("scores") or {}).items():
        for metric, value in (metrics or {}).items():
            out[f"{task}/{metric}"] = value
    for stage, seconds in (record.get("timings") or {}).items():
        out[f"time/{stage}"] = seconds
    if record.get("weights_sha256"):
        out["weights_sha256"] = record["weights_sha256"]
    return out


def _to_container(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(cfg):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:
        pass
    return dict(cfg)


def _warn(what: str, exc: BaseException | None, *, disabled: bool = True) -> None:
    detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
    tail = "; W&B logging is disabled for this run" if disabled else ""
    warnings.warn(f"W&B {what} failed{detail}{tail}", RuntimeWarning, stacklevel=3)


# -- reading offline runs back ----------------------------------------------------------
_BLOCK = 32768
_HEADER = struct.Struct("<IHB")  # crc32, data length, fragment type
_FILE_HEADER = struct.Struct("<4sHB")  # b":W&B", magic 0xBEE1, version 0
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_transaction_log(path: str | Path) -> Iterator[Any]:
    """Yield the ``wandb_internal_pb2.Record`` messages of a ``.wandb`` file in order.

    The file is ``:W&B`` + magic ``0xBEE1`` + version, then LevelDB-log-style 32 KiB
    blocks of fragments ``<crc32 u32><length u16><type u8><data>`` (full / first /
    middle / last); a block's tail shorter than a fragment header is zero padding. The
    CRC is zlib's crc32 of the data seeded with the crc32 of the type byte. A truncated
    or corrupt tail (a run killed mid-write) ends the iteration with a warning.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if len(data) < _FILE_HEADER.size:
        raise ValueError(f"{path}: too short to be a W&B transaction log")
    ident, magic, version = _FILE_HEADER.unpack_from(data, 0)
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path}: not a W&B transaction log (header {data[:7]!r})")
    if version != 0:
        warnings.warn(f"{path}: unknown transaction log version {version}", stacklevel=2)

    type_crc = {t: zlib.crc32(bytes([t])) for t in (_FULL, _FIRST, _MIDDLE, _LAST)}
    pos = _FILE_HEADER.size
    pending: bytearray | None = None
    while pos < len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < _HEADER.size:  # padding at the end of a block
            pos += left_in_block
            continue
        if pos + _HEADER.size > len(data):
            _warn_tail(path, pos, "truncated fragment header")
            return
        crc, length, ftype = _HEADER.unpack_from(data, pos)
        if crc == 0 and length == 0 and ftype == 0:  # zero fill up to the block end
            pos += left_in_block
            continue
        body = data[pos + _HEADER.size : pos + _HEADER.size + length]
        if len(body) < length:
            _warn_tail(path, pos, "truncated fragment")
            return
        if ftype not in type_crc or zlib.crc32(body, type_crc[ftype]) != crc:
            _warn_tail(path, pos, f"bad checksum or fragment type {ftype}")
            return
        pos += _HEADER.size + length
        if ftype == _FULL:
            pending = None
            chunk: bytes | None = bytes(body)
        elif ftype == _FIRST:
            pending, chunk = bytearray(body), None
        elif pending is None:  # middle/last without a first: skip the orphan
            continue
        else:
            pending += body
            chunk = None
            if ftype == _LAST:
                chunk, pending = bytes(pending), None
        if chunk is not None:
            record = pb.Record()
            record.ParseFromString(chunk)
            yield record


def _warn_tail(path: str | Path, pos: int, why: str) -> None:
    warnings.warn(
        f"{path}: transaction log ends early at byte {pos} ({why}); reading what precedes it",
        stacklevel=3,
    )


def _set_item(target: dict[str, Any], item: Any, value: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    for k in keys[:-1]:
        nxt = target.get(k)
        if not isinstance(nxt, dict):
            nxt = target[k] = {}
        target = nxt
    target[keys[-1]] = value


def _remove_item(target: dict[str, Any], item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    for k in keys[:-1]:
        target = target.get(k)
        if not isinstance(target, dict):
            return
    target.pop(keys[-1], None)


def _json(text: str) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


def _history_value(item: Any) -> Any:
    kind = item.WhichOneof("value")
    if kind is None:
        return _json(item.value_json)
    if kind == "none":
        return None
    if kind == "json":
        return _json(item.json)
    return getattr(item, kind)


def _find_log(run_dir: str | Path) -> Path:
    """The ``.wandb`` file for ``run_dir``: the file itself, a run directory, a ``wandb``
    directory or a directory holding ``wandb/`` (newest run when there are several)."""
    p = Path(run_dir)
    if p.is_file():
        return p.resolve()
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such W&B run directory")
    own = sorted(p.glob("run-*.wandb"))
    if own:
        return own[-1]
    for wandb_dir in (p / "wandb", p):
        latest = wandb_dir / "latest-run"
        if latest.is_dir():
            found = sorted(latest.glob("run-*.wandb"))
            if found:
                return found[-1].resolve()
        runs = sorted(wandb_dir.glob("*run-*/run-*.wandb"), key=lambda f: f.parent.name)
        if runs:
            return runs[-1]
    raise FileNotFoundError(f"{p}: no W&B run (no offline-run-*/run-*.wandb under it)")


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    """Read back a W&B run written to disk (offline or online) without any network.

    ``run_dir`` is a ``.wandb`` file, an ``offline-run-*`` directory, a ``wandb/``
    directory or the directory that holds ``wandb/`` (the newest run is read). Returns
    ``{"run_id", "name", "project", "entity", "group", "tags", "config", "summary",
    "history", "exit_code", "path"}``; ``config`` is the logged config without wandb's
    internal ``_wandb`` key, ``summary`` the final summary (updates replayed in order,
    wandb's ``_runtime``/``_step``/``_timestamp`` keys included), ``history`` the list
    of logged rows and ``exit_code`` ``None`` if the run never finished.
    """
    log_path = _find_log(run_dir)
    out: dict[str, Any] = {
        "run_id": None,
        "name": None,
        "project": None,
        "entity": None,
        "group": None,
        "tags": [],
        "config": {},
        "summary": {},
        "history": [],
        "exit_code": None,
        "path": str(log_path),
    }
    config: dict[str, Any] = out["config"]
    summary: dict[str, Any] = out["summary"]

    def apply(cfg_rec: Any, target: dict[str, Any]) -> None:
        for item in cfg_rec.update:
            _set_item(target, item, _json(item.value_json))
        for item in cfg_rec.remove:
            _remove_item(target, item)

    for record in read_transaction_log(log_path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(
                run_id=run.run_id or out["run_id"],
                name=run.display_name or out["name"],
                project=run.project or out["project"],
                entity=run.entity or out["entity"],
                group=run.run_group or out["group"],
                tags=list(run.tags) or out["tags"],
            )
            apply(run.config, config)
            apply(run.summary, summary)
        elif kind == "config":
            apply(record.config, config)
        elif kind == "summary":
            apply(record.summary, summary)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _set_item(row, item, _history_value(item))
            out["history"].append(row)
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    config.pop("_wandb", None)
    summary.pop("_wandb", None)
    _merge_json_files(log_path.parent, out)
    return out


def _merge_json_files(run_dir: Path, out: dict[str, Any]) -> None:
    """Fill config/summary from ``files/config.yaml`` / ``files/wandb-summary.json``
    where the log gave nothing (wandb writes these only for synced/online runs)."""
    files = run_dir / "files"
    if not out["summary"] and (files / "wandb-summary.json").is_file():
        try:
            out["summary"] = json.loads((files / "wandb-summary.json").read_text())
        except (OSError, ValueError):
            pass
    if not out["config"] and (files / "config.yaml").is_file():
        try:
            import yaml

            raw = yaml.safe_load((files / "config.yaml").read_text()) or {}
            out["config"] = {
                k: v.get("value") if isinstance(v, dict) and "value" in v else v
                for k, v in raw.items()
                if k != "_wandb"
            }
        except Exception:
            pass
