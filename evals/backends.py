"""Which lm-eval model scores a cell (``eval.backend``), and the checks made before any merge.

* ``hf`` (default): lm-eval's ``HFLM`` over the merged model object, in this process
  (:func:`evals.lm_eval.evaluate`). ``eval.batch_size`` may be an int, ``"auto"`` or
  ``"auto:N"`` (lm-eval's detection of the largest batch that fits, capped at 64).
* ``vllm``: lm-eval's vLLM model (``lm_eval.models.vllm_causallms.VLLM``, registered as
  ``"vllm"``) over the cell's saved checkpoint directory (:func:`evals.lm_eval.evaluate_vllm`),
  with the options of ``eval.vllm`` (:data:`VLLM_DEFAULTS`).

Decisions:

* **Which checkpoint.** vLLM loads from disk, so it scores the checkpoint the cell saves: the
  writer's closed partial directory, before the run swaps it in as ``<cell>/merged`` (the
  order of the run's writes is unchanged, and a kill while scoring leaves no
  complete-looking ``merged/``). With ``stream=false save_merged=false`` there is none, and
  the run refuses at once rather than write a checkpoint the user asked not to keep.
* **GPU only.** ``device=cpu`` with ``eval.backend=vllm`` is refused: the ``vllm`` wheels are
  CUDA builds (its CPU backend is a separate source build mergelab does not support), and
  CPU cells pin their float behaviour through ``threads``, which vLLM does not follow.
  ``device`` places the merge; vLLM takes its GPUs from ``CUDA_VISIBLE_DEVICES``.
* **Availability.** ``vllm`` is an optional extra. :func:`require_backend` imports lm-eval's
  vLLM model right after the config checks, before the cell is claimed, the pool opened or
  anything merged; a dry run, or a skip of a finished cell, does not need it.
* **Cell id** (:func:`cell_eval`): ``eval.backend`` and ``eval.vllm`` do not change what HFLM
  computes, so an hf cell's id leaves them out and every existing id stays as it was. A
  vllm cell's id includes both, the whole ``eval.vllm`` mapping: another engine and kernels,
  and its parallelism and memory settings change how requests are batched, so its scores
  may differ from hf's (and from another vLLM setting's) in the last bits.
* **dtype.** ``eval.vllm.dtype: null`` runs vLLM in the dtype the hf path loads (the pool's
  ``model.dtype``, else the checkpoint config's), since vLLM's own ``"auto"`` casts float32
  checkpoints to 16 bits.
* **Passthrough.** ``eval.vllm.extra`` goes to ``VLLM`` (and from there to ``vllm.LLM``) as
  is, e.g. ``{enforce_eager: true, max_num_seqs: 128}``; it may not repeat an option that
  is set elsewhere (:data:`RESERVED`).

This module imports neither torch nor lm-eval, so the checks cost nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BACKENDS = ("hf", "vllm")
# eval.vllm's options and their defaults (conf/eval/default.yaml lists the same).
VLLM_DEFAULTS: dict[str, Any] = {
    "dtype": None,
    "tensor_parallel_size": 1,
    "data_parallel_size": 1,
    "gpu_memory_utilization": 0.9,
    "max_model_len": None,
    "extra": None,
}
VLLM_DTYPES = ("auto", "float32", "bfloat16", "float16")
# VLLM constructor arguments mergelab sets itself (not accepted in eval.vllm.extra), each with
# where its value comes from: these, and eval.vllm's own options ("from eval.vllm.<key>").
_SET_BY_MERGELAB: dict[str, str] = {
    "pretrained": "the cell's saved checkpoint",
    "seed": "from seed",
    "trust_remote_code": "from model.trust_remote_code",
    "batch_size": "from eval.batch_size",
    "max_batch_size": "lm-eval's default",
    "max_length": "from eval.max_length",
    "device": "vLLM picks its GPUs from CUDA_VISIBLE_DEVICES",
}
RESERVED = frozenset(_SET_BY_MERGELAB) | (VLLM_DEFAULTS.keys() - {"extra"})
INSTALL = (
    "install it on a machine with a CUDA GPU: pip install 'mergelab[vllm]' (or pip install "
    "vllm; it brings its own CUDA build of torch), or score in process with eval.backend=hf"
)
_AUTO = re.compile(r"auto(:\d+(\.\d+)?)?")


def backend_name(ev: Mapping[str, Any]) -> str:
    """``eval.backend``; absent (a config written before the option) means ``hf``."""
    return str(ev.get("backend") or "hf")


def cell_eval(ev: Mapping[str, Any]) -> dict[str, Any]:
    """The ``eval`` config as it enters the cell id: without ``backend`` and ``vllm`` for the
    hf backend (so hf cell ids are the ones from before the option), whole for vllm."""
    if backend_name(ev) == "hf":
        return {k: v for k, v in ev.items() if k not in ("backend", "vllm")}
    return dict(ev)


def check_batch_size(value: Any) -> None:
    """``eval.batch_size``: a positive int, ``"auto"`` or ``"auto:N"``."""
    ok = (isinstance(value, int) and not isinstance(value, bool) and value >= 1) or (
        isinstance(value, str) and _AUTO.fullmatch(value) is not None
    )
    if not ok:
        raise ValueError(
            f"eval.batch_size={value!r} must be a positive integer, 'auto' or 'auto:N' "
            "(lm-eval's detection, re-run N times): eval.batch_size=256 or eval.batch_size=auto"
        )


def vllm_options(ev: Mapping[str, Any]) -> dict[str, Any]:
    """``eval.vllm`` over :data:`VLLM_DEFAULTS`, each option checked (errors name it)."""
    given = ev.get("vllm") or {}
    if not isinstance(given, Mapping):
        raise ValueError(f"eval.vllm={given!r} must be a mapping of vLLM options: {VLLM_DEFAULTS}")
    unknown = sorted(set(given) - set(VLLM_DEFAULTS))
    if unknown:
        raise ValueError(
            f"eval.vllm.{unknown[0]} is not an option; eval.vllm takes {list(VLLM_DEFAULTS)} "
            f"(other vllm.LLM arguments go in eval.vllm.extra: eval.vllm.extra.{unknown[0]}=...)"
        )
    opts = {**VLLM_DEFAULTS, **given}
    for key in ("tensor_parallel_size", "data_parallel_size"):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"eval.vllm.{key}={v!r} must be a positive integer: eval.vllm.{key}=1")
    gmu = opts["gpu_memory_utilization"]
    if isinstance(gmu, bool) or not isinstance(gmu, (int, float)) or not 0 < gmu <= 1:
        raise ValueError(
            f"eval.vllm.gpu_memory_utilization={gmu!r} must be a fraction in (0, 1] of each "
            "GPU's memory: eval.vllm.gpu_memory_utilization=0.9"
        )
    mml = opts["max_model_len"]
    if mml is not None and (isinstance(mml, bool) or not isinstance(mml, int) or mml < 1):
        raise ValueError(
            f"eval.vllm.max_model_len={mml!r} must be a positive integer or null (the "
            "model config's context length)"
        )
    if opts["dtype"] is not None and opts["dtype"] not in VLLM_DTYPES:
        raise ValueError(
            f"eval.vllm.dtype={opts['dtype']!r} must be one of {list(VLLM_DTYPES)} or null "
            "(null: the dtype the hf backend would load)"
        )
    extra = opts["extra"] if opts["extra"] is not None else {}
    if not isinstance(extra, Mapping):
        raise ValueError(
            f"eval.vllm.extra={extra!r} must be a mapping of vllm.LLM arguments, e.g. "
            "eval.vllm.extra={enforce_eager: true}"
        )
    clash = sorted(RESERVED & set(extra))
    if clash:
        raise ValueError(
            f"eval.vllm.extra.{clash[0]} is set by mergelab ({_where(clash[0])}): drop it "
            "from eval.vllm.extra and set that option instead"
        )
    opts["extra"] = dict(extra)
    return opts


def _where(key: str) -> str:
    return _SET_BY_MERGELAB.get(key, f"from eval.vllm.{key}")


def check_eval_options(c: Mapping[str, Any]) -> None:
    """The ``eval`` options of a resolved config, checked before anything runs (no import):
    the backend's name, ``eval.batch_size``, and for vllm its options, a CUDA ``device``, a
    saved checkpoint to score, and one context length."""
    ev = c["eval"]
    backend = backend_name(ev)
    if backend not in BACKENDS:
        raise ValueError(
            f"eval.backend={backend!r} is not a backend: eval.backend=hf (in process) or "
            "eval.backend=vllm (the saved checkpoint, on CUDA GPUs)"
        )
    check_batch_size(ev.get("batch_size", 1))
    if backend != "vllm":
        return
    opts = vllm_options(ev)
    if str(c.get("device", "cpu")).split(":")[0] != "cuda":
        raise ValueError(
            f"eval.backend=vllm runs on CUDA GPUs, not device={c.get('device')!r}: set "
            "device=cuda, or use eval.backend=hf on a CPU"
        )
    if not c.get("stream") and not c.get("save_merged"):
        raise ValueError(
            "eval.backend=vllm scores the saved checkpoint, and stream=false save_merged=false "
            "saves none: set save_merged=true (or stream=true), or use eval.backend=hf"
        )
    if ev.get("max_length") is not None and opts["max_model_len"] is not None:
        raise ValueError(
            f"eval.max_length={ev['max_length']} and eval.vllm.max_model_len="
            f"{opts['max_model_len']} both set the context length: set one of them"
        )


def require_backend(ev: Mapping[str, Any]) -> None:
    """Stop at once if the ``eval`` config's backend cannot run here: for vllm, lm-eval's
    vLLM model (and so ``vllm``) must import, and data parallelism needs ``ray``."""
    if backend_name(ev) != "vllm":
        return
    try:
        importlib.import_module("lm_eval.models.vllm_causallms")
    except ImportError as err:
        raise ImportError(
            f"eval.backend=vllm needs the vllm package, which cannot be imported here "
            f"({type(err).__name__}: {err}): {INSTALL}"
        ) from err
    dp = vllm_options(ev)["data_parallel_size"]
    if dp > 1 and importlib.util.find_spec("ray") is None:
        raise ImportError(
            f"eval.vllm.data_parallel_size={dp} runs one vLLM engine per replica through "
            "ray, which is not installed: pip install ray, or eval.vllm.data_parallel_size=1"
        )


def vllm_model_args(
    checkpoint: str | Path,
    ev: Mapping[str, Any],
    *,
    dtype: str,
    seed: int,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """The keyword arguments of lm-eval's ``VLLM`` (model ``"vllm"``) for ``checkpoint``.

    ``dtype`` is the dtype the hf backend would load (``"auto"`` if unknown), used unless
    ``eval.vllm.dtype`` is set; ``seed`` the cell's seed (vLLM's sampling seed). Batch size and
    context length come from ``eval.batch_size`` / ``eval.max_length`` (or
    ``eval.vllm.max_model_len``); ``eval.vllm.extra`` is passed through as is."""
    opts = vllm_options(ev)
    return {
        "pretrained": str(checkpoint),
        "dtype": opts["dtype"] or dtype,
        "seed": int(seed),
        "trust_remote_code": bool(trust_remote_code),
        "tensor_parallel_size": opts["tensor_parallel_size"],
        "data_parallel_size": opts["data_parallel_size"],
        "gpu_memory_utilization": float(opts["gpu_memory_utilization"]),
        "max_model_len": opts["max_model_len"],
        "max_length": ev.get("max_length"),
        "batch_size": ev.get("batch_size", "auto"),
        **opts["extra"],
    }


def describe(backend: str, model_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``result.json``'s ``eval_backend``: the backend, lm-eval's model name and, for vllm,
    the model arguments (the checkpoint named as the cell's ``merged``, where it ends up)
    and vllm's version."""
    if backend != "vllm":
        return {"name": "hf", "lm_eval_model": "hf", "in_process": True}
    from importlib import metadata

    args = {k: v for k, v in (model_args or {}).items() if k != "pretrained"}
    return {
        "name": "vllm",
        "lm_eval_model": "vllm",
        "checkpoint": "merged",
        "model_args": args,
        "vllm_version": metadata.version("vllm"),
    }
