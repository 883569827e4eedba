"""AdaMerging (Yang et al. 2024): merging coefficients learned by test-time entropy
minimisation on unlabelled inputs, for causal language models.

Merge (task vectors τ_k = θ_k − θ0, coefficients clamped to [0, 1] in every forward pass):

- ``granularity: task``: θ = θ0 + Σ_k λ_k v_k, one λ per expert (shape [K]);
- ``granularity: layer``: θ^l = θ0^l + Σ_k λ_k^l v_k^l where a "layer" is every mergeable
  state-dict tensor (shape [n_tensors, K], rows in ``FitContext.tensor_names`` order);
- v_k = τ_k (plain) or, with ``pp: true`` (AdaMerging++), the TIES-preprocessed vectors
  v_k = τ̂_k ⊙ m_k: τ̂_k is τ_k trimmed to its top ``density`` by magnitude (``trim_scope``
  global over the whole task vector, default, as TIES' Algorithm 1, or per tensor; the
  thresholds are exactly :class:`methods.ties.TIES`'s), γ = sign(Σ_k τ̂_k) the unweighted
  elected sign and m_k = [sign(τ̂_k) = γ and τ̂_k ≠ 0] TIES' disjoint masks. As in the
  official AdaMerging++ code, the learned λ then weight a plain sum Σ_k λ_k v_k (no
  division by the number of agreeing experts: λ takes over that role).

Objective (no paper defines one for causal LMs; this is ours): for each calibration
prompt, the Shannon entropy (nats) of the model's next-token distribution at the **last
real prompt position**, i.e. the distribution of the first answer token. Prompts are
unlabelled and no answer is generated, so no later answer position exists; generating
answers first would make the objective depend on a decoding policy. Per task the entropy
is averaged over the sampled prompts, then summed over tasks (all tasks of
``ctx.calibration``). Prompts are tokenised one by one (with the tokenizer's special
tokens), cut from the *left* to ``max_length`` tokens so the end of the prompt survives,
and right-padded by hand, so the last real position is ``attention_mask.sum(1) − 1``
whatever the tokenizer's ``padding_side`` (right padding also keeps position ids
correct without passing them).

Optimisation: Adam(lr, betas (0.9, 0.999), no weight decay) on the unclamped λ,
initialised to ``init``; each step draws ``batch_size`` prompts per task without
replacement (all of them when a task has fewer) from a ``torch.Generator`` seeded with
``ctx.seed``, and sums the tasks' mean entropies into one loss. The merged parameters
are a differentiable function of λ fed to ``torch.func.functional_call`` on **one** model
from ``ctx.build_model("base")`` (its other tensors, e.g. excluded ones, stay the
base's), so no model is rebuilt per step. ``entropy_init`` / ``entropy_final`` in the
report are the objective over **all** calibration prompts (no sampling), at the initial
and at the learned coefficients; each step's batch entropy and the coefficients' mean
(and per-expert means) go to ``ctx.log``.

Memory: ``fit`` does **not** stream. It loads every mergeable tensor once
(``ctx.load_tensors``) and holds the K task vectors (or ++ vectors) of the whole model in
``fit_dtype`` on ``ctx.device`` (K × model size × 4 bytes in float32; ``bfloat16`` halves
it, at bf16 precision for the vectors during the fit only); the base weights are the
model's own (no extra copy). Add the model and the activations of one step
(``batch_size`` × number of tasks prompts of up to ``max_length`` tokens, kept for the
backward pass). The merge pass afterwards is the ordinary per-tensor streaming
``merge_tensor`` in float32.

Reuse: ``coefficients_path`` (a ``result.json`` of an earlier AdaMerging cell, or a JSON
file holding its ``report()``) loads those coefficients instead of fitting; the
instance then sets ``needs_data = False`` (nothing to learn, no calibration needed), and
AdaMerging++ with global trimming gets TIES' two statistics passes for its thresholds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from core.combine import agreeing_entries
from core.lm import encode_prompts, last_token_entropy, pad_id_of, right_pad
from core.options import check_choice, check_finite, check_int, check_unit_interval
from core.pieces import MagnitudeTrim
from core.reports import read_method_report
from core.trim import (
    TRIM_SCOPES,
    global_trim_threshold,
    trim_by_threshold,
    trim_threshold_per_tensor,
)
from methods.base import FitContext, MergeMethod, task_vectors

GRANULARITIES = ("task", "layer")
FIT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------- merge functions


def clamp_coefficients(raw: Tensor) -> Tensor:
    """The coefficients a forward pass uses: clamp(λ, 0, 1)."""
    return raw.clamp(0.0, 1.0)


def combine(base: Tensor, vectors: Tensor, lam: Tensor) -> Tensor:
    """θ0 + Σ_k λ_k v_k for ``vectors`` stacked as [K, *shape] (differentiable in λ)."""
    lam = lam.to(dtype=vectors.dtype, device=vectors.device)
    return base + torch.tensordot(lam, vectors, dims=([0], [0]))


def merged_parameters(
    bases: Mapping[str, Tensor],
    vectors: Mapping[str, Tensor],
    lam: Tensor,
    names: Sequence[str],
    dtypes: Mapping[str, torch.dtype] | None = None,
) -> dict[str, Tensor]:
    """{name: θ0 + Σ_k λ_k v_k} for ``functional_call``, differentiable in ``lam``: λ is
    [K] (task-wise, shared by all tensors) or [len(names), K] (row i for ``names[i]``).
    Each result is cast to ``dtypes[name]`` (the model's dtype) when given."""
    out = {}
    for i, n in enumerate(names):
        row = lam if lam.ndim == 1 else lam[i]
        merged = combine(bases[n], vectors[n], row)
        out[n] = merged if dtypes is None else merged.to(dtypes[n])
    return out


def disjoint_task_vectors(taus: Sequence[Tensor], thresholds: Sequence[float]) -> list[Tensor]:
    """AdaMerging++ vectors of one tensor: τ̂_k ⊙ m_k with τ̂_k = trim(τ_k, threshold_k),
    γ = sign(Σ τ̂_k) and m_k = [sign(τ̂_k) = γ and τ̂_k ≠ 0] (TIES' disjoint masks)."""
    return agreeing_entries(
        [trim_by_threshold(t, th) for t, th in zip(taus, thresholds, strict=True)]
    )


def load_report(path: str | Path) -> dict[str, Any]:
    """A method report from a ``result.json`` (``method.report``) or a bare report JSON."""
    report = read_method_report(path, "method.coefficients_path").report
    if report is None or not isinstance(report.get("coefficients"), dict):
        raise ValueError(
            f"method.coefficients_path {str(path)!r} holds no AdaMerging coefficients: give a "
            "result.json of an AdaMerging cell or a JSON file with its report"
        )
    return report


# ------------------------------------------------------------------------ plugin


class AdaMerging(MergeMethod):
    """AdaMerging / AdaMerging++ plugin (see the module docstring for the exact choices).

    Options: ``granularity`` (``task`` or ``layer``), ``pp`` (AdaMerging++), ``init``
    (0.3), ``lr`` (1e-3), ``steps`` (500), ``batch_size`` (16 prompts per task per step),
    ``density`` (0.2, ++ only) and ``trim_scope`` (``global`` or ``per_tensor``, ++ only),
    ``max_length`` (512 tokens per prompt), ``coefficients_path`` (reuse, see above),
    ``fit_dtype`` (``float32`` default, ``bfloat16``, ``float16``: how the task vectors are
    held during the fit).

    ``report()``: ``coefficients`` — {expert: λ} task-wise, {tensor: {expert: λ}}
    layer-wise (clamped, as used in the merge) —, ``entropy_init``, ``entropy_final``,
    per-task entropies, ``entropy_curve`` (each step's batch objective), ``steps``, and
    ``thresholds`` for ++ with global trimming.
    """

    name = "adamerging"
    needs_data = True
    fit_state_keys = ("_coef", "_row", "thresholds", "_fit_report")

    def __init__(
        self,
        granularity: str = "task",
        pp: bool = False,
        init: float = 0.3,
        lr: float = 1e-3,
        steps: int = 500,
        batch_size: int = 16,
        density: float = 0.2,
        trim_scope: str = "global",
        max_length: int = 512,
        coefficients_path: str | None = None,
        fit_dtype: str = "float32",
    ) -> None:
        self.granularity = check_choice(granularity, "method.granularity", GRANULARITIES)
        if not isinstance(pp, bool):
            raise ValueError(f"method.pp must be true or false, got {pp!r}")
        self.pp = pp
        self.init = check_unit_interval(init, "method.init")
        self.lr = check_finite(lr, "method.lr")
        if self.lr <= 0:
            raise ValueError(f"method.lr must be > 0, got {lr!r}")
        self.steps = check_int(steps, "method.steps", minimum=0)
        self.batch_size = check_int(batch_size, "method.batch_size", minimum=1)
        self.density = check_unit_interval(density, "method.density", open_low=True)
        self.trim_scope = check_choice(trim_scope, "method.trim_scope", TRIM_SCOPES)
        self.max_length = check_int(max_length, "method.max_length", minimum=1)
        self.fit_dtype = check_choice(fit_dtype, "method.fit_dtype", list(FIT_DTYPES))
        self.coefficients_path = None if coefficients_path is None else str(coefficients_path)
        self._global_trim = self.pp and self.trim_scope == "global" and self.density < 1
        self._loaded: dict[str, Any] | None = None
        self._trim: MagnitudeTrim | None = None
        if self.coefficients_path is not None:
            self._loaded = self._check_loaded(load_report(self.coefficients_path))
            self.needs_data = False  # nothing to learn: the runner need not build a context
            if self._global_trim:  # thresholds for the ++ masks: the trim piece's passes
                self.stat_passes = 2
        self.expert_names: list[str] = []
        self._coef: Tensor | None = None  # clamped, [K] or [n_tensors, K]
        self._row: dict[str, int] = {}
        self.thresholds: dict[str, float] | None = None
        self._fit_report: dict[str, Any] = {}

    # ---------------------------------------------------------------- reuse

    def _check_loaded(self, rep: dict[str, Any]) -> dict[str, Any]:
        where = f"method.coefficients_path {self.coefficients_path!r}"
        for key, mine in (("granularity", self.granularity), ("pp", self.pp)):
            if key in rep and rep[key] != mine:
                raise ValueError(
                    f"{where} holds coefficients for {key}={rep[key]!r} but this run has "
                    f"{key}={mine!r}; set method.{key} to match"
                )
        coefs = rep["coefficients"]
        nested = all(isinstance(v, dict) for v in coefs.values())
        if (self.granularity == "layer") != nested or not coefs:
            raise ValueError(
                f"{where}: coefficients must be {{expert: λ}} for granularity=task and "
                f"{{tensor: {{expert: λ}}}} for granularity=layer"
            )
        return rep

    def _loaded_row(self, values: Mapping[str, Any], where: str) -> list[float]:
        missing = [e for e in self.expert_names if e not in values]
        if missing:
            raise ValueError(
                f"method.coefficients_path {self.coefficients_path!r} has no coefficient for "
                f"experts {missing} ({where}); it was learned for {sorted(values)}"
            )
        return [min(max(float(values[e]), 0.0), 1.0) for e in self.expert_names]

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        self._coef, self._row, self.thresholds, self._trim = None, {}, None, None
        if self._global_trim and self._loaded is not None:
            self._trim = MagnitudeTrim(self.density, "global")
            self._trim.setup(self.expert_names, seed)
        if self._loaded is None:
            return
        coefs = self._loaded["coefficients"]
        if self.granularity == "task":
            self._coef = torch.tensor(self._loaded_row(coefs, "task-wise"))
        else:
            names = list(coefs)
            self._row = {n: i for i, n in enumerate(names)}
            self._coef = torch.tensor([self._loaded_row(coefs[n], n) for n in names])

    def observe(
        self, pass_idx: int, name: str, base: Tensor, experts: Mapping[str, Tensor]
    ) -> None:
        if self._trim is None:
            raise ValueError("AdaMerging declares no statistics passes here")
        self._trim.observe(
            pass_idx, name, dict(zip(experts, task_vectors(base, experts), strict=True))
        )

    def end_pass(self, pass_idx: int) -> None:
        if self._trim is not None:
            self._trim.end_pass(pass_idx)
            if pass_idx == self._trim.stat_passes - 1:
                self.thresholds = dict(self._trim.thresholds or {})

    # ------------------------------------------------------------------ fit

    def fit(self, ctx: FitContext) -> None:
        ctx.check_experts(self.expert_names)
        if self._loaded is not None:  # reuse: check coverage, learn nothing
            if self.granularity == "layer":
                missing = [n for n in ctx.tensor_names if n not in self._row]
                if missing:
                    raise ValueError(
                        f"method.coefficients_path {self.coefficients_path!r} has no "
                        f"coefficients for tensors {missing[:8]}"
                    )
            return
        names = list(ctx.tensor_names)
        if not names:
            raise ValueError("AdaMerging: the pool has no mergeable tensors")
        model = ctx.frozen_model("base", "AdaMerging")
        state = model.state_dict()
        bases = {n: state[n].detach() for n in names}  # the model's own tensors, no copy
        dtypes = {n: state[n].dtype for n in names}
        del state
        vectors = self._load_vectors(ctx, names)
        prompts = self._encode_calibration(ctx)
        pad = pad_id_of(ctx.tokenizer)
        device = ctx.device
        k = len(self.expert_names)
        shape = (k,) if self.granularity == "task" else (len(names), k)
        raw = torch.full(shape, self.init, dtype=torch.float32, device=device, requires_grad=True)
        self._row = {n: i for i, n in enumerate(names)}

        def params(lam: Tensor) -> dict[str, Tensor]:
            return merged_parameters(bases, vectors, lam, names, dtypes)

        def objective(lam: Tensor, batches: dict[str, list[list[int]]]) -> tuple[Tensor, dict]:
            p = params(lam)
            total = torch.zeros((), device=device)
            per_task = {}
            for task, seqs in batches.items():
                ids, mask = right_pad(seqs, pad, device)
                out = torch.func.functional_call(
                    model, p, args=(), kwargs={"input_ids": ids, "attention_mask": mask}
                )
                h = last_token_entropy(out.logits, mask).mean()
                per_task[task] = h
                total = total + h
            return total, per_task

        def full_objective(lam: Tensor) -> tuple[float, dict[str, float]]:
            with torch.no_grad():
                p = params(lam)
                per_task = {}
                for task, seqs in prompts.items():
                    acc = 0.0
                    for s in range(0, len(seqs), self.batch_size):
                        ids, mask = right_pad(seqs[s : s + self.batch_size], pad, device)
                        out = torch.func.functional_call(
                            model, p, args=(), kwargs={"input_ids": ids, "attention_mask": mask}
                        )
                        acc += float(last_token_entropy(out.logits, mask).sum())
                    per_task[task] = acc / len(seqs)
            return sum(per_task.values()), per_task

        h0, h0_tasks = full_objective(clamp_coefficients(raw.detach()))
        opt = torch.optim.Adam([raw], lr=self.lr, betas=(0.9, 0.999), weight_decay=0.0)
        gen = torch.Generator().manual_seed(int(ctx.seed))
        curve: list[float] = []
        bar = tqdm(range(self.steps), desc=f"adamerging ({self.granularity})", leave=False)
        for step in bar:
            batches = {}
            for task, seqs in prompts.items():
                if len(seqs) <= self.batch_size:
                    batches[task] = seqs
                else:
                    idx = torch.randperm(len(seqs), generator=gen)[: self.batch_size].tolist()
                    batches[task] = [seqs[i] for i in idx]
            lam = clamp_coefficients(raw)
            loss, per_task = objective(lam, batches)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            value = float(loss.detach())
            curve.append(value)
            lam_d = lam.detach()
            per_expert = lam_d if lam_d.ndim == 1 else lam_d.mean(0)
            metrics = {"adamerging/entropy": value, "adamerging/coef_mean": float(lam_d.mean())}
            metrics.update(
                {f"adamerging/entropy/{t}": float(h.detach()) for t, h in per_task.items()}
            )
            metrics.update(
                {
                    f"adamerging/coef/{e}": float(v)
                    for e, v in zip(self.expert_names, per_expert, strict=True)
                }
            )
            ctx.log(metrics, step)
            bar.set_postfix(entropy=f"{value:.4f}")
        self._coef = clamp_coefficients(raw.detach()).cpu()
        h1, h1_tasks = full_objective(self._coef.to(device))
        self._fit_report = {
            "entropy_init": h0,
            "entropy_final": h1,
            "entropy_per_task_init": h0_tasks,
            "entropy_per_task_final": h1_tasks,
            "entropy_curve": curve,
            "n_prompts": {t: len(s) for t, s in prompts.items()},
        }

    def _load_vectors(self, ctx: FitContext, names: list[str]) -> dict[str, Tensor]:
        """Stacked [K, ...] vectors (τ, or the ++ disjoint vectors) of every tensor, kept
        in ``fit_dtype``."""
        dtype = FIT_DTYPES[self.fit_dtype]
        taus: dict[str, list[Tensor]] = {}
        for n in names:
            base, experts = ctx.load_tensors(n)
            taus[n] = task_vectors(base, {e: experts[e] for e in self.expert_names})
            if not self.pp:  # nothing global to wait for: store right away
                taus[n] = [torch.stack(taus[n]).to(dtype)]
        if not self.pp:
            return {n: taus[n][0] for n in names}
        if self._global_trim:
            self.thresholds = {
                e: global_trim_threshold([taus[n][i] for n in names], self.density)
                for i, e in enumerate(self.expert_names)
            }
        vectors = {}
        for n in names:
            v = disjoint_task_vectors(taus[n], self._thresholds_for(taus[n]))
            vectors[n] = torch.stack(v).to(dtype)
            del taus[n]
        return vectors

    def _thresholds_for(
        self, taus: Sequence[Tensor], experts: Sequence[str] | None = None
    ) -> list[float]:
        if self.density >= 1:  # keep everything, as TIES with density 1
            return [0.0] * len(taus)
        if self.trim_scope == "per_tensor":
            return [trim_threshold_per_tensor(t, self.density) for t in taus]
        if self.thresholds is None:
            raise RuntimeError("AdaMerging++: the global trim thresholds are not known yet")
        return [self.thresholds[e] for e in (experts or self.expert_names)]

    def _encode_calibration(self, ctx: FitContext) -> dict[str, list[list[int]]]:
        out = {}
        for task, texts in ctx.calibration.items():
            seqs = encode_prompts(ctx.tokenizer, texts, self.max_length)
            if seqs:
                out[task] = seqs
        if not out:
            raise ValueError(
                "AdaMerging needs unlabelled calibration prompts, but ctx.calibration has none "
                f"(tasks: {sorted(ctx.calibration)})"
            )
        return out

    # ---------------------------------------------------------------- merge

    def coefficients_for(self, name: str) -> Tensor:
        """The clamped coefficients [K] (pool order) used for tensor ``name``."""
        if self._coef is None:
            raise RuntimeError("AdaMerging: coefficients are not learned (fit has not run)")
        if self.granularity == "task":
            return self._coef
        if name not in self._row:
            raise ValueError(f"AdaMerging (layer-wise) has no coefficients for tensor {name!r}")
        return self._coef[self._row[name]]

    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        lam = self.coefficients_for(name)
        order = [self.expert_names.index(e) for e in experts]
        lam = lam[order]
        taus = task_vectors(base, experts)
        if self.pp:
            taus = disjoint_task_vectors(taus, self._thresholds_for(taus, list(experts)))
        return combine(base, torch.stack(taus), lam.to(base.device))

    def report(self) -> dict[str, Any]:
        coefs: Any = None
        if self._coef is not None:
            if self.granularity == "task":
                coefs = dict(zip(self.expert_names, self._coef.tolist(), strict=True))
            else:
                coefs = {
                    n: dict(zip(self.expert_names, self._coef[i].tolist(), strict=True))
                    for n, i in self._row.items()
                }
        out: dict[str, Any] = {
            "granularity": self.granularity,
            "pp": self.pp,
            "coefficients": coefs,
            "steps": 0 if self._loaded is not None else self.steps,
            "entropy_init": None,
            "entropy_final": None,
        }
        if self._loaded is not None:
            out["coefficients_path"] = self.coefficients_path
        out.update(self._fit_report)
        if self.pp:
            out["density"] = self.density
            out["trim_scope"] = self.trim_scope
            if self.thresholds is not None:
                out["thresholds"] = {e: float(v) for e, v in self.thresholds.items()}
        return out
