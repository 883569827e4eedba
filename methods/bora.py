"""BoRA (Eide & Frigessi 2024, arXiv 2407.15857): Bayesian hierarchical LoRA for
multi-task fine-tuning, as a training "merge" method.

Model. Task d ∈ 1..D has its own LoRA parameters θ_d (an ``A``, ``B`` pair per target
linear layer); prior θ_d ~ N(Θ, τ⁻¹ I) around a global Θ with a flat prior. BoRA is the
joint MAP over θ_1..θ_D and Θ:

    L(θ, Θ) = Σ_d N_d · NLL_d(θ_d) + (τ/2) Σ_d ‖θ_d − Θ‖²

where ``NLL_d`` is task d's mean next-token NLL (the loss of :mod:`core.train`: mean
over the real tokens of a batch) and ``N_d`` its number of training texts, so
``N_d · NLL_d`` is the task's whole-data log-likelihood in per-text units. τ = 0 gives D
independent LoRAs, τ → ∞ one shared LoRA; a task with more data (larger N_d) moves
further from Θ for the same τ, a small one borrows more from the others.

Variant chosen (the spec lists two): the **squared** penalty above, i.e. the MAP of the
Gaussian hierarchical model the paper states, not the official code's un-squared
per-tensor L2 norms (which are not the log-density of any Gaussian prior and make τ's
meaning depend on how the parameters are split into tensors). The data term keeps the
official code's weighting by task train size (the likelihood of N_d texts), which is what
makes ‖θ_d − Θ‖ depend on N_d. Task adapters all start from one initialisation Θ₀ (A
Kaiming-uniform as in peft, B = 0: the official code's "Θ + noise" without the noise,
which B = 0 makes unnecessary since tasks diverge through their data anyway).

Optimisation. Each task has its own Adam optimiser (lr warm-up over 3% of the steps, then
``schedule``: ``constant`` as :mod:`core.train`, or ``linear`` decay to 0; gradient-norm
clipping at 1.0 per task) and its own seeded batch stream, and works on task d's terms of
L divided by N_d, ``L_d / N_d = NLL_d(θ_d) + (τ / (2 N_d)) ‖θ_d − Θ‖²``: a positive
per-block rescaling, which leaves the stationary points of L unchanged (Adam is invariant
to it up to ε) and makes the τ = 0 run equal, step for step, to training each task alone
with the same seed. Θ has no optimiser: for fixed θ the flat-prior MAP is Θ = mean_d θ_d
exactly, so Θ is set to that mean after every step (block-coordinate descent on L). How
the prior term enters the θ_d step (``prior_update``):

- ``gradient`` (default; the official code's way): (τ/(2 N_d))‖θ_d − Θ‖² is added to the
  task's loss and Adam sees its gradient. Adam normalises each element's step to about
  ``lr``, so a stiff prior (τ/N_d ≫ |∇NLL_d| / ‖θ_d − Θ‖) keeps θ_d oscillating around Θ
  at an amplitude of order ``lr`` instead of pinning it (‖θ_d − Θ‖ falls with τ to a
  floor), and the prior's gradient then dominates Adam's second moment, so the NLL's
  share of each step shrinks: at very large τ learning slows down rather than turning
  into shared training (τ = 10⁴ ends worse than ``shared`` on the claims set).
- ``prox`` (exact): the Adam step uses NLL_d only, then the prior is applied by its
  proximal map in Adam's per-element metric P_d = lr / (√v̂ + ε), jointly for θ and Θ, in
  closed form (:func:`prior_prox`). Its fixed points are still the MAP's; any τ is stable
  and τ → ∞ ties every θ_d to Θ exactly, which then follows the N_d-weighted average of
  the tasks' steps (the pooled objective, as the MAP's τ → ∞ limit should) — so within a
  finite budget a small task's own directions barely move at large τ.

Measured on the claims test's tiny multi-task set (tests/e2e/test_bora_claims.py: 4 tasks
of 8 … 216 texts, mean over tasks of the per-task test perplexity, mean of 3 seeds),
``gradient``, constant lr: τ = 0 → 6.26, 1 → 4.68, 10 → 3.43, 100 → 2.84, 10³ → 3.73,
10⁴ → 6.36, ``shared`` 5.26 (the paper: 16.80, 16.59, 12.85, 12.82, 13.26, 13.91).
``prox`` (seed 0 alone): 4.41, 3.32, 2.83, 6.15, 14.8, 10.6, ``shared`` 4.64 — the same
best value as ``gradient`` on seed 0 (2.82, at τ = 100) a decade earlier, and a steeper
right arm: at large τ the smallest task's own directions stay frozen at Θ (its perplexity
48 at τ = 10³ against 8.5 shared). ``gradient`` is the default (the official code's
optimisation, a smoother τ curve); ``prox`` gives the exact tie to Θ. With ``schedule:
linear`` (``gradient``, seed 0) τ = 0 is much better (3.51 against 4.41) and the gain
shrinks (best 3.20 at τ = 10; ``shared`` 4.17): under a constant lr part of BoRA's gain is
the prior averaging out each task's end-of-run optimiser noise.

``tau: shared`` (the τ → ∞ limit, trained directly): one adapter minimising
Σ_d (N_d/N) NLL_d, the pooled-data likelihood, on the same per-task batches.

Batching: ``batch_size`` texts **per task per step**, drawn with replacement from a
generator seeded by (seed, task name). Equal batches keep each task's data stream
independent of the other tasks (needed for τ = 0 ≡ independent training); the data-size
weighting lives in the objective (N_d), not in the sampling. Texts are tokenised once
(with the tokenizer's special tokens, cut to ``max_length`` tokens) and right-padded by
hand, so position ids stay right for any tokenizer padding side.

Forward pass: **one** base model from ``ctx.build_model("base")``, cast to float32,
frozen and in eval mode (no dropout, so training is deterministic); each task's forward
runs ``torch.func.functional_call`` with W + s·B A (s = alpha / r) in place of every target
weight, so no model is rebuilt per step. ``target_modules`` names linear layers by
suffix, as peft does (``q_proj`` matches ``model.layers.0.self_attn.q_proj``).

Scale of τ. Per element, θ_d feels ∇NLL_d + (τ/N_d)(θ_d − Θ): where τ starts to matter
depends on the tasks' sizes N_d and on the per-element size of the NLL gradient and of the
adapters' drift, i.e. on the model, the data and the budget; the penalty sums over all
LoRA elements, so their count alone does not rescale τ. The paper's grid (0 … 10⁴,
OPT-350m, best 100) is a starting point, not a transferable scale: the tiny claims set
also has its minimum at τ = 100, the xs zoo with the default tasks (N_d = 100 … 2000)
near τ = 1 (mean test perplexity 2.396 at τ = 0, 2.363 at 1, 2.403 at 10, 2.582 at 10³,
2.606 shared; seed 0), hence ``conf/experiment/bora_zoo.yaml``'s denser low grid.

Caching: the joint training (all D adapters, Θ, per-task distances, losses, cost) is
stored under ``ctx.cache_dir`` by a hash of everything that decides it — τ, the tasks'
specs *and the texts they gave*, the hyperparameters, the resolved target modules, the
seed and fingerprints of the base weights and tokenizer — and not of ``task``, so a
sweep ``method.task=a,b,c,d`` trains once per τ (through
:func:`core.train.cached_training`: a file lock keeps two processes from training the
same recipe at once). An interrupted training resumes from its last checkpoint when
``checkpoint_every`` > 0, else is redone; a finished one is never redone. Without a
``cache_dir`` every fit trains.

The emitted model is θ0 + s·B_d A_d for the chosen ``task`` (every other tensor is the
base's): :func:`lora_merge`, a pure function, in ``merge_tensor``.

Pool members: BoRA trains from the base alone (``uses_experts = False``: the pool may
have no experts, and experts it has are not read). Every trained adapter is also written
into the training's cache entry as a PEFT LoRA directory (``members/<task>``, listed in
``report()["members"]``), so the D task models are pool members for any later merge:
``model.experts.<task>.adapter=<dir>``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.checkpoint import read_checkpoint, write_checkpoint
from core.fingerprints import texts_fingerprint, tokenizer_fingerprint, weights_fingerprint
from core.lm import pad_id_of, right_pad
from core.options import check_choice, check_finite, check_int
from core.train import (
    DEFAULT_LORA_TARGETS,
    SCHEDULES,
    cached_training,
    lr_lambda,
    read_stats,
)
from methods.base import FitContext, MergeMethod

SHARED = "shared"
CODE_VERSION = "1"  # bump when training changes in a way the cache key does not see
DEFAULT_TASKS: dict[str, dict[str, Any]] = {
    # suite categories with unequal train sizes (the paper's speakers range widely too)
    "knowledge": {"suite": "knowledge", "n": 100},
    "math": {"suite": "math", "n": 300},
    "code": {"suite": "code", "n": 1000},
    "safety": {"suite": "safety", "n": 2000},
}
_SOURCES = ("suite", "jsonl", "hf")
PRIOR_UPDATES = ("prox", "gradient")
_WARMUP = 0.03


# --------------------------------------------------------------------- pure functions


def lora_delta(lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """ΔW = s · B A for ``lora_a`` [r, in], ``lora_b`` [out, r]."""
    return scaling * (lora_b @ lora_a)


def lora_merge(base: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float) -> Tensor:
    """W0 + s · B A (in ``base``'s dtype and device)."""
    delta = lora_delta(
        lora_a.to(base.device, torch.float32), lora_b.to(base.device, torch.float32), scaling
    )
    return (base.float() + delta).to(base.dtype)


def sq_distance(theta: Mapping[str, Tensor], theta_global: Mapping[str, Tensor]) -> Tensor:
    """‖θ − Θ‖² summed over every adapter tensor."""
    return sum(((theta[k] - theta_global[k]) ** 2).sum() for k in theta_global)  # type: ignore[return-value]


def penalty(
    thetas: Mapping[str, Mapping[str, Tensor]], theta_global: Mapping[str, Tensor], tau: float
) -> Tensor:
    """The prior term (τ/2) Σ_d ‖θ_d − Θ‖²."""
    return 0.5 * tau * sum(sq_distance(t, theta_global) for t in thetas.values())  # type: ignore[return-value]


def global_mean(thetas: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """argmin_Θ Σ_d ‖θ_d − Θ‖² = the elementwise mean of the task adapters."""
    first = next(iter(thetas.values()))
    return {k: torch.stack([t[k].detach() for t in thetas.values()]).mean(0) for k in first}


def distances(
    thetas: Mapping[str, Mapping[str, Tensor]], theta_global: Mapping[str, Tensor]
) -> dict[str, float]:
    """‖θ_d − Θ‖ for every task."""
    return {d: math.sqrt(float(sq_distance(t, theta_global))) for d, t in thetas.items()}


def adam_step_sizes(
    opt: torch.optim.Adam, params: Mapping[str, Tensor], lr: float
) -> dict[str, Tensor]:
    """Per-element step size P = lr / (√v̂ + ε) of the Adam step just taken (torch's Adam:
    the update is −P ⊙ m̂), i.e. the metric the proximal prior step uses."""
    group = opt.param_groups[0]
    beta2, eps = group["betas"][1], group["eps"]
    out = {}
    for k, p in params.items():
        state = opt.state[p]
        t = float(state["step"])
        v_hat = state["exp_avg_sq"] / (1 - beta2**t)
        out[k] = lr / (v_hat.sqrt() + eps)
    return out


def prior_prox(
    ys: Mapping[str, Mapping[str, Tensor]],
    metric: Mapping[str, Mapping[str, Tensor]],
    tau: float,
    sizes: Mapping[str, int],
) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
    """The prior term applied exactly after a data step: ``(θ, Θ)`` minimising, elementwise,
    Σ_d [N_d (θ_d − y_d)² / (2 P_d) + (τ/2)(θ_d − Θ)²] (the MAP penalty plus a proximity
    term in task d's step metric N_d / P_d). Closed form, with c_d = P_d τ / N_d:
    Θ = Σ_d y_d/(1+c_d) / Σ_d 1/(1+c_d) and θ_d = (y_d + c_d Θ) / (1 + c_d); then
    Σ_d (θ_d − Θ) = 0, i.e. Θ is the mean of the θ_d (the flat-prior MAP)."""
    names = list(ys)
    keys = list(ys[names[0]])
    thetas: dict[str, dict[str, Tensor]] = {d: {} for d in names}
    theta_global: dict[str, Tensor] = {}
    for k in keys:
        c = {d: metric[d][k] * (tau / sizes[d]) for d in names}
        w = {d: 1.0 / (1.0 + c[d]) for d in names}
        total = sum(w.values())
        theta_global[k] = sum(ys[d][k] * w[d] for d in names) / total  # type: ignore[operator]
        for d in names:
            thetas[d][k] = (ys[d][k] + c[d] * theta_global[k]) * w[d]
    return thetas, theta_global


def find_target_modules(model: torch.nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the linear layers whose name equals a target or ends with ``.target``."""
    out = []
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(
                f"method.target_modules matches {name!r}, a {type(module).__name__}; BoRA "
                "adapts torch.nn.Linear layers only"
            )
        out.append(name)
    if not out:
        linear = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear)
            }
        )
        raise ValueError(
            f"method.target_modules {list(targets)} match no linear layer; this model's "
            f"linear layers are {linear}"
        )
    return out


def init_adapter(
    model: torch.nn.Module, modules: Sequence[str], r: int, seed: int
) -> dict[str, Tensor]:
    """Θ₀: A ~ U(−1/√in, 1/√in) (peft's Kaiming-uniform, a = √5), B = 0, float32 on CPU."""
    gen = torch.Generator().manual_seed(seed)
    by_name = dict(model.named_modules())
    out: dict[str, Tensor] = {}
    for m in modules:
        out_f, in_f = by_name[m].weight.shape
        bound = 1.0 / math.sqrt(in_f)
        out[f"{m}.lora_A"] = (torch.rand(r, in_f, generator=gen) * 2 - 1) * bound
        out[f"{m}.lora_B"] = torch.zeros(out_f, r)
    return out


def adapted_weights(
    weights: Mapping[str, Tensor], adapter: Mapping[str, Tensor], scaling: float
) -> dict[str, Tensor]:
    """{``<module>.weight``: W + s·B A} for ``functional_call`` (differentiable in A, B)."""
    return {
        f"{m}.weight": w + lora_delta(adapter[f"{m}.lora_A"], adapter[f"{m}.lora_B"], scaling)
        for m, w in weights.items()
    }


def token_nll(logits: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean next-token NLL over the real (non-padding) target tokens of a batch."""
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100
    )


def task_seed(seed: int, task: str) -> int:
    """A per-task generator seed from (seed, task name), independent of the other tasks."""
    return int.from_bytes(hashlib.sha256(f"bora:{seed}:{task}".encode()).digest()[:7], "big")


def encode(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text (with special tokens), cut to ``max_length``."""
    out = []
    for t in texts:
        ids = list(tokenizer(t, truncation=True, max_length=max_length)["input_ids"])
        if len(ids) < 2:
            raise ValueError(f"text {t[:40]!r} gives fewer than 2 tokens; nothing to predict")
        out.append(ids)
    return out


# ------------------------------------------------------------------------- training

CHECKPOINT_FILE = "bora_checkpoint.json"  # the record; see core.checkpoint


@dataclass
class BoraFit:
    """A joint training's result: every task adapter, Θ and the training facts."""

    adapters: dict[str, dict[str, Tensor]]  # task (or "shared") → {<module>.lora_A/B: tensor}
    theta_global: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


def train_bora(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Mapping[str, Sequence[str]],
    *,
    tau: float | str,
    modules: Sequence[str],
    r: int = 8,
    alpha: float = 16,
    steps: int = 300,
    lr: float = 2e-3,
    batch_size: int = 16,
    max_length: int = 64,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log: Callable[[dict[str, float], int], None] | None = None,
    progress: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    prior_update: str = "gradient",
    schedule: str = "constant",
) -> BoraFit:
    """Jointly train the D task adapters and Θ (see the module docstring); ``model`` is
    frozen, cast to float32 and left in eval mode, its weights unchanged.

    With ``checkpoint_dir`` and ``checkpoint_every > 0`` the whole state (adapters, Θ,
    optimisers, schedules, batch generators, losses) is saved atomically every
    ``checkpoint_every`` steps as safetensors plus a JSON record (:mod:`core.checkpoint`,
    never unpickled), and a checkpoint found there is resumed from: the result equals an
    uninterrupted run's, bit for bit.
    """
    from tqdm.auto import tqdm

    if prior_update not in PRIOR_UPDATES:
        raise ValueError(f"prior_update must be one of {list(PRIOR_UPDATES)}, got {prior_update!r}")
    names = list(texts)
    sizes = {d: len(texts[d]) for d in names}
    if not names or min(sizes.values()) == 0:
        raise ValueError(f"BoRA needs at least one task and texts for each, got sizes {sizes}")
    total = sum(sizes.values())
    shared = tau == SHARED
    tau_f = 0.0 if shared else float(tau)
    scaling = alpha / r
    model.to(device).float().eval().requires_grad_(False)
    by_name = dict(model.named_modules())
    weights = {m: by_name[m].weight.detach() for m in modules}
    pad = pad_id_of(tokenizer)
    encoded = {d: encode(tokenizer, texts[d], max_length) for d in names}
    theta0 = init_adapter(model, modules, r, seed)

    owners = [SHARED] if shared else names
    params = {
        o: {k: v.clone().to(device).requires_grad_(True) for k, v in theta0.items()} for o in owners
    }
    opts = {o: torch.optim.Adam(list(params[o].values()), lr=lr, foreach=False) for o in owners}
    scheds = {
        o: torch.optim.lr_scheduler.LambdaLR(opts[o], lr_lambda(steps, _WARMUP, schedule))
        for o in owners
    }
    gens = {d: torch.Generator().manual_seed(task_seed(seed, d)) for d in names}
    theta_global = {k: v.detach().clone().to(device) for k, v in theta0.items()}

    def nll(d: str, adapter: Mapping[str, Tensor]) -> tuple[Tensor, int]:
        idx = torch.randint(sizes[d], (batch_size,), generator=gens[d]).tolist()
        ids, mask = right_pad([encoded[d][i] for i in idx], pad, device)
        out = torch.func.functional_call(
            model,
            adapted_weights(weights, adapter, scaling),
            args=(),
            kwargs={"input_ids": ids, "attention_mask": mask},
        )
        return token_nll(out.logits, ids, mask), int(mask.sum())

    run_id = {
        "tau": tau,
        "sizes": sizes,
        "steps": steps,
        "lr": lr,
        "batch": batch_size,
        "seed": seed,
        "prior_update": prior_update,
        "schedule": schedule,
    }
    ckpt = None
    if checkpoint_dir is not None and checkpoint_every > 0:
        ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE
    losses: dict[str, list[float]] = {d: [] for d in names}
    penalties: list[float] = []
    tokens, start_step, prior_seconds = 0, 0, 0.0
    state = read_checkpoint(ckpt) if ckpt is not None else None
    if state is not None:
        if state["run"] != run_id:
            raise ValueError(
                f"checkpoint {ckpt} belongs to another run ({state['run']}); delete it"
            )
        with torch.no_grad():
            for o in owners:
                for k, v in params[o].items():
                    v.copy_(state["params"][o][k])
        for o in owners:
            opts[o].load_state_dict(state["opts"][o])
            scheds[o].load_state_dict(state["scheds"][o])
        for d in names:
            gens[d].set_state(state["gens"][d])
        theta_global = {k: v.to(device) for k, v in state["theta_global"].items()}
        losses, penalties = state["losses"], state["penalties"]
        tokens, start_step, prior_seconds = state["tokens"], state["step"], state["seconds"]

    start = time.perf_counter()
    bar = tqdm(range(start_step, steps), desc=f"bora tau={tau}", disable=not progress, leave=False)
    for step in bar:
        if shared:
            total_loss: Tensor | float = 0.0
            for d in names:
                loss, n_tok = nll(d, params[SHARED])
                total_loss = total_loss + (sizes[d] / total) * loss
                losses[d].append(float(loss.detach()))
                tokens += n_tok
            total_loss.backward()  # type: ignore[union-attr]
        else:
            for d in names:
                loss, n_tok = nll(d, params[d])
                obj = loss
                if tau_f > 0 and prior_update == "gradient":
                    obj = obj + (tau_f / (2 * sizes[d])) * sq_distance(params[d], theta_global)
                obj.backward()
                losses[d].append(float(loss.detach()))
                tokens += n_tok
        lrs = {}
        for o in owners:
            torch.nn.utils.clip_grad_norm_(list(params[o].values()), 1.0)
            lrs[o] = opts[o].param_groups[0]["lr"]
            opts[o].step()
            scheds[o].step()
            opts[o].zero_grad(set_to_none=True)
        with torch.no_grad():
            if tau_f > 0 and prior_update == "prox":
                metric = {d: adam_step_sizes(opts[d], params[d], lrs[d]) for d in names}
                thetas, _ = prior_prox(params, metric, tau_f, sizes)
                for d in names:
                    for k, v in params[d].items():
                        v.copy_(thetas[d][k])
            theta_global = global_mean(params)
            pen = 0.0 if shared else float(penalty(params, theta_global, tau_f))
        penalties.append(pen)
        if log is not None:
            _safe_log(
                log,
                {**{f"bora/loss/{d}": losses[d][-1] for d in names}, "bora/penalty": pen},
                step + 1,
            )
        if ckpt is not None and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            state = {
                "run": run_id,
                "step": step + 1,
                "params": {
                    o: {k: v.detach().cpu().clone() for k, v in p.items()}
                    for o, p in params.items()
                },
                "opts": {o: opts[o].state_dict() for o in owners},
                "scheds": {o: scheds[o].state_dict() for o in owners},
                "gens": {d: gens[d].get_state() for d in names},
                "theta_global": {k: v.cpu() for k, v in theta_global.items()},
                "losses": losses,
                "penalties": penalties,
                "tokens": tokens,
                "seconds": prior_seconds + time.perf_counter() - start,
            }
            write_checkpoint(ckpt, state)

    adapters = {o: {k: v.detach().cpu() for k, v in p.items()} for o, p in params.items()}
    theta_global = {k: v.cpu() for k, v in theta_global.items()}
    tail = max(1, steps // 10)
    dist = {d: 0.0 for d in names} if shared else distances(adapters, theta_global)
    meta = {
        "tau": tau if shared else tau_f,
        "tasks": names,
        "n_train": sizes,
        "distance": dist,
        "loss_first": {d: losses[d][0] for d in names},
        "loss_final": {d: sum(losses[d][-tail:]) / tail for d in names},
        "penalty_final": penalties[-1],
        "steps": steps,
        "tokens": tokens,
        "seconds": round(prior_seconds + time.perf_counter() - start, 3),
        "resumed_from": start_step,
        "modules": list(modules),
        "n_lora_params": sum(v.numel() for v in theta0.values()),
    }
    return BoraFit(adapters, theta_global, meta)


def _safe_log(log: Callable[[dict[str, float], int], None], metrics: dict, step: int) -> None:
    try:
        log(metrics, step)
    except Exception as exc:  # a logging failure must never stop training
        warnings.warn(f"BoRA log callback failed at step {step}: {exc!r}", stacklevel=2)


# ---------------------------------------------------------------------------- cache


ADAPTERS_FILE = "adapters.safetensors"


def save_fit(fit: BoraFit, out: str | os.PathLike) -> None:
    """Adapters and Θ as one safetensors file (``<owner>/<tensor>``, owner ``global`` = Θ)."""
    from safetensors.torch import save_file

    tensors = {f"{o}/{k}": v.contiguous() for o, a in fit.adapters.items() for k, v in a.items()}
    tensors.update({f"global/{k}": v.contiguous() for k, v in fit.theta_global.items()})
    save_file(tensors, str(Path(out) / ADAPTERS_FILE))


def load_fit(out: str | os.PathLike, meta: Mapping[str, Any]) -> BoraFit:
    from safetensors.torch import load_file

    adapters: dict[str, dict[str, Tensor]] = {}
    theta_global: dict[str, Tensor] = {}
    for key, v in load_file(str(Path(out) / ADAPTERS_FILE)).items():
        owner, _, k = key.partition("/")
        if owner == "global":
            theta_global[k] = v
        else:
            adapters.setdefault(owner, {})[k] = v
    return BoraFit(adapters, theta_global, dict(meta))


MEMBERS_DIR = "members"


def write_members(
    fit: BoraFit, out: str | os.PathLike, r: int, alpha: float, base: str | None = None
) -> dict[str, str]:
    """Each trained adapter as a PEFT LoRA directory ``<out>/members/<owner>``
    (``adapter_config.json`` + ``adapter_model.safetensors``, keys
    ``base_model.model.<module>.lora_A.weight``), so that a pool can list it as an expert
    (``model.experts.<name>.adapter=<dir>``); the pool's LoRA source then gives the weights
    this method emits for that task, bit for bit. Written once, atomically (a temporary
    directory renamed into place); an existing directory is kept. Returns {owner: dir}."""
    from safetensors.torch import save_file

    root = Path(out) / MEMBERS_DIR
    paths = {}
    for owner, adapter in fit.adapters.items():
        final = root / owner
        paths[owner] = str(final)
        if (final / "adapter_model.safetensors").is_file():
            continue
        tmp = root / f".{owner}.{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        modules = list(fit.meta["modules"])
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "r": r,
            "lora_alpha": alpha,
            "lora_dropout": 0.0,
            "bias": "none",
            "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        }
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        tensors = {
            f"base_model.model.{m}.lora_{x}.weight": adapter[f"{m}.lora_{x}"].contiguous()
            for m in modules
            for x in ("A", "B")
        }
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        try:
            os.replace(tmp, final)
        except OSError:  # another process wrote it first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    return paths


def cached_fit(
    cache_dir: str | os.PathLike | None,
    recipe: Mapping[str, Any],
    train_fn: Callable[[Path | None], BoraFit],
) -> tuple[BoraFit, bool, str | None]:
    """``(fit, cache_hit, directory)`` through :func:`core.train.cached_training`:
    ``train_fn(checkpoint_dir)`` runs only when ``recipe`` has no finished training in
    ``cache_dir`` (an interrupted one resumes from its checkpoints). Without a
    ``cache_dir`` it simply trains."""
    if cache_dir is None:
        return train_fn(None), False, None
    trained: list[BoraFit] = []

    def run(out_dir: Path, checkpoint_dir: Path) -> dict[str, Any]:
        fit = train_fn(checkpoint_dir)
        save_fit(fit, out_dir)
        trained.append(fit)
        return fit.meta

    out = cached_training(cache_dir, recipe, run)
    if trained:
        return trained[0], False, str(out)
    return load_fit(out, read_stats(out)), True, str(out)


# --------------------------------------------------------------------------- plugin


def check_tau(tau: Any) -> float | str:
    """τ as a float ≥ 0, or ``"shared"`` (the τ → ∞ limit trained as one adapter)."""
    if tau == SHARED:
        return SHARED
    if isinstance(tau, bool) or isinstance(tau, str):
        raise ValueError(f"method.tau must be a number >= 0 or 'shared', got {tau!r}")
    v = check_finite(tau, "method.tau")
    if v < 0:
        raise ValueError(f"method.tau must be >= 0 (or 'shared'), got {tau!r}")
    return v


def check_tasks(tasks: Any) -> dict[str, dict[str, Any]]:
    """``{task name: data spec}`` as plain dicts (specs as :mod:`harness.data` reads them)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(tasks, DictConfig):
            tasks = OmegaConf.to_container(tasks, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if not isinstance(tasks, Mapping) or not tasks:
        raise ValueError(
            f"method.tasks must be a non-empty mapping task name → data spec, got {tasks!r}"
        )
    out = {}
    for name, spec in tasks.items():
        if not isinstance(name, str) or not name or "/" in name or name in ("global", SHARED):
            raise ValueError(f"method.tasks: bad task name {name!r}")
        if not isinstance(spec, Mapping) or sum(k in spec for k in _SOURCES) != 1:
            raise ValueError(
                f"method.tasks.{name} must be a data spec with exactly one of {list(_SOURCES)} "
                f"(e.g. {{suite: math, n: 300}} or {{jsonl: path}}), got {spec!r}"
            )
        out[name] = dict(spec)
    return out


class BoRA(MergeMethod):
    """BoRA plugin (see the module docstring for the objective and every choice).

    Options: ``tau`` (float ≥ 0 or ``"shared"``), ``tasks`` (task name → data spec,
    default :data:`DEFAULT_TASKS`), ``task`` (whose adapter this cell emits; default the
    first of ``tasks``), ``r`` (8), ``alpha`` (16), ``target_modules`` (linear-layer name
    suffixes, default the Llama projections), ``steps`` (300), ``lr`` (2e-3),
    ``batch_size`` (16 texts per task per step), ``max_length`` (64 tokens), ``seed``
    (null = the run's seed), ``prior_update`` (``gradient`` or ``prox``),
    ``schedule`` (``linear`` decay after warm-up, or ``constant``),
    ``checkpoint_every`` (0 = off; else save the training state
    every N steps in the cache's partial directory, and resume an interrupted training).

    ``report()``: ``tau``, ``task``, per task ``n_train``, ``distance`` (‖θ_d − Θ‖),
    ``loss_first`` / ``loss_final`` (mean token NLL, last 10% of steps), the final
    ``penalty``, cost (``steps``, ``tokens``, ``seconds``), ``n_lora_params``, the target
    modules, ``cache`` (hit, directory) and ``members`` (task → the trained adapter as a
    PEFT directory, :func:`write_members`: a pool member for later merges).
    """

    name = "bora"
    needs_data = True
    needs_calibration = False  # trains on its own data specs, scored on any tasks
    uses_experts = False  # trains its adapters from the base; the pool may have no experts

    def __init__(
        self,
        tau: float | str = 100.0,
        tasks: Mapping[str, Mapping[str, Any]] | None = None,
        task: str | None = None,
        r: int = 8,
        alpha: float = 16,
        target_modules: Sequence[str] | None = DEFAULT_LORA_TARGETS,
        steps: int = 300,
        lr: float = 2e-3,
        batch_size: int = 16,
        max_length: int = 64,
        seed: int | None = None,
        prior_update: str = "gradient",
        schedule: str = "constant",
        checkpoint_every: int = 0,
    ) -> None:
        self.tau = check_tau(tau)
        self.tasks = check_tasks(DEFAULT_TASKS if tasks is None else tasks)
        if task is None:
            task = next(iter(self.tasks))
        if task not in self.tasks:
            raise ValueError(f"method.task must be one of {list(self.tasks)}, got {task!r}")
        self.task = task
        self.r = check_int(r, "method.r", minimum=1)
        self.alpha = check_finite(alpha, "method.alpha")
        if self.alpha <= 0:
            raise ValueError(f"method.alpha must be > 0, got {alpha!r}")
        if target_modules is None or isinstance(target_modules, str):
            target_modules = [target_modules] if isinstance(target_modules, str) else []
        self.target_modules = [str(t) for t in target_modules]
        if not self.target_modules or not all(self.target_modules):
            raise ValueError(
                f"method.target_modules must name linear layers, got {target_modules!r}"
            )
        self.steps = check_int(steps, "method.steps", minimum=1)
        self.lr = check_finite(lr, "method.lr")
        if self.lr <= 0:
            raise ValueError(f"method.lr must be > 0, got {lr!r}")
        self.batch_size = check_int(batch_size, "method.batch_size", minimum=1)
        self.max_length = check_int(max_length, "method.max_length", 2)
        if seed is not None:
            check_int(seed, "method.seed", 0)
        self.option_seed = seed
        self.prior_update = check_choice(prior_update, "method.prior_update", PRIOR_UPDATES)
        self.schedule = check_choice(schedule, "method.schedule", SCHEDULES)
        self.checkpoint_every = check_int(checkpoint_every, "method.checkpoint_every", 0)
        self._fit: BoraFit | None = None
        self._targets: dict[str, tuple[Tensor, Tensor]] = {}
        self._cache: dict[str, Any] = {}
        self._members: dict[str, str] = {}

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def fit(self, ctx: FitContext) -> None:
        load = ctx.load_texts
        if load is None:
            raise ValueError(
                f"{type(self).__name__} trains on texts: its FitContext needs load_texts "
                "(the runner passes harness.data.load_texts)"
            )
        texts = {d: list(load(spec)) for d, spec in self.tasks.items()}
        seed = ctx.seed if self.option_seed is None else self.option_seed
        model = ctx.build_model("base")
        modules = find_target_modules(model, self.target_modules)
        missing = [f"{m}.weight" for m in modules if f"{m}.weight" not in ctx.tensor_names]
        if missing:
            raise ValueError(
                f"BoRA adapts {missing[:4]} but the pool does not merge them (model.exclude?)"
            )
        recipe = {
            "method": "bora",
            "code_version": CODE_VERSION,
            "tau": self.tau,
            "tasks": {
                d: {"spec": s, "n": len(texts[d]), "sha256": texts_fingerprint(texts[d])}
                for d, s in self.tasks.items()
            },
            "r": self.r,
            "alpha": self.alpha,
            "modules": modules,
            "steps": self.steps,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            "seed": seed,
            "prior_update": self.prior_update,
            "schedule": self.schedule,
            "base": weights_fingerprint(model),
            "tokenizer": tokenizer_fingerprint(ctx.tokenizer),
        }

        def train(checkpoint_dir: Path | None) -> BoraFit:
            return train_bora(
                model,
                ctx.tokenizer,
                texts,
                tau=self.tau,
                modules=modules,
                r=self.r,
                alpha=self.alpha,
                steps=self.steps,
                lr=self.lr,
                batch_size=self.batch_size,
                max_length=self.max_length,
                seed=seed,
                device=ctx.device,
                log=ctx.log,
                checkpoint_dir=checkpoint_dir,
                checkpoint_every=self.checkpoint_every,
                prior_update=self.prior_update,
                schedule=self.schedule,
            )

        fit, hit, where = cached_fit(ctx.cache_dir, recipe, train)
        self.use_fit(fit)
        self._cache = {"hit": hit, "dir": where}
        self._members = {} if where is None else write_members(fit, where, self.r, self.alpha)

    def use_fit(self, fit: BoraFit) -> None:
        """Emit ``self.task``'s adapter (the shared one for ``tau: shared``) from ``fit``."""
        owner = SHARED if SHARED in fit.adapters else self.task
        adapter = fit.adapters[owner]
        self._fit = fit
        self._targets = {
            f"{m}.weight": (adapter[f"{m}.lora_A"], adapter[f"{m}.lora_B"])
            for m in fit.meta["modules"]
        }

    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        if self._fit is None:
            raise RuntimeError("BoRA.merge_tensor called before fit")
        if name not in self._targets:
            return base
        lora_a, lora_b = self._targets[name]
        return lora_merge(base, lora_a, lora_b, self.scaling)

    def report(self) -> dict[str, Any]:
        if self._fit is None:
            return {"tau": self.tau, "task": self.task}
        m = self._fit.meta
        return {
            "tau": self.tau,
            "task": self.task,
            "objective": "squared",
            "prior_update": self.prior_update,
            "tasks": {
                d: {
                    "n_train": m["n_train"][d],
                    "distance": m["distance"][d],
                    "loss_first": m["loss_first"][d],
                    "loss_final": m["loss_final"][d],
                }
                for d in m["tasks"]
            },
            "penalty_final": m["penalty_final"],
            "steps": m["steps"],
            "tokens": m["tokens"],
            "seconds": m["seconds"],
            "n_lora_params": m["n_lora_params"],
            "r": self.r,
            "alpha": self.alpha,
            "target_modules": m["modules"],
            "cache": self._cache,
            "members": self._members,
        }
