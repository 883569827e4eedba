"""Sens-Merging (Liu et al. 2025): sensitivity-guided per-layer, per-model coefficients,
plugged in front of task arithmetic, TIES or DARE.

The paper body was not available; this implements the project spec's intended form.

**Layers.** Tensors are grouped by name: a transformer block ``layers.<i>.`` (also
``h.<i>.`` / ``blocks.<i>.``) is group ``layers.<i>``; embeddings (``embed``, ``wte``,
``wpe``, ``word_embeddings``) are ``embed``; the output head (``lm_head``, ``embed_out``)
is ``head``; everything else (e.g. the final norm) is one group ``other``.

**Task-specific scaling α.** For expert k, with L_k its LM loss on its own calibration
prompts (the prompts are unlabelled, so L_k is the next-token cross-entropy over the
prompt's own tokens, averaged over its positions), the first-order Taylor sensitivity of
layer l is s_k^l = mean over prompts x of Σ_{p ∈ l} |θ_p · ∂L_k(x)/∂θ_p|, θ being expert
k's own weights; one backward pass per prompt (per-sample gradients: the absolute value
is taken per sample, as the spec's "mean over samples" says). Only mergeable tensors
count. α_k^l = s_k^l / Σ_l s_k^l sums to 1 over the layers of model k (1/L each if all 0).

**Cross-task scaling β.** For each pair k ≠ j, expert k's next-token logits are compared
with expert j's on expert j's calibration prompts, at every real prompt position
(``alignment``): ``kl`` (default) = mean KL(p_j ‖ p_k) — invariant to the per-position
logit shift that softmax ignores, unlike raw-logit distances —, ``l2`` = mean ‖z_k − z_j‖₂,
``cosine`` = mean cos(z_k, z_j). a_k = mean over j ≠ k. Closer ⇒ larger weight:
w_k = 1 / (a_k + 1e-12) for ``kl`` / ``l2``, w_k = (1 + a_k) / 2 for ``cosine``;
β_k = w_k / Σ_j w_j sums to 1 over models (β = [1] for a single expert).

**Combination.** σ_k^l = softmax_k(α_k^l · β_k / T), T = ``temperature``; σ sums to 1
over experts in every layer. Each expert's task vector is rescaled per layer,
τ'_k^l = K · σ_k^l · τ_k^l (equal σ = 1/K leaves it unchanged), and the base method runs
on the experts θ0 + τ'_k instead of θ_k; for TA this gives θ0 + λ K Σ_k σ_k^l τ_k^l. The
wrapped base plugin sees only rescaled experts, in its statistics passes too (TIES'
global trim thresholds are those of the rescaled task vectors). Where K·σ is exactly 1
the expert's tensor is handed over unchanged (bit-identical to the base method).

Note on scale: α sums to 1 over L layers and β to 1 over K models, so α·β ≈ 1/(L·K) and
at T = 1 σ stays close to 1/K (Sens+X ≈ X); ``report()`` gives σ's spread so that a
smaller T can be chosen deliberately.

**Calibration.** Expert k's prompts are those of its tasks (``ctx.expert_tasks``; a task
name matches a calibration key exactly, else the keys starting with ``<task>_`` — lm-eval
group members —; an expert with no match falls back to every calibration prompt, with a
warning and ``calibration_tasks`` in the report saying so), taken round-robin across its
tasks, at most ``n_calibration`` of them, each cut from the left to ``max_length`` tokens.

**Cost and memory.** Each expert model is built twice (``ctx.build_model``): once for
its sensitivities (n backward passes) and its own-task reference logits, kept on CPU as
float16 (n · tokens · vocab · 2 bytes per expert), once for its logits on the other
experts' prompts. One model is held at a time (the last one is reused).
"""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from core.calibration import expert_prompts
from core.layers import group_tensors, layer_group
from core.lm import encode_prompts, pad_id_of, right_pad
from core.options import check_choice, check_finite, check_int, check_unit_interval
from core.trim import TRIM_SCOPES
from methods.base import FitContext, MergeMethod
from methods.dare import DARELinear, DARETies
from methods.task_arithmetic import TaskArithmetic
from methods.ties import TIES

BASE_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
ALIGNMENTS = ("kl", "l2", "cosine")

# ------------------------------------------------------------------ coefficients


def normalise_over_layers(sensitivity: Tensor) -> Tensor:
    """α = s / Σ_l s per row (model) of a [K, L] tensor; a zero row becomes uniform."""
    s = sensitivity.double()
    total = s.sum(dim=1, keepdim=True)
    uniform = torch.full_like(s, 1.0 / s.shape[1])
    return torch.where(total > 0, s / total.clamp_min(torch.finfo(s.dtype).tiny), uniform)


def alignment_beta(scores: Sequence[float] | Tensor, alignment: str) -> Tensor:
    """β from each model's mean alignment score a_k (see the module docstring): closer to
    the other experts ⇒ larger β; β ≥ 0 sums to 1."""
    a = torch.as_tensor(scores, dtype=torch.float64)
    if a.numel() == 1:
        return torch.ones(1, dtype=torch.float64)
    if alignment == "cosine":
        w = ((1 + a) / 2).clamp_min(0.0)
    else:
        w = 1.0 / (a.clamp_min(0.0) + 1e-12)
    if float(w.sum()) <= 0:
        return torch.full_like(a, 1.0 / a.numel())
    return w / w.sum()


def sens_sigma(alpha: Tensor, beta: Tensor, temperature: float) -> Tensor:
    """σ[k, l] = softmax_k(α[k, l] · β[k] / T): sums to 1 over experts for every layer."""
    logits = alpha.double() * beta.double().reshape(-1, 1) / float(temperature)
    return torch.softmax(logits, dim=0)


def pair_alignment(logits: Tensor, reference: Tensor, mask: Tensor, alignment: str) -> Tensor:
    """Per-position alignment of ``logits`` (model k) with ``reference`` (model j), both
    [B, T, V], summed over the real positions of ``mask`` [B, T] (returns a 0-d float64
    sum; divide by ``mask.sum()`` for the mean). ``kl``: KL(p_ref ‖ p); ``l2``: ‖z − z_ref‖₂;
    ``cosine``: cos(z, z_ref)."""
    z, r = logits.float(), reference.float()
    if alignment == "kl":
        lr = torch.log_softmax(r, dim=-1)
        per = (lr.exp() * (lr - torch.log_softmax(z, dim=-1))).sum(-1)
    elif alignment == "l2":
        per = (z - r).norm(dim=-1)
    elif alignment == "cosine":
        per = torch.nn.functional.cosine_similarity(z, r, dim=-1)
    else:
        raise ValueError(f"unknown alignment {alignment!r}; use one of {list(ALIGNMENTS)}")
    return (per.double() * mask.double()).sum()


def rescale_experts(
    base: Tensor, experts: Mapping[str, Tensor], factors: Mapping[str, float]
) -> dict[str, Tensor]:
    """θ0 + c_k (θ_k − θ0) per expert; an expert with c_k == 1 is passed unchanged."""
    out = {}
    for e, t in experts.items():
        c = float(factors[e])
        out[e] = t if c == 1.0 else base + c * (t - base)
    return out


# ------------------------------------------------------------------------ plugin


def make_base_plugin(
    base_method: str,
    scaling: float | None,
    density: float | None,
    drop_rate: float | None,
    trim_scope: str,
) -> MergeMethod:
    """The wrapped base method; options left ``None`` take that method's own defaults."""
    kw: dict[str, Any] = {} if scaling is None else {"scaling": scaling}
    if base_method == "task_arithmetic":
        return TaskArithmetic(**kw)
    if base_method == "ties":
        if density is not None:
            kw["density"] = density
        return TIES(trim_scope=trim_scope, **kw)
    if drop_rate is not None:
        kw["drop_rate"] = drop_rate
    return DARELinear(**kw) if base_method == "dare_linear" else DARETies(**kw)


class SensMerging(MergeMethod):
    """Sens-Merging plugin (see the module docstring for the exact form and choices).

    Options: ``base_method`` (``task_arithmetic`` default, ``ties``, ``dare_linear``,
    ``dare_ties``) and its options ``scaling``, ``density`` (TIES), ``drop_rate`` (DARE),
    ``trim_scope`` (TIES) — ``null`` takes the base method's default (TA λ 0.3; TIES
    density 0.2, λ 1; DARE p 0.5, λ 1) —; ``temperature`` T (> 0, default 1.0);
    ``n_calibration`` (prompts per expert, default 100); ``alignment`` (``kl`` default,
    ``l2``, ``cosine``); ``batch_size`` (prompts per no-grad forward for the alignment,
    default 8); ``max_length`` (512 tokens per prompt).

    ``report()``: per group ``alpha`` / ``sigma`` / ``sensitivity`` {group: {expert}},
    ``beta`` and ``alignment_scores`` {expert}, the pairwise alignments, ``scale`` (K·σ),
    the calibration tasks and prompt counts, and the base method's own report.
    """

    name = "sens_merging"
    needs_data = True
    fit_state_keys = ("factors", "_report")
    # the base merge's options: σ is learned from the experts alone
    fit_independent = ("base_method", "scaling", "density", "drop_rate", "trim_scope")

    def __init__(
        self,
        base_method: str = "task_arithmetic",
        scaling: float | None = None,
        density: float | None = None,
        drop_rate: float | None = None,
        trim_scope: str = "global",
        temperature: float = 1.0,
        n_calibration: int = 100,
        alignment: str = "kl",
        batch_size: int = 8,
        max_length: int = 512,
    ) -> None:
        self.base_method = check_choice(base_method, "method.base_method", BASE_METHODS)
        self.scaling = None if scaling is None else check_finite(scaling, "method.scaling")
        self.density = (
            None
            if density is None
            else check_unit_interval(density, "method.density", open_low=True)
        )
        self.drop_rate = (
            None
            if drop_rate is None
            else check_unit_interval(drop_rate, "method.drop_rate", open_high=True)
        )
        self.trim_scope = check_choice(trim_scope, "method.trim_scope", TRIM_SCOPES)
        self.temperature = check_finite(temperature, "method.temperature")
        if self.temperature <= 0:
            raise ValueError(f"method.temperature must be > 0, got {temperature!r}")
        self.n_calibration = check_int(n_calibration, "method.n_calibration", minimum=1)
        self.alignment = check_choice(alignment, "method.alignment", ALIGNMENTS)
        self.batch_size = check_int(batch_size, "method.batch_size", minimum=1)
        self.max_length = check_int(max_length, "method.max_length", minimum=1)
        self.base = make_base_plugin(
            self.base_method, self.scaling, self.density, self.drop_rate, self.trim_scope
        )
        self.stat_passes = self.base.stat_passes
        self.expert_names: list[str] = []
        self.factors: dict[str, dict[str, float]] | None = None  # group → expert → K·σ
        self._report: dict[str, Any] = {}

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        self.base.setup(expert_names, seed)
        self.factors = None
        self._report = {}

    # ------------------------------------------------------------------ fit

    def fit(self, ctx: FitContext) -> None:
        experts = list(self.expert_names)
        ctx.check_experts(experts)
        groups = group_tensors(ctx.tensor_names)
        if not groups:
            raise ValueError("Sens-Merging: the pool has no mergeable tensors")
        pad = pad_id_of(ctx.tokenizer)
        device = ctx.device
        cal_tasks, seqs = {}, {}
        for e in experts:
            cal_tasks[e], prompts = expert_prompts(
                ctx.calibration, ctx.expert_tasks, e, self.n_calibration, "Sens-Merging"
            )
            seqs[e] = encode_prompts(ctx.tokenizer, prompts, self.max_length)
            if not any(len(s) >= 2 for s in seqs[e]):
                raise ValueError(
                    f"Sens-Merging: expert {e!r} has no calibration prompt of >= 2 tokens "
                    f"(tasks {cal_tasks[e]})"
                )

        sens: dict[str, dict[str, float]] = {}
        refs: dict[str, list[Tensor]] = {}
        model = None
        for e in experts:  # sweep 1: sensitivities + own-task reference logits
            model = None
            _free_memory()
            model = ctx.build_model(e)
            sens[e] = self._sensitivity(model, groups, seqs[e], device)
            refs[e] = [
                lg.to("cpu", torch.float16) for lg, _ in self._logits(model, seqs[e], pad, device)
            ]
        pair: dict[str, dict[str, float]] = {e: {} for e in experts}
        for k in reversed(experts):  # sweep 2: cross-task alignment (last model reused)
            if k != experts[-1]:
                model = None
                _free_memory()
                model = ctx.build_model(k)
            for j in experts:
                if j == k:
                    continue
                total, count = 0.0, 0.0
                batches = self._logits(model, seqs[j], pad, device)
                for (lg, mask), ref in zip(batches, refs[j], strict=True):
                    total += float(pair_alignment(lg, ref.to(lg.device), mask, self.alignment))
                    count += float(mask.sum())
                pair[k][j] = total / max(count, 1.0)
        model = refs = None
        _free_memory()

        names = list(groups)
        s = torch.tensor([[sens[e][g] for g in names] for e in experts], dtype=torch.float64)
        scores = [sum(pair[e].values()) / max(len(pair[e]), 1) for e in experts]
        alpha = normalise_over_layers(s)
        beta = alignment_beta(scores, self.alignment)
        sigma = sens_sigma(alpha, beta, self.temperature)
        k = len(experts)
        self.factors = {
            g: {e: k * float(sigma[i, li]) for i, e in enumerate(experts)}
            for li, g in enumerate(names)
        }

        def by_group(m: Tensor) -> dict[str, dict[str, float]]:
            return {
                g: {e: float(m[i, li]) for i, e in enumerate(experts)} for li, g in enumerate(names)
            }

        self._report = {
            "groups": {g: len(v) for g, v in groups.items()},
            "sensitivity": by_group(s),
            "alpha": by_group(alpha),
            "alignment_scores": dict(zip(experts, scores, strict=True)),
            "pairwise_alignment": pair,
            "beta": dict(zip(experts, beta.tolist(), strict=True)),
            "sigma": by_group(sigma),
            "scale": self.factors,
            "sigma_spread": float(sigma.max() - sigma.min()),
            "calibration_tasks": cal_tasks,
            "n_prompts": {e: len(v) for e, v in seqs.items()},
        }

    def _sensitivity(
        self, model: torch.nn.Module, groups: Mapping[str, list[str]], seqs, device: str
    ) -> dict[str, float]:
        """s^l = mean over prompts of Σ_{p∈l} |θ_p · ∂L/∂θ_p| (one backward per prompt)."""
        state = model.state_dict(keep_vars=True)
        missing = [n for names in groups.values() for n in names if n not in state]
        if missing:
            raise ValueError(
                f"Sens-Merging: tensors {missing[:8]} are not in the model from "
                "ctx.build_model; the pool's tensor names must be the model's state-dict keys"
            )
        wanted = {id(state[n]) for names in groups.values() for n in names}
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        acc = dict.fromkeys(groups, 0.0)
        used = 0
        for s in seqs:
            if len(s) < 2:
                continue
            ids = torch.tensor([list(s)], dtype=torch.long, device=device)
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            for g, names in groups.items():
                total = 0.0
                for n in names:
                    p = state[n]
                    if p.grad is not None:
                        total += float((p.detach().float() * p.grad.float()).abs().sum())
                acc[g] += total
            used += 1
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)
        return {g: v / used for g, v in acc.items()}

    def _logits(self, model: torch.nn.Module, seqs, pad: int, device: str):
        """Yield (logits [B, T, V], mask [B, T]) over ``seqs`` in batches (no grad)."""
        for i in range(0, len(seqs), self.batch_size):
            ids, mask = right_pad(seqs[i : i + self.batch_size], pad, device)
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits
            yield logits, mask

    # ----------------------------------------------------------- passes/merge

    def rescaled(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The experts θ0 + K σ_k^l τ_k the base method sees for tensor ``name``."""
        if self.factors is None:
            raise RuntimeError("Sens-Merging: coefficients are not computed (fit has not run)")
        group = layer_group(name)
        if group not in self.factors:
            raise ValueError(
                f"Sens-Merging has no coefficients for tensor {name!r} (group {group!r}); "
                f"fit saw groups {sorted(self.factors)}"
            )
        return rescale_experts(base, experts, self.factors[group])

    def observe(
        self, pass_idx: int, name: str, base: Tensor, experts: Mapping[str, Tensor]
    ) -> None:
        self.base.observe(pass_idx, name, base, self.rescaled(name, base, experts))

    def end_pass(self, pass_idx: int) -> None:
        self.base.end_pass(pass_idx)

    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        return self.base.merge_tensor(name, base, self.rescaled(name, base, experts))

    def report(self) -> dict[str, Any]:
        return {
            "base_method": self.base_method,
            "temperature": self.temperature,
            "alignment": self.alignment,
            **self._report,
            "base": self.base.report(),
        }


def _free_memory() -> None:
    """Collect a dropped model and free its (GPU) memory before the next one is built."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
