"""One cell: build pool → run method → evaluate → record. Nothing else orchestrates.

Order of work, cheapest checks first so a bad config fails in seconds:
resolve config → cell id → skip if finished → lock the cell (a concurrent run computing
it is waited for, then skipped) → validate task names → instantiate the
method (validates its options) → open the pool and check compatibility → merge (in
memory, or streamed to a sharded checkpoint) → evaluate the in-memory model → write
samples, then ``result.json`` atomically → log to W&B (never fatal).

Once the record is started (after the checks), any failure writes ``result.json`` with
``status: "failed"`` and the error's type and message (no scores), then re-raises, so the
process exits non-zero; a failed cell is never ``complete`` and is redone next time.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from evals.calibration import calibration_prompts
from evals.lm_eval import NonFiniteScoreError, evaluate, validate_tasks, write_samples_jsonl
from harness import records, tracking
from harness.data import load_texts
from harness.fit_cache import cached_fit, member_files
from harness.pool import ModelPool, parse_dtype
from harness.resolvers import resolve_include_path
from harness.stream import ShardedCheckpointWriter, execute, model_card
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
    cid = records.cell_id(c)
    runs_dir = Path(c["runs_dir"])
    cell_dir = runs_dir / cid
    finished = records.load_finished(runs_dir, cid)
    if c.get("dry_run"):
        _describe(c, cid, finished is not None)
        return finished
    if finished and not c.get("force"):
        print(f"[mergelab] skip {cid}: finished ({records.result_path(runs_dir, cid)})")
        return finished
    with records.cell_lock(runs_dir, cid):
        if finished is None and (done := records.load_finished(runs_dir, cid)) is not None:
            print(f"[mergelab] skip {cid}: finished by a concurrent run ({cell_dir})")
            return done
        return _run_cell(cfg, c, cid, sweep, choices)


def _run_cell(
    cfg: DictConfig,
    c: dict[str, Any],
    cid: str,
    sweep: str | None,
    choices: dict[str, str] | None,
) -> dict[str, Any]:
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
        method: MergeMethod = instantiate(cfg.method)
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
    }
    cell_dir.mkdir(parents=True, exist_ok=True)
    path = records.result_path(runs_dir, cid)
    with _tracker(c, record, sweep, cell_dir) as tracker:
        try:
            _merge_and_score(c, pool, method, task_manager, tracker, record, timings, cell_dir)
        except BaseException as err:
            _write_record(path, record, timings, t_start, error=err)
            print(f"[mergelab] failed {cid}: {type(err).__name__} → {path}")
            raise
        _write_record(path, record, timings, t_start)
        tracker.log_summary(
            {
                **{f"{t}/{m}": v for t, ms in record["scores"].items() for m, v in ms.items()},
                **{f"time/{k}": v for k, v in record["timings"].items()},
                "weights_sha256": record["weights_sha256"],
            }
        )
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
) -> None:
    """Merge, evaluate and write samples; put the weights digest, the method's report and
    the scores (result.json schema 2, see ``records``) into ``record``."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        pool.base_dir, trust_remote_code=pool.trust_remote_code
    )
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
    model, digest = _merge(c, pool, method, record, merged_dir, timings, fit_context, cache)
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
) -> tuple[Any, str]:
    """Merge in memory (then optionally save) or stream to disk (then load)."""
    from transformers import AutoModelForCausalLM

    load_kwargs = {
        "dtype": parse_dtype(pool.dtype) or "auto",
        "trust_remote_code": pool.trust_remote_code,
    }
    shutil.rmtree(merged_dir.with_name(merged_dir.name + ".partial"), ignore_errors=True)
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
            writer.close(pool, model_card(record))
        with _timed(timings, "load"):
            model = AutoModelForCausalLM.from_pretrained(merged_dir, **load_kwargs)
        return model.to(c["device"]).eval(), digest

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
    if c["save_merged"]:
        with _timed(timings, "save"):
            writer = ShardedCheckpointWriter(merged_dir, c["max_shard_size"])
            for name, tensor in merged.items():
                writer(name, tensor)
            writer.close(pool, model_card(record))
    return model.to(c["device"]).eval(), digest


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
    """One W&B run per cell (offline by default); failures only warn."""
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
