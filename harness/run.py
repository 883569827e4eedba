"""One cell: build pool → run method → evaluate → record. Nothing else orchestrates.

Order of work, cheapest checks first so a bad config fails in seconds:
resolve config → cell id → skip if finished (then, without waiting, drop a dead worker's
claim and close the cell's W&B run if a kill left it open) → claim the cell
(``records.CellClaim``: a live worker computing it is waited for, then skipped; a dead
one's claim is taken over) and delete what dead writers left in it → validate task names
→ instantiate the method (validates its options) → open the pool and check compatibility
→ start the cell's W&B run (id = cell id) → merge (in memory, or streamed to this
worker's partial checkpoint) → evaluate → write samples → swap the checkpoint in (or,
without one, remove an earlier ``merged/``) → write ``result.json`` atomically → log the
summary to W&B (never fatal).

With ``force``, the finished record is demoted (``status: "replacing"``) just before the
checkpoint is replaced, and the new record written after: a ``complete`` record always
has the checkpoint it describes, and a kill in between leaves a cell that is redone.

The claim is checked before each of those three writes. A worker whose claim was taken
over (it stalled past ``claim.timeout``) writes nothing more (no record, not even
``failed``; only its own partial checkpoint is removed), says so, and waits on the cell
like any other worker: decision: the worker that took over computes it, so this one
skips it once finished (exit 0), or takes it over in turn if that worker dies. A forced
run recomputes the cell after the taker's release (force means "compute it again").

Once the record is started (after the checks), any other failure writes ``result.json``
with ``status: "failed"`` and the error's type and message (no scores), then re-raises,
so the process exits non-zero; a failed cell is never ``complete`` and is redone next time.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from evals import sandbox
from evals.calibration import calibration_prompts
from evals.lm_eval import NonFiniteScoreError, evaluate, validate_tasks, write_samples_jsonl
from harness import records, tracking
from harness.data import load_texts
from harness.fit_cache import cached_fit, member_files
from harness.pool import ModelPool, parse_dtype
from harness.resolvers import resolve_include_path
from harness.stream import ShardedCheckpointWriter, execute, model_card, parse_size
from methods.base import FitContext, MergeMethod


@contextmanager
def _timed(timings: dict[str, float], stage: str):
    start = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - start, 4)


def run_cell(
    cfg: DictConfig, *, sweep: str | None = None, choices: dict[str, str] | None = None
) -> dict[str, Any] | None:
    """Run (or skip, or describe with ``dry_run``) one cell; return its record.
    ``choices`` (the config group options Hydra composed, e.g. ``{"method": "ties"}``) are
    kept in the record."""
    c: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    check_run_options(c)
    cid = records.cell_id(c)
    runs_dir = Path(c["runs_dir"])
    cell_dir = runs_dir / cid
    finished = records.load_finished(runs_dir, cid)
    if c.get("dry_run"):
        _describe(c, cid, finished is not None)
        return finished
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"runs_dir={str(runs_dir)!r} cannot be written ({err}): set runs_dir (or "
            "MERGELAB_RUNS) to a writable directory"
        ) from err
    if finished and not c.get("force"):
        print(f"[mergelab] skip {cid}: finished ({records.result_path(runs_dir, cid)})")
        return _skip_finished(c, cid, cell_dir) or finished

    def done() -> bool:  # forced: recompute whatever a concurrent run finished
        return not c.get("force") and records.load_finished(runs_dir, cid) is not None

    while True:  # again only after losing the claim: wait for the cell like any worker
        with records.claimed(runs_dir, cid, done, **c["claim"]) as claim:
            if claim is None:
                print(f"[mergelab] skip {cid}: finished by a concurrent run ({cell_dir})")
                return records.load_finished(runs_dir, cid)
            records.clean_cell(cell_dir)
            try:
                return _run_cell(cfg, c, cid, sweep, choices, claim)
            except records.ClaimLost as lost:
                print(f"[mergelab] lost {cid}: {lost}; waiting for the cell")


def check_run_options(c: dict[str, Any]) -> None:
    """The top-level options a cell needs, checked before anything runs (each error names
    the option and a valid value); sets the code sandbox's mode (``sandbox``)."""
    if isinstance(c["seed"], bool) or not isinstance(c["seed"], int):
        raise ValueError(f"seed={c['seed']!r} must be an integer: seed=0")
    threads = c.get("threads")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads={threads!r} must be a positive integer or null: threads=N")
    try:
        torch.device(c["device"])
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device={c['device']!r} is not a torch device: use cpu, cuda or cuda:N"
        ) from err
    parse_size(c["max_shard_size"])
    sandbox.set_mode(c["sandbox"])


def build_method(method_cfg: DictConfig) -> MergeMethod:
    """Instantiate the method config; an option the method does not take is named with the
    options it does take (Hydra's own error only shows a constructor's TypeError)."""
    target = method_cfg.get("_target_")
    try:
        return instantiate(method_cfg)
    except InstantiationException as err:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if unknown is None or not target:
            raise
        params = inspect.signature(get_class(target)).parameters.values()
        options = sorted(p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        raise ValueError(
            f"method.{unknown[1]} is not an option of {target}; its options are {options}: "
            f"drop it or fix its name"
        ) from err


def _skip_finished(c: dict[str, Any], cid: str, cell_dir: Path) -> dict[str, Any] | None:
    """A finished cell: drop the claim a dead worker left on it, and if its W&B run did
    not close (killed after ``result.json``), log the record's summary in a replacing run.
    The claim is tried once, without waiting: a live holder (a forced rerun) closes its
    own run. Nothing is claimed when nothing is to do, or when W&B cannot start in this
    process (warned once). Returns the record as read under the claim, if taken."""
    runs_dir = Path(c["runs_dir"])
    repair = (
        c["logger"].get("mode", "offline") != "disabled"
        and not tracking.closed(cell_dir, cid)
        and tracking.available()
    )
    claim = records.CellClaim(runs_dir, cid, **c["claim"])
    if not (repair or claim.path.exists()) or not claim.try_acquire():
        return None
    try:
        record = records.load_finished(runs_dir, cid)
        if repair and record is not None and not tracking.closed(cell_dir, cid):
            with _tracker(c, record, record.get("sweep"), cell_dir) as tracker:
                tracker.log_result(record)
        return record
    finally:
        claim.release()


def _run_cell(
    cfg: DictConfig,
    c: dict[str, Any],
    cid: str,
    sweep: str | None,
    choices: dict[str, str] | None,
    claim: records.CellClaim,
) -> dict[str, Any]:
    """Compute the cell under ``claim``, checked before each write that replaces what is
    in the cell (demoting the old record, the checkpoint, ``result.json``)."""
    runs_dir = Path(c["runs_dir"])
    cell_dir = runs_dir / cid
    if c.get("threads") is not None:
        torch.set_num_threads(int(c["threads"]))
    _quiet_transformers()
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    task_cfg = c["task"]
    with _timed(timings, "check"):
        task_manager = validate_tasks(
            list(task_cfg["tasks"]), resolve_include_path(task_cfg.get("include_path"))
        )
        method = build_method(cfg.method)
        pool = ModelPool.from_config(c["model"], require_experts=method.uses_experts).open()
        pool.check_compatible()
    torch.manual_seed(c["seed"])

    record: dict[str, Any] = {
        "schema": records.SCHEMA,
        "status": "running",
        "cell_id": cid,
        "sweep": sweep,
        "choices": dict(choices or {}),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": c,
        "method": {
            "name": method.name,
            "params": records.method_params(c["method"]),
        },
        "pool": pool.describe(),
        "seed": c["seed"],
        "sandbox": sandbox.describe(),
    }
    cell_dir.mkdir(parents=True, exist_ok=True)
    path = records.result_path(runs_dir, cid)
    with _tracker(c, record, sweep, cell_dir) as tracker:
        try:
            writer = _merge_and_score(
                c, pool, method, task_manager, tracker, record, timings, cell_dir
            )
            claim.check()
            _demote_finished(runs_dir, cid)
            claim.check()
            _install_checkpoint(writer, cell_dir)
            claim.check()
            _write_record(path, record, timings, t_start)
        except BaseException as err:
            lost = err if isinstance(err, records.ClaimLost) else claim.loss()
            if lost is not None:  # the cell is the new holder's: write nothing to it
                records.clean_own(cell_dir)
                if lost is err or not isinstance(err, Exception):
                    raise
                raise lost from err  # e.g. a swap_in racing the new holder's
            records.clean_cell(cell_dir)  # this attempt's partial checkpoint
            _write_record(path, record, timings, t_start, error=err)
            print(f"[mergelab] failed {cid}: {type(err).__name__} → {path}")
            raise
        tracker.log_result(record)
    print(f"[mergelab] done {cid}: {method.name} → {records.result_path(runs_dir, cid)}")
    print(score_table(record))
    return record


def _merge_and_score(
    c: dict[str, Any],
    pool: ModelPool,
    method: MergeMethod,
    task_manager: Any,
    tracker: tracking.Tracker,
    record: dict[str, Any],
    timings: dict[str, float],
    cell_dir: Path,
) -> ShardedCheckpointWriter | None:
    """Merge, evaluate and write samples; put the weights digest, the method's report and
    the scores (result.json schema 2, see ``records``) into ``record``. Returns the writer
    of the saved checkpoint (closed, not yet swapped in), if one was saved."""
    tokenizer = pool.tokenizer()
    fit_context = None
    if method.needs_data:
        with _timed(timings, "calibration"):
            fit_context = _fit_context(c, pool, method, tokenizer, task_manager, tracker)
    fitted: dict[str, str] = {}

    def fit_cache(m: MergeMethod, ctx: FitContext) -> None:
        root = Path(c["runs_dir"]) / ".fit_cache"
        members = member_files(pool)
        fitted.update(cached_fit(m, ctx, c, root, members, refresh=bool(c.get("force"))))

    cache = fit_cache if c.get("fit_cache", True) else None
    merged_dir = cell_dir / "merged"
    model, digest, writer = _merge(c, pool, method, record, merged_dir, timings, fit_context, cache)
    record["method"]["report"] = method.report()
    if fitted:
        record["method"]["fit_cache"] = fitted
    record["weights_sha256"] = digest
    task_cfg, ev = c["task"], c["eval"]
    with _timed(timings, "eval"):
        try:
            result = evaluate(
                model,
                tokenizer,
                list(task_cfg["tasks"]),
                task_manager=task_manager,
                num_fewshot=_first_set(task_cfg.get("num_fewshot"), ev.get("num_fewshot")),
                limit=ev.get("limit"),
                batch_size=ev.get("batch_size", 1),
                max_length=ev.get("max_length"),
                seed=c["seed"],
                log_samples=ev.get("log_samples", True),
                gen_kwargs=ev.get("gen_kwargs"),
            )
        except NonFiniteScoreError as err:
            raise NonFiniteScoreError(
                f"{err} This cell merged with {method.name} {record['method']['params']} "
                "from members checked finite as they were read: lower those options."
            ) from err
    environment = records.environment()  # torch threads etc. as they were when scoring
    if ev.get("log_samples", True):
        write_samples_jsonl(result.samples, cell_dir / "samples.jsonl")
    record.update(
        metrics=result.metrics,
        intervals=primary_intervals(result),
        n_shot=result.n_shot,
        groups=result.groups,
        scores=result.scores,
        stderr=result.stderr,
        n_samples=result.n_samples,
        environment=environment,
    )
    return writer


def _install_checkpoint(writer: ShardedCheckpointWriter | None, cell_dir: Path) -> None:
    """Swap the new checkpoint in; without one (``save_merged=false``) remove an earlier
    attempt's ``merged/``, so a record never sits beside a checkpoint it does not describe
    (set aside first: a kill leaves ``merged.old-*``, which ``clean_cell`` removes)."""
    if writer is not None:
        writer.swap_in()
        return
    aside = cell_dir / f"merged.old-{records.worker_suffix()}"
    with suppress(FileNotFoundError):
        os.rename(cell_dir / "merged", aside)
        shutil.rmtree(aside, ignore_errors=True)


def _demote_finished(runs_dir: Path, cid: str) -> None:
    """Before a forced rerun swaps its checkpoint in, mark the finished record it replaces
    ``replacing`` (not finished), so no ``complete`` record outlives its checkpoint."""
    if (old := records.load_finished(runs_dir, cid)) is not None:
        records.write_json_atomic(
            records.result_path(runs_dir, cid), {**old, "status": "replacing"}
        )


def _write_record(
    path: Path,
    record: dict[str, Any],
    timings: dict[str, float],
    t_start: float,
    *,
    error: BaseException | None = None,
) -> None:
    """Atomically write ``result.json``: ``complete``, or ``failed`` with the error's type
    and message (and whatever ``record`` holds so far, never scores)."""
    timings["total"] = round(time.perf_counter() - t_start, 4)
    record.update(timings=timings, versions=records.versions(), status="complete")
    if error is not None:
        record["status"] = "failed"
        record["error"] = {"type": type(error).__name__, "message": str(error)}
    records.write_json_atomic(path, record)


def primary_intervals(result: Any, n_boot: int = 10_000) -> dict[str, list[float]]:
    """``{task: [low, high]}``: the 95% item-bootstrap interval (seed 0) of each task's
    primary metric, from the per-item samples (tasks without samples are left out)."""
    from results.stats import AGGREGATIONS, interval

    out = {}
    for task, entries in result.metrics.items():
        key, entry = next((k, e) for k, e in entries.items() if e["primary"])
        name, filter_name = records.split_metric_key(key)
        samples = [s for s in result.samples.get(task) or [] if s.get("filter") == filter_name]
        aggregation = entry.get("aggregation")
        if not samples or aggregation not in AGGREGATIONS:
            continue
        ci = interval([s[name] for s in samples], aggregation, n_boot=n_boot)
        out[task] = [ci.low, ci.high]
    return out


def _quiet_transformers() -> None:
    """No "Loading weights" bar per model load: a cell loads several (merge, fit, eval)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def score_table(record: dict[str, Any]) -> str:
    """Markdown table of each task's metrics in a finished record; the primary metric
    (marked *) with its 95% interval over items."""
    lines = ["| task | metric | score | 95% CI |", "|:--|:--|--:|:--|"]
    for task, metrics in record["metrics"].items():
        for m, entry in metrics.items():
            ci = record.get("intervals", {}).get(task) if entry["primary"] else None
            shown = f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci else ""
            mark = "*" if entry["primary"] else ""
            lines.append(f"| {task} | {m}{mark} | {entry['value']:.4f} | {shown} |")
    return "\n".join(lines)


def _first_set(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _merge(
    c: dict[str, Any],
    pool: ModelPool,
    method: MergeMethod,
    record: dict[str, Any],
    merged_dir: Path,
    timings: dict[str, float],
    fit_context: FitContext | None,
    fit_cache: Callable[[MergeMethod, FitContext], None] | None = None,
) -> tuple[Any, str, ShardedCheckpointWriter | None]:
    """Merge in memory (then optionally save) or stream to disk (then load); the
    checkpoint's writer is returned with its partial directory complete, not swapped in."""
    from transformers import AutoModelForCausalLM

    load_kwargs = {
        "dtype": parse_dtype(pool.dtype) or "auto",
        "trust_remote_code": pool.trust_remote_code,
    }
    if c["stream"]:
        writer = ShardedCheckpointWriter(merged_dir, c["max_shard_size"])
        with _timed(timings, "merge"):
            digest = execute(
                pool,
                method,
                writer,
                seed=c["seed"],
                device=c["device"],
                fit_context=fit_context,
                fit_cache=fit_cache,
            )
        with _timed(timings, "save"):
            saved = writer.close(pool, model_card(record))
        with _timed(timings, "load"):
            model = AutoModelForCausalLM.from_pretrained(saved, **load_kwargs)
        return model.to(c["device"]).eval(), digest, writer

    merged: dict[str, torch.Tensor] = {}
    with _timed(timings, "merge"):
        digest = execute(
            pool,
            method,
            merged.__setitem__,
            seed=c["seed"],
            device=c["device"],
            fit_context=fit_context,
            fit_cache=fit_cache,
        )
    with _timed(timings, "load"):
        model = AutoModelForCausalLM.from_pretrained(pool.base_dir, **load_kwargs)
        load_state_dict_checked(model, merged)
    if not c["save_merged"]:
        return model.to(c["device"]).eval(), digest, None
    with _timed(timings, "save"):
        writer = ShardedCheckpointWriter(merged_dir, c["max_shard_size"])
        for name, tensor in merged.items():
            writer(name, tensor)
        writer.close(pool, model_card(record))
    return model.to(c["device"]).eval(), digest, writer


def load_state_dict_checked(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load merged tensors into ``model``; every model tensor must come from ``state``
    or be tied to one that does (e.g. lm_head tied to the embeddings)."""
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"merged tensors the model does not have: {result.unexpected_keys[:8]}")
    params = dict(model.state_dict())
    loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
    untied = [k for k in result.missing_keys if params[k].data_ptr() not in loaded_ptrs]
    if untied:
        raise ValueError(f"merged state lacks model tensors {untied[:8]}; checkpoint incomplete?")


def _tracker(
    c: dict[str, Any], record: dict[str, Any], sweep: str | None, cell_dir: Path
) -> tracking.Tracker:
    """The cell's W&B run (offline by default; id = cell id, replacing a killed attempt's
    offline run); failures only warn."""
    lg = c["logger"]
    return tracking.start(
        c,
        project=lg.get("project", "mergelab"),
        entity=lg.get("entity"),
        group=lg.get("group") or sweep,
        name=record["cell_id"],
        mode=lg.get("mode", "offline"),
        dir=cell_dir,
        tags=list(lg.get("tags") or []) + [record["method"]["name"]],
        run_id=record["cell_id"],
    )


def _fit_context(
    c: dict[str, Any],
    pool: ModelPool,
    method: MergeMethod,
    tokenizer: Any,
    task_manager: Any,
    tracker: Any,
) -> FitContext:
    """Tensors, models, calibration prompts (for methods that read them: not the training
    workflows, whose tasks may have no calibration split) and a logger."""
    from transformers import AutoModelForCausalLM

    device = c["device"]
    cal = c["task"].get("calibration") or {}
    prompts = (
        calibration_prompts(
            list(c["task"]["tasks"]),
            task_manager,
            split=cal.get("split", "validation"),
            n=int(cal.get("n", 64)),
            seed=c["seed"],
        )
        if method.needs_calibration
        else {}
    )
    names = [n for n in pool.tensor_names() if pool.is_merged(n)]

    def load_tensors(name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        base, experts = pool.tensors(name)  # each checked finite as it is read
        f32 = {"device": device, "dtype": torch.float32}
        return base.to(**f32), {k: v.to(**f32) for k, v in experts.items()}

    def build_model(member: str) -> torch.nn.Module:
        """The base's architecture holding ``member``'s tensors, read through the pool (so
        checked finite, the base's too, before the model is cast to the pool's dtype)."""
        model = AutoModelForCausalLM.from_pretrained(
            pool.base_dir,
            dtype=parse_dtype(pool.dtype) or "auto",
            trust_remote_code=pool.trust_remote_code,
        )
        load_state_dict_checked(model, {n: pool.tensor(member, n) for n in pool.tensor_names()})
        return model.to(device).eval()

    return FitContext(
        expert_names=pool.expert_names,
        expert_tasks={e.name: list(e.tasks) for e in pool.experts},
        tensor_names=names,
        load_tensors=load_tensors,
        build_model=build_model,
        tokenizer=tokenizer,
        calibration=prompts,
        device=device,
        seed=c["seed"],
        log=lambda metrics, step: tracker.log_metrics(metrics, step=step),
        load_texts=load_texts,
        cache_dir=Path(c["runs_dir"]) / ".train_cache",
    )


def _describe(c: dict[str, Any], cid: str, finished: bool) -> None:
    """The dry-run line: what this cell would do, and whether it is already done."""
    params = records.method_params(c["method"])
    experts = ", ".join(c["model"].get("experts") or {})
    print(
        f"[mergelab] dry-run {cid} [{'finished' if finished else 'to run'}] "
        f"method={c['method']['_target_']} {params} pool={c['model'].get('name')} "
        f"(base + {experts}) tasks={list(c['task']['tasks'])} seed={c['seed']} "
        f"→ {Path(c['runs_dir']) / cid}"
    )
