"""mergekit 0.1.5 merge YAMLs ↔ mergelab method and model configs.

:func:`from_mergekit` reads a mergekit YAML (``models`` with per-model ``parameters``,
``base_model``, ``merge_method``, global ``parameters``, ``dtype`` / ``out_dtype``) and
returns the mergelab ``method`` and ``model`` configs of the same merge, with mergekit's
conventions selected through the methods' options, so that ``mergelab-merge --mergekit``
reproduces ``mergekit-yaml``. :func:`mergekit_yaml` is the reverse, for model cards: the
mergekit YAML of a mergelab merge where mergekit 0.1.5 has the same merge, else ``None``.
Nothing here imports mergekit: the YAML is read with PyYAML and mergekit's rules (each
method's parameters, defaults and scopes, how it orders models and resolves parameters)
are restated in :data:`METHODS`; ``tests/peers/test_mergekit_yaml.py`` checks them against
mergekit itself.

How mergekit's conventions map (each an option of the mergelab method; the defaults stay
the papers'):

- every weighted sum: ``weight_product: rounded`` (mergekit rounds w·τ before summing);
  ``normalize`` as mergekit resolves it for the method (``dare_ties`` and
  ``breadcrumbs_ties`` default to the *sum* of the agreeing entries);
- TIES-style votes (``ties``, ``dare_ties``, ``breadcrumbs_ties``, ``della``):
  ``sign_vote: weighted`` and ``zero_sign: positive``;
- ``ties``: ``trim_scope: per_tensor``, ``keep_count: floor``, ``tie_break: argsort``;
  ``breadcrumbs*``: ``tie_break: sort``; ``rescale: true`` → ``rescale: l1`` (``false`` →
  ``none``) wherever mergekit sparsifies;
- ``dare_*`` and ``della*``: ``mask_rng: mergekit`` (its masks, replayed from the global
  RNG as ``--random-seed`` seeds it: pass the same seed to ``mergelab-merge``);
- ``linear``: ``weight_average`` with ``normalize: after`` (``none`` for its
  ``normalize: false``); ``sce``: ``weight_eps: 1e-6``; ``karcher`` / ``multislerp``:
  ``method=karcher`` with the variant, mergekit's model order and ``origin`` (``base``
  when a multislerp has a base model).
- ``int8_mask`` changes no value (a mask's dtype) and is accepted; ``rescale`` and
  ``density`` of ``task_arithmetic`` do nothing in mergekit and are accepted with a note.

Refused, with the key and what to do: ``slices`` / ``modules`` / layer ranges (mergelab
merges whole checkpoints), parameter gradients and ``filter`` lists (one value per
merge), per-model values of a parameter mergelab has once per merge (``density``,
``gamma``, ``epsilon``) when they differ, negative weights, LoRA references
(``model+lora``), ``tokenizer_source`` other than the base, ``tokenizer`` /
``chat_template``, mergekit methods mergelab lacks, unknown keys (mergekit ignores them
silently; here they are more likely typos).

Not bit-identical even so, and said in ``options["notes"]``: ``slerp``, ``karcher``,
``multislerp`` and ``sce`` (mergekit computes angles, norms and η as float32 tensors,
mergelab as float64 scalars: differences of a few float32 ulps, bounds in
``tests/peers``); ``model_stock`` where mergekit's singular guard (|1 + (k−1)·cos| < 1e-6
→ t = 0) would fire; a compute ``dtype`` other than float32 (mergekit then computes in
that dtype, mergelab always in float32 and casts the result).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from core.options import resolve_weights

REQUIRED = object()  # a parameter without a default (mergekit raises when it is missing)

TOP_KEYS = {
    "models",
    "merge_method",
    "base_model",
    "dtype",
    "out_dtype",
    "parameters",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "slices",
    "modules",
}
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")


@dataclass(frozen=True)
class MethodSpec:
    """A mergekit 0.1.5 method as its registry declares it: parameters with their
    defaults (``REQUIRED``: none) by scope, and its base-model policy (``required``: the
    base is the reference, not an input; ``ignored``: a base model is one more input;
    ``optional``: the base is the origin when given)."""

    shared: dict[str, Any]
    per_model: dict[str, Any] = field(default_factory=dict)
    base: str = "required"
    base_is_input: bool = False  # per-model parameters apply to the base too (INPUT scope)


_GTA_SHARED = {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0}


def _gta(normalize: bool, rescale: bool, extra: Mapping[str, Any] | None = None) -> MethodSpec:
    per_model = {"weight": REQUIRED, "density": 1.0, **(extra or {})}
    shared = {**_GTA_SHARED, "normalize": normalize, "rescale": rescale}
    return MethodSpec(shared, per_model)


METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec(
        {"normalize": True}, {"weight": REQUIRED}, base="ignored", base_is_input=True
    ),
    "task_arithmetic": _gta(False, False),
    "ties": _gta(True, False),
    "dare_ties": _gta(False, True),
    "dare_linear": _gta(False, True),
    "breadcrumbs": _gta(False, False, {"gamma": 0.01}),
    "breadcrumbs_ties": _gta(False, False, {"gamma": 0.01}),
    "della": _gta(True, True, {"epsilon": 0.15}),
    "della_linear": _gta(False, True, {"epsilon": 0.15}),
    "slerp": MethodSpec({"t": REQUIRED}),
    "model_stock": MethodSpec({"filter_wise": False}),
    "karcher": MethodSpec({"max_iter": 10, "tol": 1e-5}, base="ignored"),
    "multislerp": MethodSpec(
        {"normalize_weights": True, "eps": 1e-8}, {"weight": REQUIRED}, base="optional"
    ),
    "sce": MethodSpec({"int8_mask": False, "select_topk": 1.0}),
}
MISSING_IN_MERGELAB = {
    "nuslerp": "nuSLERP",
    "nearswap": "NearSwap",
    "ram": "RAM",
    "ramplus_tl": "RAM+",
    "arcee_fusion": "Arcee Fusion",
    "passthrough": "passthrough (layer slices copied from models: frankenmerges)",
}
BOOL_PARAMS = {"int8_mask", "normalize", "rescale", "filter_wise", "normalize_weights"}
INT_PARAMS = {"max_iter"}
MIN_EXPERTS = {"model_stock": 2, "slerp": 1, "karcher": 1}


class MergekitConfigError(ValueError):
    """A mergekit YAML mergelab cannot translate; the message names the key and the fix."""


@dataclass
class _Ref:
    """A model reference: ``path`` or ``path@revision``."""

    path: str
    revision: str | None = None

    @property
    def text(self) -> str:
        return f"{self.path}@{self.revision}" if self.revision else self.path


# ------------------------------------------------------------------- mergekit → mergelab


def from_mergekit(
    path: str | Path,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Translate the mergekit YAML at ``path``: ``(method_cfg, model_cfg, options)``.

    ``method_cfg`` and ``model_cfg`` are what ``conf/method/*.yaml`` and
    ``conf/model/*.yaml`` hold (``_target_`` and options; the pool: ``name``, ``base``,
    ``experts`` in mergekit's model order, ``dtype``), ready for ``mergelab-merge``.
    ``options``: ``source`` (the file), ``merge_method``, ``compute_dtype`` (mergekit's
    ``dtype``; ``None``: each tensor's stored dtype), ``exact`` (whether bit-identical
    weights are expected for float32 arithmetic) and ``notes`` (what mergekit ignores,
    what is not bit-identical and why). A config mergelab cannot reproduce raises
    :class:`MergekitConfigError` naming the key and what to do.
    """
    path = Path(path)
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise MergekitConfigError(
            f"--mergekit {where}: cannot read it ({err}): give a mergekit YAML file"
        ) from err
    except yaml.YAMLError as err:
        raise MergekitConfigError(f"{where} is not valid YAML ({err}): fix the file") from err
    if not isinstance(raw, Mapping):
        raise MergekitConfigError(
            f"{where} must hold a mapping (merge_method, models, base_model, ...), got "
            f"{type(raw).__name__}"
        )
    return _translate(dict(raw), where, path.stem)


def _translate(
    raw: dict[str, Any], where: str, name: str
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    notes: list[str] = []
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise MergekitConfigError(
            f"{where}: unknown key(s) {unknown} (mergekit 0.1.5 ignores them silently; its "
            f"keys are {sorted(TOP_KEYS)}): remove or rename them"
        )
    for key in ("slices", "modules"):
        if raw.get(key):
            raise MergekitConfigError(
                f"{where}: {key}: mergelab merges whole checkpoints tensor by tensor and has "
                "no layer slices or per-module inputs: list the models under models: (one "
                "entry each, no layer_range), or run this config with mergekit-yaml"
            )
    method_name = raw.get("merge_method")
    if method_name in MISSING_IN_MERGELAB:
        raise MergekitConfigError(
            f"{where}: merge_method: {method_name}: mergelab has no "
            f"{MISSING_IN_MERGELAB[method_name]}; it translates {sorted(METHODS)}: run this "
            "config with mergekit-yaml, or pick one of those"
        )
    if method_name not in METHODS:
        raise MergekitConfigError(
            f"{where}: merge_method: {method_name!r} is not a mergekit 0.1.5 method mergelab "
            f"translates; use one of {sorted(METHODS)}"
        )
    spec = METHODS[method_name]
    _check_tokenizer(raw, where)
    compute_dtype = _dtype(raw.get("dtype"), f"{where}: dtype")
    out_dtype = _dtype(raw.get("out_dtype"), f"{where}: out_dtype")
    if compute_dtype not in (None, "float32"):
        notes.append(
            f"dtype: {compute_dtype}: mergekit computes in {compute_dtype}, mergelab always in "
            "float32 (then writes the result in the output dtype): the weights differ by "
            f"rounding. dtype: float32 with out_dtype: {out_dtype or compute_dtype} makes "
            "mergekit compute as mergelab does."
        )
    model_dtype = out_dtype or compute_dtype
    if model_dtype == "float64":
        raise MergekitConfigError(
            f"{where}: {'out_dtype' if out_dtype else 'dtype'}: float64: mergelab writes "
            "float32, bfloat16 or float16 checkpoints: choose one of those"
        )

    models = raw.get("models")
    if not isinstance(models, list) or not models:
        raise MergekitConfigError(
            f"{where}: models: must list the models to merge, each as {{model: PATH, "
            "parameters: {...}}"
        )
    refs = [_model_ref(m, f"{where}: models[{i}]") for i, m in enumerate(models)]
    for i, r in enumerate(refs):
        first = next(j for j, q in enumerate(refs) if q.text == r.text)
        if first != i:
            raise MergekitConfigError(
                f"{where}: models[{i}] repeats models[{first}] ({r.text}): mergekit merges a "
                "model once however often it is listed: list it once"
            )
    base = _ref(raw["base_model"], f"{where}: base_model") if raw.get("base_model") else None
    global_params = raw.get("parameters") or {}
    if not isinstance(global_params, Mapping):
        raise MergekitConfigError(f"{where}: parameters: must be a mapping of name: value")
    per_model_raw = [m.get("parameters") or {} for m in models]
    _check_parameter_names(
        spec, method_name, global_params, per_model_raw, where, notes, refs, base
    )

    # mergekit's model order: the models as listed, the base model appended when absent
    order = list(refs)
    if base is not None and all(r.text != base.text for r in refs):
        order.append(base)
    if spec.base == "required" and base is None:
        raise MergekitConfigError(
            f"{where}: base_model: {method_name} needs a base model (the reference the task "
            "vectors are taken from): add base_model: PATH"
        )
    is_base = [base is not None and r.text == base.text for r in order]
    params_of = [per_model_raw[i] if i < len(per_model_raw) else {} for i in range(len(order))]

    def model_param(i: int, key: str) -> Any:
        """The value mergekit resolves for model i: its own, the global one, the default."""
        src = params_of[i] if key in params_of[i] else global_params
        who = (
            f"{where}: models[{i}].parameters.{key}"
            if key in params_of[i]
            else f"{where}: parameters.{key}"
        )
        if key not in src:
            default = spec.per_model[key]
            if default is REQUIRED:
                fix = (
                    f"set models[{i}].parameters.{key}"
                    if i < len(models)
                    else "list the base model under models: with its own parameters"
                )
                raise MergekitConfigError(
                    f"{where}: {key} is required by mergekit's {method_name} for "
                    f"{order[i].text} (mergekit raises 'Missing required parameter {key}'): "
                    f"{fix}, or set a global parameters.{key}"
                )
            return default
        return _scalar(src[key], key, who)

    def shared_param(key: str) -> Any:
        if key in global_params:
            return _scalar(global_params[key], key, f"{where}: parameters.{key}")
        default = spec.shared[key]
        if default is REQUIRED:
            raise MergekitConfigError(
                f"{where}: parameters.{key} is required by mergekit's {method_name}: set it"
            )
        return default

    # the pool: the base (or, without one, the first model) and the inputs as experts;
    # where mergekit ignores the base policy, a base model is one more input
    if spec.base == "ignored":
        inputs = list(range(len(order)))
    else:
        inputs = [i for i in range(len(order)) if not is_base[i]]
    pool_base = base if base is not None else order[0]
    names = _member_names([order[i] for i in inputs])
    member_of = dict(zip(inputs, names, strict=True))
    if spec.base == "ignored" and method_name == "karcher":
        # karcher lists members; the pool's base stands for whichever input is the base
        for i in inputs:
            if order[i].text == pool_base.text:
                member_of[i] = "base"
    experts = {member_of[i]: _member(order[i]) for i in inputs if member_of[i] != "base"}
    if not experts and method_name != "karcher":
        raise MergekitConfigError(
            f"{where}: models: {method_name} needs at least one model besides the base model"
        )
    need = MIN_EXPERTS.get(method_name, 1)
    non_base = [i for i in inputs if not is_base[i]]
    if method_name == "karcher" and len(inputs) < 2:
        raise MergekitConfigError(
            f"{where}: models: a Karcher mean of one model is that model: list at least two"
        )
    if len(non_base) < need or (method_name == "slerp" and len(non_base) != 1):
        want = "exactly one model" if method_name == "slerp" else f"at least {need} models"
        raise MergekitConfigError(
            f"{where}: models: mergekit's {method_name} takes {want} besides base_model; "
            f"got {len(non_base)}"
        )

    def given(key: str) -> bool:
        """Whether the YAML sets ``key`` anywhere."""
        return key in global_params or any(key in p for p in per_model_raw)

    model_cfg = {
        "name": name,
        "base": _member(pool_base),
        "experts": experts,
        "dtype": model_dtype,
        "exclude": [],
        "trust_remote_code": False,
    }

    def weights_of(indices: Sequence[int]) -> dict[str, float]:
        out = {}
        for i in indices:
            w = float(model_param(i, "weight"))
            if w < 0 or not math.isfinite(w):
                raise MergekitConfigError(
                    f"{where}: weight {w} for {order[i].text}: mergelab's weights are finite "
                    "and >= 0 (a negative weight subtracts a model; mergelab has no such "
                    "option): use weights >= 0"
                )
            out[member_of[i]] = w
        return out

    def one_value(key: str, lo: float, hi: float, what: str) -> float:
        values = {float(model_param(i, key)) for i in non_base}
        if len(values) > 1:
            raise MergekitConfigError(
                f"{where}: {key} differs between models ({sorted(values)}): mergelab applies "
                f"one {key} to every expert: set the same value for all (or one global "
                f"parameters.{key})"
            )
        (v,) = values
        if not lo <= v <= hi:
            raise MergekitConfigError(f"{where}: {key}: {v} must be {what}")
        return v

    method_cfg, exact = _method_cfg(
        method_name,
        shared_param,
        weights_of,
        one_value,
        non_base,
        inputs,
        member_of,
        base is not None,
        given,
        notes,
        where,
    )
    if compute_dtype not in (None, "float32"):
        exact = False
    options = {
        "source": where,
        "merge_method": method_name,
        "compute_dtype": compute_dtype,
        "exact": exact,
        "notes": notes,
    }
    return method_cfg, model_cfg, options


def _method_cfg(
    method_name: str,
    shared_param: Any,
    weights_of: Any,
    one_value: Any,
    non_base: list[int],
    inputs: list[int],
    member_of: dict[int, str],
    has_base: bool,
    given: Any,
    notes: list[str],
    where: str,
) -> tuple[dict[str, Any], bool]:
    """The mergelab method config of one mergekit method, and whether bit-identical
    weights are expected."""
    gta = method_name in ("task_arithmetic", "ties", "dare_ties", "dare_linear") or (
        method_name.startswith(("breadcrumbs", "della"))
    )
    if gta:
        rounded = {"weight_product": "rounded"}
        scaling = float(shared_param("lambda"))
        normalize = bool(shared_param("normalize"))
        rescale = "l1" if shared_param("rescale") else "none"
        weights = weights_of(non_base)
        vote = {"sign_vote": "weighted", "zero_sign": "positive"}
        common = {"scaling": scaling, "weights": weights, "normalize": normalize, **rounded}
        if given("int8_mask"):
            notes.append("int8_mask only changes the dtype of mergekit's masks: ignored")
        if method_name == "task_arithmetic":
            for key in ("density", "rescale"):
                if given(key):
                    notes.append(
                        f"{key} has no effect in mergekit's task_arithmetic (no "
                        "sparsification): ignored"
                    )
            return {"_target_": "methods.task_arithmetic.TaskArithmetic", **common}, True
        density = one_value("density", 0.0, math.inf, "> 0")
        if density <= 0:
            raise MergekitConfigError(
                f"{where}: density: {density}: mergekit keeps nothing at density <= 0; "
                "mergelab needs a density in (0, 1]: leave the models out instead"
            )
        density = min(density, 1.0)  # mergekit keeps everything from 1 up
        if method_name == "ties":
            return {
                "_target_": "methods.ties.TIES",
                "density": density,
                "trim_scope": "per_tensor",
                "keep_count": "floor",
                "rescale": rescale,
                "tie_break": "argsort",
                **common,
                **vote,
            }, True
        if method_name.startswith("dare"):
            drop = 1.0 - density
            if _f32(1.0 - drop) != _f32(density):  # the keep probability mergekit draws with
                raise MergekitConfigError(
                    f"{where}: density: {density} does not survive 1 − (1 − d) in float32; "
                    "round it to fewer digits"
                )
            notes.append(
                "DARE masks follow mergekit's --random-seed stream (mask_rng: mergekit): "
                "pass mergelab-merge the seed mergekit-yaml was given (seed=N)"
            )
            cfg = {
                "drop_rate": drop,
                "rescale": rescale,
                "mask_rng": "mergekit",
                **common,
            }
            if method_name == "dare_ties":
                return {"_target_": "methods.dare.DARETies", **cfg, **vote}, True
            return {"_target_": "methods.dare.DARELinear", **cfg}, True
        ties = method_name.endswith(("_ties", "della"))
        if method_name.startswith("breadcrumbs"):
            gamma = one_value("gamma", 0.0, 1.0, "in [0, 1)")
            if gamma >= 1:
                raise MergekitConfigError(f"{where}: gamma: {gamma} must be in [0, 1)")
            cfg = {
                "_target_": "methods.breadcrumbs.Breadcrumbs",
                "density": density,
                "gamma": gamma,
                "sign_election": ties,
                "rescale": rescale,
                "tie_break": "sort",
                **common,
            }
            return ({**cfg, **vote} if ties else cfg), True
        epsilon = one_value("epsilon", 0.0, 1.0, "in [0, 1)")
        if density < 1 and not (density - epsilon > 0 and density + epsilon < 1):
            raise MergekitConfigError(
                f"{where}: epsilon: density ± epsilon ({density} ± {epsilon}) must lie inside "
                "(0, 1) (mergekit raises otherwise): lower epsilon"
            )
        notes.append(
            "DELLA masks follow mergekit's --random-seed stream (mask_rng: mergekit): pass "
            "mergelab-merge the seed mergekit-yaml was given (seed=N)"
        )
        cfg = {
            "_target_": "methods.della.DELLA",
            "density": density,
            "epsilon": epsilon,
            "sign_election": ties,
            "rescale": rescale,
            "mask_rng": "mergekit",
            **common,
        }
        return ({**cfg, **vote} if ties else cfg), True

    if method_name == "linear":
        normalize = "after" if shared_param("normalize") else "none"
        weights = weights_of(inputs)
        if normalize == "after" and sum(weights.values()) <= 0:
            raise MergekitConfigError(f"{where}: weight: the weights must not all be 0")
        return {
            "_target_": "methods.weight_average.WeightAverage",
            "weights": weights,
            "normalize": normalize,
        }, True
    if method_name == "slerp":
        t = float(shared_param("t"))
        if not 0 <= t <= 1:
            raise MergekitConfigError(f"{where}: parameters.t: {t} must be in [0, 1]")
        notes.append(_ROUNDING["slerp"])
        return {
            "_target_": "methods.slerp.SLERP",
            "t": t,
            "models": ["base", member_of[non_base[0]]],
        }, False
    if method_name == "model_stock":
        if shared_param("filter_wise"):
            raise MergekitConfigError(
                f"{where}: parameters.filter_wise: true: mergelab's model_stock takes one "
                "angle per tensor, not per row: drop filter_wise"
            )
        notes.append(
            "model_stock: bit-identical except where mergekit's singular guard "
            "(|1 + (k−1)·cos| < 1e-6 → t = 0) fires; mergelab has no such guard"
        )
        return {"_target_": "methods.model_stock.ModelStock"}, True
    if method_name == "karcher":
        max_iter = shared_param("max_iter")
        tol = float(shared_param("tol"))
        notes.append(_ROUNDING["karcher"])
        return {
            "_target_": "methods.karcher.KarcherMerge",
            "variant": "karcher",
            "models": [member_of[i] for i in inputs],
            "weights": None,
            "max_iter": int(max_iter),
            "tol": tol,
            "origin": "zero",
        }, False
    if method_name == "multislerp":
        if not shared_param("normalize_weights"):
            raise MergekitConfigError(
                f"{where}: parameters.normalize_weights: false: mergelab's multislerp always "
                "normalises the weights: drop it (and scale the weights to sum to 1)"
            )
        if float(shared_param("eps")) != 1e-8:
            raise MergekitConfigError(
                f"{where}: parameters.eps: mergelab's multislerp uses mergekit's default "
                "1e-8: drop eps"
            )
        notes.append(_ROUNDING["multislerp"])
        members = [member_of[i] for i in non_base] if has_base else [member_of[i] for i in inputs]
        return {
            "_target_": "methods.karcher.KarcherMerge",
            "variant": "multislerp",
            "models": members,
            "weights": weights_of(non_base if has_base else inputs),
            "origin": "base" if has_base else "zero",
        }, False
    # sce
    topk = float(shared_param("select_topk"))
    if not 0 < topk:
        raise MergekitConfigError(
            f"{where}: parameters.select_topk: {topk}: mergekit then keeps nothing; mergelab "
            "needs a fraction in (0, 1]"
        )
    notes.append(_ROUNDING["sce"])
    return {
        "_target_": "methods.sce.SCE",
        "select_topk": min(topk, 1.0),
        "scaling": 1.0,
        "normalize": True,
        "select_scope": "task_vectors",
        "weight_eps": 1e-6,
    }, False


_REASON = {
    "slerp": "mergekit's slerp angle and factors are float32 tensors, mergelab's float64",
    "karcher": "mergekit iterates with float32 tensors, mergelab with float64 scalars",
    "multislerp": "mergekit reduces with float32 tensors, mergelab with float64 scalars",
    "sce": "mergekit sums η in float32 and clamps its divisor at 1e-6, mergelab in float64; "
    "equal variances at the selection cut may be picked differently",
}
_ROUNDING = {
    "slerp": "slerp: not bit-identical: mergekit computes the norms, angle and factors as "
    "float32 tensors, mergelab in float64 (a few float32 ulps, see tests/peers)",
    "karcher": "karcher: not bit-identical: mergekit iterates with float32 tensors, mergelab "
    "with float64 scalars (a few float32 ulps, see tests/peers)",
    "multislerp": "multislerp: not bit-identical: mergekit reduces with float32 tensors, "
    "mergelab with float64 scalars and fused adds (a few float32 ulps, see tests/peers)",
    "sce": "sce: not bit-identical: mergekit sums η in float32, mergelab in float64, and "
    "mergekit clamps the η divisor at 1e-6 (a few float32 ulps, see tests/peers); where "
    "variances tie at the selection cut (common for bfloat16 checkpoints) mergekit's topk "
    "picks among them in its own order, mergelab by index, and the merges differ there",
}


def _f32(x: float) -> float:
    import struct

    return struct.unpack("f", struct.pack("f", x))[0]


def _check_tokenizer(raw: Mapping[str, Any], where: str) -> None:
    src = raw.get("tokenizer_source")
    base = raw.get("base_model")
    if src not in (None, "base") and not (isinstance(src, str) and src == base):
        raise MergekitConfigError(
            f"{where}: tokenizer_source: {src!r}: mergelab writes the base model's tokenizer "
            "and requires every model to share its vocabulary (no union or other model's "
            "vocabulary): drop tokenizer_source (or set it to base)"
        )
    tok = raw.get("tokenizer")
    if tok is not None:
        simple = (
            isinstance(tok, Mapping)
            and set(tok) <= {"source"}
            and tok.get("source")
            in (
                None,
                "base",
            )
        )
        if not simple:
            raise MergekitConfigError(
                f"{where}: tokenizer: {tok!r}: mergelab keeps the base model's tokenizer and "
                "adds no tokens: drop the tokenizer block"
            )
    if raw.get("chat_template"):
        raise MergekitConfigError(
            f"{where}: chat_template: mergelab copies the base model's tokenizer files "
            "unchanged: drop chat_template and set the template on the merged tokenizer "
            "afterwards (tokenizer.chat_template = ...; save_pretrained)"
        )


def _dtype(value: Any, who: str) -> str | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise MergekitConfigError(f"{who}: {value!r} must be one of {list(DTYPE_NAMES)}")
    return name


def _ref(value: Any, who: str) -> _Ref:
    """A mergekit model reference (``path`` or ``path@revision``); LoRA references and the
    mapping form (``override_architecture``) are refused."""
    if isinstance(value, Mapping):
        raise MergekitConfigError(
            f"{who}: {dict(value)!r}: give the model as a path or hub id string "
            "(override_architecture and mapping references are not supported)"
        )
    if not isinstance(value, str) or not value:
        raise MergekitConfigError(f"{who}: must be a model path or hub id, got {value!r}")
    if "+" in value:
        raise MergekitConfigError(
            f"{who}: {value!r} names a LoRA merged into a model (mergekit's model+lora): "
            "mergelab materialises LoRA experts itself and would not round like peft's "
            "merge_and_unload: merge the adapter into a checkpoint first, or use a mergelab "
            "pool with model.experts.NAME.adapter=LORA_DIR"
        )
    if value.count("@") > 1:
        raise MergekitConfigError(f"{who}: {value!r} has more than one @revision")
    path, _, rev = value.partition("@")
    return _Ref(path, rev or None)


def _model_ref(entry: Any, who: str) -> _Ref:
    if not isinstance(entry, Mapping) or "model" not in entry:
        raise MergekitConfigError(
            f"{who}: must be a mapping with model: PATH (and parameters:), got {entry!r}"
        )
    extra = sorted(set(entry) - {"model", "parameters"})
    if extra:
        raise MergekitConfigError(
            f"{who}: unknown key(s) {extra}: an entry holds model and parameters only"
        )
    if entry.get("parameters") is not None and not isinstance(entry["parameters"], Mapping):
        raise MergekitConfigError(f"{who}.parameters: must be a mapping of name: value")
    return _ref(entry["model"], f"{who}.model")


def _scalar(value: Any, key: str, who: str) -> Any:
    """A parameter value as mergekit would resolve it for every tensor: a scalar. Lists
    (gradients over layers) and filter mappings are refused."""
    if isinstance(value, (list, Mapping)):
        raise MergekitConfigError(
            f"{who}: {value!r} varies over layers or tensors (a gradient or filter list): "
            f"mergelab applies one {key} to every tensor: give a single number"
        )
    if key in BOOL_PARAMS:
        if not isinstance(value, bool):
            raise MergekitConfigError(f"{who}: {value!r} must be true or false")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MergekitConfigError(f"{who}: {value!r} must be a number")
    if key in INT_PARAMS and int(value) != value:
        raise MergekitConfigError(f"{who}: {value!r} must be an integer")
    if not math.isfinite(float(value)):
        raise MergekitConfigError(f"{who}: {value!r} must be finite")
    return value


def _check_parameter_names(
    spec: MethodSpec,
    method_name: str,
    global_params: Mapping[str, Any],
    per_model: Sequence[Mapping[str, Any]],
    where: str,
    notes: list[str],
    refs: Sequence[_Ref],
    base: _Ref | None,
) -> None:
    known = set(spec.shared) | set(spec.per_model)
    for key in global_params:
        if key not in known:
            raise MergekitConfigError(
                f"{where}: parameters.{key} is not a parameter of mergekit's {method_name} "
                f"(it has {sorted(known)}): remove or rename it"
            )
    for i, params in enumerate(per_model):
        for key in params:
            if key in spec.shared:
                raise MergekitConfigError(
                    f"{where}: models[{i}].parameters.{key}: mergekit reads {key} only from "
                    "the top-level parameters: (it ignores it here): move it there"
                )
            if key not in spec.per_model:
                raise MergekitConfigError(
                    f"{where}: models[{i}].parameters.{key} is not a per-model parameter of "
                    f"mergekit's {method_name} (it has {sorted(spec.per_model)}): remove or "
                    "rename it"
                )
        if params and base is not None and refs[i].text == base.text and not spec.base_is_input:
            if spec.base != "ignored":
                notes.append(
                    f"models[{i}].parameters ({sorted(params)}) on the base model: mergekit "
                    "ignores them (the base is the reference, not an input): ignored"
                )


def _member(ref: _Ref) -> dict[str, Any]:
    out: dict[str, Any] = {"path": ref.path}
    if ref.revision:
        out["revision"] = ref.revision
    return out


def _member_names(refs: Sequence[_Ref]) -> list[str]:
    """Expert names from the models' paths (last component, [A-Za-z0-9_-]), unique, never
    ``base``."""
    names: list[str] = []
    for r in refs:
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", r.path.rstrip("/").rsplit("/", 1)[-1]) or "model"
        if stem == "base":
            stem = "base_model"
        name, n = stem, 2
        while name in names:
            name, n = f"{stem}_{n}", n + 1
        names.append(name)
    return names


# ------------------------------------------------------------------- mergelab → mergekit


def mergekit_yaml(
    method_cfg: Mapping[str, Any],
    model_cfg: Mapping[str, Any],
    seed: int | None = None,
    paths: Mapping[str, str | Path] | None = None,
) -> str | None:
    """The mergekit 0.1.5 YAML of this mergelab merge, or ``None`` where mergekit has no
    merge computing the same function (e.g. TIES with ``trim_scope: global``, a ceil keep
    count, an unweighted vote with unequal weights, DARE/DELLA with mergelab's own masks or
    1/p rescale, a pool with ``exclude`` or LoRA experts, methods mergekit lacks).

    ``method_cfg`` / ``model_cfg``: the resolved ``method`` and ``model`` configs (a
    record's ``config.method`` and ``config.model``; the merged checkpoint's dtype is
    ``model_cfg["dtype"]``); ``seed``: the merge's seed (written in the
    comment for the random methods: ``mergekit-yaml --random-seed``); ``paths``: member
    name → the directory to write instead of the configured path (``pool.dirs``: needed
    for ``zoo:`` members, which mergekit cannot resolve). The YAML starts with comment
    lines saying whether the weights are expected bit-identical or to differ by float
    rounding, and why.
    """
    model = dict(model_cfg)
    if model.get("exclude") or any(
        (e or {}).get("adapter") for e in (model.get("experts") or {}).values()
    ):
        return None
    target = str(method_cfg.get("_target_", ""))
    opts = _with_defaults(target, method_cfg)
    if opts is None:
        return None
    experts = list((model.get("experts") or {}).keys())
    if not experts:
        return None
    paths = {k: str(v) for k, v in (paths or {}).items()}

    def where(member: str) -> str:
        if member in paths:
            return paths[member]
        m = model["base"] if member == "base" else model["experts"][member]
        text = str(m["path"])
        return f"{text}@{m['revision']}" if m.get("revision") else text

    reasons: list[str] = []
    built = _build_yaml(target.rsplit(".", 1)[-1], opts, experts, reasons)
    if built is None:
        return None
    merge_method, base_member, entries, params = built
    doc: dict[str, Any] = {"merge_method": merge_method}
    if base_member is not None:
        doc["base_model"] = where(base_member)
    doc["models"] = [{"model": where(m), **({"parameters": p} if p else {})} for m, p in entries]
    if params:
        doc["parameters"] = params
    doc["dtype"] = "float32"
    if model.get("dtype"):
        doc["out_dtype"] = str(model["dtype"])
    level = (
        "bit-identical weights expected"
        if not reasons
        else "the same merge, not bit-identical: " + "; ".join(reasons)
    )
    head = [
        "# mergekit 0.1.5 equivalent of this mergelab merge (harness/mergekit_config.py):",
        f"# {level}.",
    ]
    if merge_method in ("dare_ties", "dare_linear", "della", "della_linear"):
        shown = "<the mergelab seed>" if seed is None else str(seed)
        head.append(f"# Random masks: run mergekit-yaml with --random-seed {shown}.")
    if any(str(where(m)).startswith("zoo:") for m in ["base", *experts]):
        head.append("# zoo: members are mergelab's: replace them by their checkpoint directories.")
    if model.get("trust_remote_code"):
        head.append("# The pool trusts remote code: add --trust-remote-code.")
    body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
    return "\n".join(head) + "\n" + body


def _with_defaults(target: str, cfg: Mapping[str, Any]) -> dict[str, Any] | None:
    """``cfg``'s options over the class's own defaults (its signature); ``None`` for a
    target that cannot be imported or has nested pieces (``task_vector``)."""
    import importlib

    module, _, cls_name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), cls_name)
    except (ImportError, AttributeError, ValueError):
        return None
    out = {
        p.name: p.default
        for p in inspect.signature(cls).parameters.values()
        if p.default is not inspect.Parameter.empty
    }
    for k, v in cfg.items():
        if k == "_target_":
            continue
        if isinstance(v, Mapping) and "_target_" in v:
            return None
        out[k] = v
    return out


def _pow2(ws: Sequence[float]) -> bool:
    return all(w > 0 and math.frexp(w)[0] == 0.5 for w in ws)


def _build_yaml(
    cls: str, o: Mapping[str, Any], experts: list[str], reasons: list[str]
) -> tuple[str, str | None, list[tuple[str, dict[str, Any]]], dict[str, Any]] | None:
    """(merge_method, base member or None, [(member, per-model parameters)], global
    parameters) for one mergelab method's options, appending to ``reasons`` what keeps it
    from bit-identity; ``None`` where mergekit has no such merge."""
    if cls == "WeightAverage":
        ws = resolve_weights(o.get("weights"), experts)
        normalize = o.get("normalize", "before")
        if normalize == "before":
            reasons.append(
                "mergelab scales each model by w/Σw, mergekit divides the sum (rounding)"
            )
        entries = [(m, {"weight": w}) for m, w in zip(experts, ws, strict=True)]
        return "linear", None, entries, {"normalize": normalize != "none"}
    if cls == "ModelStock":
        return "model_stock", "base", [(m, {}) for m in experts], {}
    if cls == "SLERP":
        if o.get("models") is None and len(experts) != 2:
            return None
        a, b = o.get("models") or experts
        reasons.append(_REASON["slerp"])
        return "slerp", a, [(a, {}), (b, {})], {"t": float(o["t"])}
    if cls == "KarcherMerge":
        members = list(o.get("models") or experts)
        if o.get("variant") == "karcher":
            ws = resolve_weights(o.get("weights"), members)
            if len(set(ws)) > 1 or o.get("origin") != "zero":
                return None
            reasons.append(_REASON["karcher"])
            params = {"max_iter": int(o["max_iter"]), "tol": float(o["tol"])}
            return "karcher", None, [(m, {}) for m in members], params
        ws = resolve_weights(o.get("weights"), members)
        reasons.append(_REASON["multislerp"])
        entries = [(m, {"weight": w}) for m, w in zip(members, ws, strict=True)]
        return "multislerp", ("base" if o.get("origin") == "base" else None), entries, {}
    if cls == "SCE":
        if not (
            o.get("weight_eps") == 1e-6
            and o.get("normalize") is True
            and o.get("select_scope") == "task_vectors"
            and float(o.get("scaling", 1.0)) == 1.0
        ):
            return None
        reasons.append(_REASON["sce"])
        params = {"select_topk": float(o["select_topk"])}
        return "sce", "base", [(m, {}) for m in experts], params
    return _build_task_vector_yaml(cls, o, experts, reasons)


def _build_task_vector_yaml(
    cls: str, o: Mapping[str, Any], experts: list[str], reasons: list[str]
) -> tuple[str, str | None, list[tuple[str, dict[str, Any]]], dict[str, Any]] | None:
    """The generalized-task-arithmetic methods (TA, TIES, DARE, Breadcrumbs, DELLA)."""
    names = {
        "TaskArithmetic": "task_arithmetic",
        "TIES": "ties",
        "DARELinear": "dare_linear",
        "DARETies": "dare_ties",
    }
    if cls == "Breadcrumbs":
        method = "breadcrumbs_ties" if o.get("sign_election") else "breadcrumbs"
    elif cls == "DELLA":
        method = "della" if o.get("sign_election") else "della_linear"
    elif cls in names:
        method = names[cls]
    else:
        return None
    ws = resolve_weights(o.get("weights"), experts)
    election = method in ("ties", "dare_ties", "breadcrumbs_ties", "della")
    per_model: dict[str, Any] = {}
    params: dict[str, Any] = {"lambda": float(o.get("scaling", 1.0))}
    default_norm = election
    normalize = o.get("normalize")
    params["normalize"] = default_norm if normalize is None else bool(normalize)
    if o.get("weight_product", "fused") != "rounded" and not _pow2(ws):
        reasons.append("mergelab fuses w·τ into the sum, mergekit rounds it first (rounding)")
    if election:
        if o.get("sign_vote", "unweighted") != "weighted":
            if len(set(ws)) > 1:
                return None
            if not _pow2(ws):
                reasons.append("the unweighted vote sums unrounded τ (rounding)")
        if o.get("zero_sign", "zero") != "positive":
            reasons.append("mergekit elects + where the vote's sum is exactly 0 (zero sums)")
    if method.startswith(("dare", "della")):  # mergekit's masks and rescale, or none
        if o.get("mask_rng") != "mergekit" or o.get("rescale") not in ("l1", "none"):
            return None
        params["rescale"] = o["rescale"] == "l1"
    if method == "ties":
        if o.get("trim_scope") != "per_tensor" or o.get("keep_count") != "floor":
            return None
        if o.get("tie_break", "keep_all") != "argsort":
            reasons.append("mergelab keeps every |τ| tied at the trim threshold (ties)")
        per_model["density"] = float(o["density"])
        params["rescale"] = o.get("rescale", "none") == "l1"
    elif method.startswith("dare"):
        per_model["density"] = round(1.0 - float(o["drop_rate"]), 12)
    elif method.startswith("breadcrumbs"):
        if o.get("tie_break", "stable") != "sort":
            reasons.append("mergelab ranks equal |τ| by a stable sort (ties)")
        per_model |= {"density": float(o["density"]), "gamma": float(o["gamma"])}
        params["rescale"] = o.get("rescale", "none") == "l1"
    elif method.startswith("della"):
        d, e = float(o["density"]), float(o["epsilon"])
        if d < 1 and not (d - e > 0 and d + e < 1):
            return None
        per_model |= {"density": d, "epsilon": e}
    entries = [(m, {"weight": w, **per_model}) for m, w in zip(experts, ws, strict=True)]
    return method, "base", entries, params
