"""Fisher merging (Matena & Raffel 2022, arXiv 2111.09832): a diagonal-Fisher-weighted
average of the experts, for causal language models.

**Formula.** Per entry, θ = Σ_k λ_k F̃_k θ_k / Σ_k λ_k F̃_k, with F_k the diagonal Fisher of
expert k at its own weights, F̃_k = max(F_k / c_k, ε) (floored, optionally normalised by
c_k, see below) and λ_k the per-expert ``weights`` (1 each by default, as in the paper's
main results). The paper's Fisher is F = E_x E_{y ~ p_θ(y|x)} [(∇_θ log p_θ(y|x))²], the
expectation over x estimated on N examples and the one over y computed exactly for a
classifier; the paper's defaults (authors' code ``model_merging``): floor ε = 1e-6 (a
``max``, not an addition) and each Fisher normalised by its L2 norm over the whole model
(``normalize_fishers=True``).

Choices the paper leaves open, decided here:

- **Labels for unlabelled prompts** (``labels``). A prompt x = (x_1..x_T) is scored as a
  sequence: log p(y|x) = Σ_t log p(y_t | x_<t+1), one term per position, teacher-forced on
  the *prompt's* tokens. ``sample`` (default): y_t drawn from the model's own predictive
  distribution at each position (a one-sample Monte-Carlo estimate of the paper's true,
  "exact" Fisher; the paper's classifiers take the expectation in closed form, which a
  vocabulary of 10⁵ tokens makes unaffordable). As every y_t is drawn independently given
  the fixed prompt context, the cross terms of the squared sequence gradient vanish in
  expectation, so E[(∇ Σ_t log p(y_t))²] = Σ_t F_t: an unbiased estimate of the summed
  per-position Fisher. ``argmax``: y_t = the most likely token (deterministic; biased).
  ``text``: y_t = the prompt's own next token x_{t+1}, i.e. the gradient of the LM loss on
  the calibration text (the paper's "empirical Fisher"). ``sample``/``argmax`` use every
  position, the last one included (its label is the first answer token the prompt asks
  for); ``text`` has no label there and uses positions 1..T−1.
- **Per-example squared gradients**: one backward pass per prompt (batch size 1), so F_k
  is (1/N) Σ_n (∇_θ log p(y^(n)|x^(n)))², a per-sequence square, never the square of a
  batch sum (which adds cross-example terms). The Fisher is summed over a prompt's
  positions (a longer prompt weighs more, as a longer sequence carries more information).
- **Calibration**: expert k uses the prompts of its own tasks (``ctx.expert_tasks``; a
  task matches a calibration key exactly, else the keys starting with ``<task>_``; an
  expert with no match falls back to all prompts, with a warning and the tasks used in
  the report), round-robin across its tasks, at most ``n_calibration`` (default 256, the
  peer's default), each cut from the left to ``max_length`` tokens.
- **Normalisation** (``normalize``, default true, the authors' code): F_k is divided by
  c_k = RMS of F_k over every mergeable entry of the model (the authors divide by the L2
  norm, which is c_k·√P with P shared by all experts: the same relative weighting of the
  experts); ``false`` is the paper's bare formula. An expert whose Fisher is zero
  everywhere is left unnormalised (c_k = 1).
- **Floor** ε (``eps``, default 1e-6) is applied after the normalisation, so it is in
  units of the expert's RMS Fisher (the authors floor the raw Fisher before scaling by
  1/‖F_k‖): F̃_k = max(F_k / c_k, ε), applied to every expert (the authors' default
  ``favor_target_model`` floors only the first, "target", model; a multi-task merge has
  none). With ε > 0 an entry where every expert's Fisher is below ε gets the λ-weighted
  mean; with ε = 0, entries where Σ_k λ_k F_k = 0 (e.g. tensors no prompt reaches) take
  the λ-weighted mean explicitly.
- **The base** is not a member (its weights get no say), as in the paper's multi-task
  merges; tensors the pool excludes are the base's (the executor copies them).

**Differences from fusion-bench** (``FisherMergingAlgorithmForGPT2``): fusion-bench squares
the gradient of a *batch* sum of Σ_y √p(y)·log p(y) (cross-example and cross-class terms
included; not the per-example Fisher), adds ε = 1e-6 to the Fisher instead of flooring
it, and normalises by the L2 norm before weighting; it computes sequence-classification
heads' Fishers, not an LM's.

**Memory.** ``fit`` holds each expert's Fisher of every mergeable tensor in float32 on the
CPU (K × model size × 4 bytes) plus one model with its gradients on ``ctx.device``; fine
for the small zoo, too much for K 7B experts (the spec's advice would be to stream them to
disk; not done here). The merge pass is the ordinary per-tensor ``merge_tensor``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from core.calibration import expert_prompts, free_memory
from core.layers import layer_group
from core.lm import encode_prompts
from core.options import (
    check_bool,
    check_choice,
    check_finite,
    check_int,
    check_weights_option,
    resolve_weights,
)
from methods.base import FitContext, MergeMethod, stack

LABELS = ("sample", "argmax", "text")


# --------------------------------------------------------------- merge functions


def fisher_merge(
    experts: Sequence[Tensor],
    fishers: Sequence[Tensor],
    eps: float = 0.0,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """Σ_k λ_k F̃_k θ_k / Σ_k λ_k F̃_k with F̃_k = max(F_k, eps), computed in float64 and
    returned in the experts' dtype; entries where the denominator is 0 take the λ-weighted
    mean of the experts (λ = ``weights``, 1 each by default)."""
    theta = stack(experts).double()
    f = stack(fishers).double().to(theta.device)
    if f.shape != theta.shape:
        raise ValueError(f"Fisher shape {tuple(f.shape)} != parameter shape {tuple(theta.shape)}")
    k = theta.shape[0]
    lam = (
        torch.ones(k, dtype=torch.float64)
        if weights is None
        else torch.tensor(weights, dtype=torch.float64)
    )
    lam = lam.double().to(theta.device).reshape(-1, *([1] * (theta.dim() - 1)))
    if eps > 0:
        f = f.clamp_min(eps)
    w = lam * f
    den = w.sum(0)
    mean = (lam * theta).sum(0) / lam.sum()
    merged = (w * theta).sum(0) / torch.where(den > 0, den, torch.ones_like(den))
    return torch.where(den > 0, merged, mean).to(experts[0].dtype)


def sequence_log_likelihood(
    logits: Tensor, ids: Tensor, labels: str, generator: torch.Generator | None
) -> tuple[Tensor, int]:
    """Σ_t log p(y_t) of one sequence (``logits`` [T, V], ``ids`` [T]) with y from
    ``labels`` (see the module docstring) and the number of positions scored."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    if labels == "text":
        logp, target = logp[:-1], ids[1:]
    else:
        with torch.no_grad():
            if labels == "argmax":
                target = logp.argmax(-1)
            else:
                target = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return logp.gather(-1, target.unsqueeze(-1)).sum(), int(target.numel())


# ------------------------------------------------------------------------ plugin


class FisherMerging(MergeMethod):
    """Diagonal Fisher merging (see the module docstring for the exact form and choices).

    Options: ``labels`` (``sample`` default, ``argmax``, ``text``), ``n_calibration``
    (prompts per expert, 256), ``eps`` (floor, 1e-6, ≥ 0), ``normalize`` (true),
    ``weights`` (λ per expert: null, a list in pool order or a mapping by name),
    ``max_length`` (512 tokens per prompt).

    ``report()``: the options, per expert the prompts / scored positions / calibration
    tasks / mean log-likelihood / normaliser c_k, ``fisher_share`` {group: {expert: share
    of that expert's total normalised Fisher}}, and ``zero_fisher_tensors`` (tensors where
    every expert's Fisher is 0: merged as the mean).
    """

    name = "fisher"
    needs_data = True
    fit_state_keys = ("fishers", "_report")
    fit_independent = ("eps", "weights")  # applied in the merge, after the Fishers

    def __init__(
        self,
        labels: str = "sample",
        n_calibration: int = 256,
        eps: float = 1e-6,
        normalize: bool = True,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        max_length: int = 512,
    ) -> None:
        self.labels = check_choice(labels, "method.labels", LABELS)
        self.n_calibration = check_int(n_calibration, "method.n_calibration", minimum=1)
        self.eps = check_finite(eps, "method.eps")
        if self.eps < 0:
            raise ValueError(f"method.eps must be >= 0, got {eps!r}")
        self.normalize = check_bool(normalize, "method.normalize")
        self.weights_option = check_weights_option(weights)
        self.max_length = check_int(max_length, "method.max_length", minimum=1)
        self.expert_names: list[str] = []
        self.weights: list[float] = []
        self.fishers: dict[str, list[Tensor]] | None = None
        self._report: dict[str, Any] = {}

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        self.weights = resolve_weights(self.weights_option, self.expert_names)
        self.fishers = None
        self._report = {}

    # ------------------------------------------------------------------ fit

    def fit(self, ctx: FitContext) -> None:
        experts = list(self.expert_names)
        ctx.check_experts(experts)
        names = list(ctx.tensor_names)
        if not names:
            raise ValueError("Fisher merging: the pool has no mergeable tensors")
        per_expert: dict[str, dict[str, Tensor]] = {}
        info: dict[str, dict[str, Any]] = {}
        for i, e in enumerate(experts):
            tasks, prompts = expert_prompts(
                ctx.calibration, ctx.expert_tasks, e, self.n_calibration, "Fisher merging"
            )
            seqs = encode_prompts(ctx.tokenizer, prompts, self.max_length)
            if self.labels == "text":
                seqs = [s for s in seqs if len(s) >= 2]
            if not seqs:
                raise ValueError(
                    f"Fisher merging: expert {e!r} has no usable calibration prompt (tasks "
                    f"{tasks}; labels={self.labels!r} needs >= {2 if self.labels == 'text' else 1}"
                    " tokens)"
                )
            free_memory()
            model = ctx.build_model(e)
            per_expert[e], stats = self._fisher(model, names, seqs, ctx.device, ctx.seed + i)
            model = None
            free_memory()
            info[e] = {"calibration_tasks": tasks, "n_prompts": len(seqs), **stats}
            ctx.log({f"fisher/loglik/{e}": stats["mean_log_likelihood"]}, i)
        scale = {}
        for e in experts:
            sq = sum(float(f.double().pow(2).sum()) for f in per_expert[e].values())
            count = sum(f.numel() for f in per_expert[e].values())
            rms = math.sqrt(sq / max(count, 1))
            scale[e] = rms if (self.normalize and rms > 0) else 1.0
            if scale[e] != 1.0:
                for n in names:
                    per_expert[e][n] = per_expert[e][n] / scale[e]
            info[e]["fisher_rms"] = rms
        self.fishers = {n: [per_expert[e][n] for e in experts] for n in names}
        share: dict[str, dict[str, float]] = {}
        totals = {e: sum(float(f.double().sum()) for f in per_expert[e].values()) for e in experts}
        for n in names:
            g = share.setdefault(layer_group(n), dict.fromkeys(experts, 0.0))
            for e in experts:
                g[e] += float(per_expert[e][n].double().sum()) / (totals[e] or 1.0)
        self._report = {
            "experts": info,
            "normaliser": scale,
            "fisher_share": share,
            "zero_fisher_tensors": [
                n for n in names if all(not bool(f.any()) for f in self.fishers[n])
            ],
            "n_tensors": len(names),
        }

    def _fisher(
        self, model: torch.nn.Module, names: list[str], seqs, device: str, seed: int
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(mean per-sequence squared gradient of every tensor, stats) for one expert."""
        state = model.state_dict(keep_vars=True)
        missing = [n for n in names if n not in state]
        if missing:
            raise ValueError(
                f"Fisher merging: tensors {missing[:8]} are not in the model from "
                "ctx.build_model; the pool's tensor names must be the model's state-dict keys"
            )
        wanted = {id(state[n]) for n in names}
        for p in model.parameters():
            p.requires_grad_(id(p) in wanted)
        not_params = [n for n in names if not state[n].requires_grad]
        if not_params:
            raise ValueError(f"Fisher merging: tensors {not_params[:8]} are not parameters")
        acc = {
            n: torch.zeros(state[n].shape, dtype=torch.float32, device=state[n].device)
            for n in names
        }
        gen = None
        if self.labels == "sample":
            gen = torch.Generator(device=next(model.parameters()).device).manual_seed(int(seed))
        total_ll, positions = 0.0, 0
        for s in seqs:
            ids = torch.tensor([list(s)], dtype=torch.long, device=device)
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=ids).logits[0]
            ll, count = sequence_log_likelihood(logits, ids[0], self.labels, gen)
            ll.backward()
            for n in names:
                g = state[n].grad
                if g is not None:
                    acc[n].add_(g.detach().float().pow(2))
            total_ll += float(ll.detach())
            positions += count
        model.zero_grad(set_to_none=True)
        model.requires_grad_(False)
        out = {n: (acc[n] / len(seqs)).cpu() for n in names}
        return out, {"n_positions": positions, "mean_log_likelihood": total_ll / max(positions, 1)}

    # ----------------------------------------------------------------- merge

    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        if self.fishers is None:
            raise RuntimeError("Fisher merging: Fishers are not computed (fit has not run)")
        if name not in self.fishers:
            raise ValueError(
                f"Fisher merging has no Fisher for tensor {name!r}; fit saw "
                f"{len(self.fishers)} tensors"
            )
        thetas = [experts[e] for e in self.expert_names]
        fishers = [f.to(base.device) for f in self.fishers[name]]
        return fisher_merge(thetas, fishers, self.eps, self.weights)

    def report(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "n_calibration": self.n_calibration,
            "eps": self.eps,
            "normalize": self.normalize,
            "weights": dict(zip(self.expert_names, self.weights, strict=True)),
            **self._report,
        }
