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

Evaluation backends (``eval.backend``, see ``evals.backends``): ``hf`` scores the merged
model object in process; ``vllm`` scores the saved checkpoint (the writer's closed partial
directory, before the swap) with lm-eval's vLLM model, and no HF model is built. The eval
options are checked with the run options, and vllm's import right after (before the claim),
so a missing package or a CPU device fails in seconds. An hf cell's id is the one from
before the option (``backends.cell_eval``).

The in-memory merge (``stream=false``) builds its model once from the base's config and the
merged tensors (:func:`build_merged_model`): the base's weights are not read again.

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

import os
import shutil
import time
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig, OmegaConf

from core.calibration import free_memory
from evals import backends, sandbox
from evals.calibration import calibration_prompts
from evals.lm_eval import (
    NonFiniteScoreError,
    evaluate,
    evaluate_vllm,
    validate_tasks,
    write_samples_jsonl,
)
from harness import records, tracking
from harness.checks import build_method, check_run_options
from harness.data import load_texts
from harness.fit_cache import cached_fit, member_files
from harness.pool import ModelPool, parse_dtype
from harness.resolvers import resolve_include_path
from harness.stream import ShardedCheckpointWriter, execute, mergekit_equivalent, model_card
from methods.base import FitContext, MergeMethod


def run_cell(
    cfg: DictConfig, *, sweep: str | None = None, choices: dict[str, str] | None = None
) -> dict[str, Any] | None:
    """Run (or skip, or describe with ``dry_run``) one cell; return its record.
    ``choices`` (the config group options Hydra composed, e.g. ``{"method": "ties"}``) are
    kept in the record."""
    c: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    check_run_options(c)
    backends.check_eval_options(c)
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
    backends.require_backend(c["eval"])  # before any claim

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
    with records.timed(timings, "check"):
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
        "eval_backend": backends.describe(backends.backend_name(c["eval"]), {}),
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
        with records.timed(timings, "calibration"):
            fit_context = _fit_context(c, pool, method, tokenizer, task_manager, tracker)
    fitted: dict[str, str] = {}

    def fit_cache(m: MergeMethod, ctx: FitContext) -> None:
        root = Path(c["runs_dir"]) / ".fit_cache"
        members = member_files(pool)
        fitted.update(cached_fit(m, ctx, c, root, members, refresh=bool(c.get("force"))))

    cache = fit_cache if c.get("fit_cache", True) else None
    merged_dir = cell_dir / "merged"
    task_cfg, ev = c["task"], c["eval"]
    backend = backends.backend_name(ev)
    merge = _merge(
        c,
        pool,
        method,
        record,
        merged_dir,
        timings,
        fit_context,
        cache,
        build_model=backend == "hf",
    )
    record["method"]["report"] = method.report()
    if fitted:
        record["method"]["fit_cache"] = fitted
    record["weights_sha256"] = merge.digest
    # The same task, few-shot, limit, seed, samples and generation options for either backend.
    common: dict[str, Any] = {
        "task_manager": task_manager,
        "num_fewshot": _first_set(task_cfg.get("num_fewshot"), ev.get("num_fewshot")),
        "limit": ev.get("limit"),
        "seed": c["seed"],
        "log_samples": ev.get("log_samples", True),
        "gen_kwargs": ev.get("gen_kwargs"),
    }
    with records.timed(timings, "eval"):
        try:
            if backend == "hf":
                result = evaluate(
                    merge.model,
                    tokenizer,
                    list(task_cfg["tasks"]),
                    batch_size=ev.get("batch_size", 1),
                    max_length=ev.get("max_length"),
                    **common,
                )
            else:
                assert merge.saved is not None  # check_eval_options: a checkpoint is saved
                model_args = backends.vllm_model_args(
                    merge.saved,
                    ev,
                    dtype=_hf_dtype(pool),
                    seed=c["seed"],
                    trust_remote_code=pool.trust_remote_code,
                )
                record["eval_backend"] = backends.describe(backend, model_args)
                free_memory()  # vLLM sizes its cache from the free memory
                result = evaluate_vllm(model_args, list(task_cfg["tasks"]), **common)
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
    return merge.writer


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


class _Merged(NamedTuple):
    """What :func:`_merge` made: the model to score in process (``None`` for vllm), the
    weights digest, and the saved checkpoint's writer and directory (the closed partial
    directory, not yet swapped in), if one was saved."""

    model: Any
    digest: str
    writer: ShardedCheckpointWriter | None
    saved: Path | None


def _merge(
    c: dict[str, Any],
    pool: ModelPool,
    method: MergeMethod,
    record: dict[str, Any],
    merged_dir: Path,
    timings: dict[str, float],
    fit_context: FitContext | None,
    fit_cache: Callable[[MergeMethod, FitContext], None] | None = None,
    *,
    build_model: bool = True,
) -> _Merged:
    """Merge in memory (then optionally save) or stream to disk (then load); without
    ``build_model`` (the vllm backend scores the saved directory) no model is loaded."""
    from transformers import AutoModelForCausalLM

    if c["stream"]:
        writer = ShardedCheckpointWriter(merged_dir, c["max_shard_size"])
        with records.timed(timings, "merge"):
            digest = execute(
                pool,
                method,
                writer,
                seed=c["seed"],
                device=c["device"],
                fit_context=fit_context,
                fit_cache=fit_cache,
            )
        with records.timed(timings, "save"):
            saved = writer.close(pool, model_card(record, *mergekit_equivalent(record, pool.dirs)))
        if not build_model:
            return _Merged(None, digest, writer, saved)
        with records.timed(timings, "load"):
            model = AutoModelForCausalLM.from_pretrained(
                saved,
                dtype=parse_dtype(pool.dtype) or "auto",
                trust_remote_code=pool.trust_remote_code,
            )
        return _Merged(model.to(c["device"]).eval(), digest, writer, saved)

    merged: dict[str, torch.Tensor] = {}
    with records.timed(timings, "merge"):
        digest = execute(
            pool,
            method,
            merged.__setitem__,
            seed=c["seed"],
            device=c["device"],
            fit_context=fit_context,
            fit_cache=fit_cache,
        )
    model = None
    if build_model:
        with records.timed(timings, "load"):
            model = build_merged_model(pool, merged).to(c["device"]).eval()
    if not c["save_merged"]:
        return _Merged(model, digest, None, None)
    with records.timed(timings, "save"):
        writer = ShardedCheckpointWriter(merged_dir, c["max_shard_size"])
        writer.write_all(merged)  # plans the shards, then writes each tensor in place
        saved = writer.close(pool, model_card(record, *mergekit_equivalent(record, pool.dirs)))
    return _Merged(model, digest, writer, saved)


def build_merged_model(pool: ModelPool, merged: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The base's architecture holding the merged tensors, built once: what
    ``AutoModelForCausalLM.from_pretrained(pool.base_dir)`` followed by
    :func:`load_state_dict_checked` gives (same config, dtype, tied weights, non-persistent
    buffers such as rotary ``inv_freq``, generation config; the tests check state dict and
    logits for equality), without reading the base's weights again or holding a second copy.

    How: transformers' own loader, ``from_pretrained(None, config=, state_dict=merged)``
    (model on the meta device, the merged tensors loaded in, keep-in-fp32 modules, weights
    tied, buffers initialised), then the generation config read from the base as
    ``from_pretrained`` reads it. The model uses the merged tensors themselves where dtype
    and device already match (no copy). Decision: a remote-code model
    (``model.trust_remote_code`` with an ``auto_map``) or a composite config whose causal
    LM class takes the text sub-config is loaded the old way (base read, then overwritten),
    since transformers' auto class picks those classes by steps not repeated here."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    dtype = parse_dtype(pool.dtype) or "auto"
    config = AutoConfig.from_pretrained(pool.base_dir, trust_remote_code=pool.trust_remote_code)
    model_class = _local_causal_lm_class(config, pool.trust_remote_code)
    if model_class is None:
        model = AutoModelForCausalLM.from_pretrained(
            pool.base_dir, dtype=dtype, trust_remote_code=pool.trust_remote_code
        )
        load_state_dict_checked(model, merged)
        return model
    model, info = model_class.from_pretrained(
        None, config=config, state_dict=dict(merged), dtype=dtype, output_loading_info=True
    )
    problems = {k: sorted(info.get(k) or ()) for k in ("unexpected_keys", "mismatched_keys")}
    if problems["unexpected_keys"]:
        raise ValueError(
            f"merged tensors the model does not have: {problems['unexpected_keys'][:8]}"
        )
    if problems["mismatched_keys"]:
        raise ValueError(f"merged tensors of the wrong shape: {problems['mismatched_keys'][:8]}")
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])[:8]
        raise ValueError(f"merged state lacks model tensors {missing}; checkpoint incomplete?")
    if info.get("error_msgs"):
        raise ValueError(f"loading the merged tensors failed: {info['error_msgs'][:3]}")
    model.config.name_or_path = str(pool.base_dir)  # as from_pretrained(base_dir) records
    model.name_or_path = model.config.name_or_path
    if model.can_generate():  # as from_pretrained(base_dir) reads it
        try:
            model.generation_config = GenerationConfig.from_pretrained(pool.base_dir)
        except OSError:  # no generation_config.json: built from config.json
            model.generation_config = GenerationConfig.from_pretrained(
                pool.base_dir, config_file_name="config.json", _from_model_config=True
            )
    return model


def _local_causal_lm_class(config: Any, trust_remote_code: bool) -> type | None:
    """The transformers class ``AutoModelForCausalLM`` would build for ``config``, or
    ``None`` where it would take another route (remote code, a text sub-config, an
    unregistered config)."""
    from transformers import AutoModelForCausalLM

    mapping = AutoModelForCausalLM._model_mapping
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if (remote and trust_remote_code) or type(config) not in mapping:
        return None
    supported = mapping[type(config)]
    if isinstance(supported, (list, tuple)):
        by_name = {m.__name__: m for m in supported}
        arch = [by_name[a] for a in getattr(config, "architectures", None) or [] if a in by_name]
        supported = arch[0] if arch else supported[0]
    text_config = config.sub_configs.get("text_config")
    if text_config is not None and getattr(supported, "config_class", None) == text_config:
        return None
    return supported


def _hf_dtype(pool: ModelPool) -> str:
    """The dtype the hf backend loads the merged model in, by name: the pool's
    ``model.dtype``, else the base config's, else ``auto``."""
    if pool.dtype:
        return pool.dtype
    config = pool.config_json()
    dtype = config.get("dtype") or config.get("torch_dtype")
    return str(dtype) if dtype else "auto"


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
