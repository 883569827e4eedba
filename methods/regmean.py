"""RegMean (Jin et al. 2023, arXiv 2212.09849) and RegMean++ (Nguyen et al. 2025, arXiv
2508.03121): closed-form least-squares merging of every linear layer, for causal LMs.

**Formula.** For a linear layer with expert weights W_k and inputs X_k (rows = tokens of
expert k's calibration prompts), RegMean minimises Σ_k ‖X_k W − X_k W_k‖², whose solution
in the paper's x·W orientation (W: in × out) is W = (Σ_k G_k)⁻¹ Σ_k G_k W_k, G_k = X_kᵀX_k.
In torch's ``nn.Linear`` orientation (weight: out × in, y = x Wᵀ) this is
W = (Σ_k W_k G_k)(Σ_k G_k)⁻¹ (G symmetric), solved as (Σ G_k) Wᵀ = (Σ W_k G_k)ᵀ. The paper
scales every Gram's off-diagonal entries by α (0 ≤ α ≤ 1, α = 1 the exact solution, α = 0
a per-input-feature weighted average): G̃ = α G + (1 − α) diag(G). The paper tunes α per
setting; a single LM default could not be confirmed from its text here, so ``alpha``
defaults to 0.9 (the exact solution, damped slightly; fusion-bench uses 0.6 for GPT-2,
0.95 for CLIP, 0.1 in its base config). Every other tensor is averaged.

**RegMean++** changes only where X_k comes from: the inputs of block l's layers are the
hidden states that the *merged* blocks 0..l−1 produce on expert k's prompts (the
"cross-layer" dependence), while inside block l the expert's own block runs (so e.g.
``o_proj``'s input is expert k's attention output on those merged inputs), as in the
paper and fusion-bench's ``RegMeanAlgorithmPlusPlus``. Stage by stage: embeddings (and
every other non-block tensor before the blocks) are averaged first; for block l = 0..L−1,
each expert's block-l tensors are loaded into one working model whose blocks < l are
already merged, expert k's prompts run forward until block l's output (the forward pass is
cut there), the Grams of block l's linears are collected, block l is merged (RegMean for
its linears, mean for the rest) and written into the working model; a last stage does the
same for the tensors after the blocks (final norm, an untied ``lm_head``) with every block
merged. Cost: Σ_l (l+1) block forwards per expert (quadratic in depth, no
architecture-specific layer calls); memory: one block's Grams for all experts at a time.

Choices the paper leaves open, decided here:

- **Which layers**: every ``nn.Linear`` whose ``.weight`` is a mergeable tensor, the LM head
  included when it is a Linear with its own weight; a Linear whose weight is tied to an
  embedding (``tie_word_embeddings``) is averaged, like the embedding it shares. Biases,
  embeddings and norms are averaged (the paper's and fusion-bench's rule: only ``.weight``
  of a Linear is RegMean-merged).
- **Tokens**: X_k holds every non-pad token of expert k's prompts (right padding, masked
  out); a Linear whose input is not shaped [batch, tokens, d] or [batch·tokens, d] (e.g.
  a routed MoE expert) uses every row it sees (reported as ``unmasked_linears``).
- **Gram scale** (``gram``): ``sum`` (default, the paper's X_kᵀX_k: an expert with more
  calibration tokens weighs more) or ``mean`` (X_kᵀX_k / n_tokens_k, fusion-bench's
  per-token average: experts weigh equally whatever their prompt counts).
- **Calibration**: expert k's own tasks' prompts (same rule as Fisher merging:
  ``ctx.expert_tasks``, exact key else ``<task>_`` prefix, round-robin, at most
  ``n_calibration`` = 256, the peers' default; all prompts with a warning when none match),
  cut from the left to ``max_length`` tokens, ``batch_size`` prompts per forward.
- **Solve**: in float64 (Grams accumulated in float64 from float32 products) with
  ``torch.linalg.solve``; when Σ G̃_k is singular (an input feature no token of any expert
  activates) or the solve is not finite, a ridge ε = 1e-8 · mean(diag Σ G̃) (1e-8 if that is
  0) pulls the undetermined directions to the experts' mean:
  W = (Σ W_k G̃_k + ε W̄)(Σ G̃_k + ε I)⁻¹; such layers are listed in ``ridge_layers``.
- **The base** is not a member; tensors the pool excludes stay the base's (RegMean++'s
  working model holds the base's values for them, as the merged model will).

**Memory / cache.** Plain RegMean builds one expert model at a time and accumulates
Σ_k G̃_k (d_in² per linear) and Σ_k W_k G̃_k (d_out · d_in) on the CPU in float64: about
(Σ_linears d_in² + model linear size) × 8 bytes — ~ 3 GB + 4 GB for a 0.5B model; fine for
the small zoo, not streamed to disk for 7B models. The fit's result, the merged linear
weights (float32, CPU), is kept in memory until ``merge_tensor`` hands them out.

**Differences from fusion-bench** (``RegMeanAlgorithmForGPT2`` / ``...PlusPlus``): it
averages Grams per token (our ``gram: mean``) over *all* positions, padding included, uses
``torch.inverse`` in the model's dtype without a singular fallback, and merges GPT-2's
``Conv1D`` (in × out) layers; RegMean++ there is implemented for CLIP vision encoders only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from core.calibration import expert_prompts, free_memory
from core.layers import layer_group
from core.lm import encode_prompts, pad_id_of, right_pad
from core.options import check_choice, check_int, check_unit_interval
from methods.base import FitContext, MergeMethod, stack

GRAM_SCALES = ("sum", "mean")
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


# --------------------------------------------------------------- merge functions


def scale_off_diagonal(gram: Tensor, alpha: float) -> Tensor:
    """G̃ = α G + (1 − α) diag(G): off-diagonal entries times α, diagonal unchanged."""
    if alpha == 1.0:
        return gram
    return alpha * gram + (1.0 - alpha) * torch.diag_embed(torch.diagonal(gram))


def solve_regmean(num: Tensor, den: Tensor, mean: Tensor | None = None) -> tuple[Tensor, bool]:
    """(W, ridge_used) with W den = num (W: out × in, den: in × in symmetric), in float64.
    A singular / non-finite solve retries with the ridge toward ``mean`` (see the module
    docstring; ``mean`` defaults to zeros)."""
    num, den = num.double(), den.double()
    try:
        w = torch.linalg.solve(den, num.T).T
        if torch.isfinite(w).all():
            return w, False
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        pass
    d = torch.diagonal(den)
    eps = 1e-8 * (float(d.mean()) if float(d.mean()) > 0 else 1.0)
    m = torch.zeros_like(num) if mean is None else mean.double().to(num.device)
    eye = torch.eye(den.shape[0], dtype=den.dtype, device=den.device)
    return torch.linalg.solve(den + eps * eye, (num + eps * m).T).T, True


def regmean_merge(weights: Sequence[Tensor], grams: Sequence[Tensor], alpha: float = 1.0) -> Tensor:
    """RegMean of Linear weights W_k (out × in) with Grams G_k (in × in):
    (Σ W_k G̃_k)(Σ G̃_k)⁻¹, G̃ = α-scaled off-diagonals; returned in the weights' dtype."""
    scaled = [scale_off_diagonal(g.double(), alpha) for g in grams]
    num = sum(w.double() @ g for w, g in zip(weights, scaled, strict=True))
    den = sum(scaled)
    merged, _ = solve_regmean(num, den, stack(weights).double().mean(0))
    return merged.to(weights[0].dtype)


def tied_to_embedding(model: torch.nn.Module) -> set[int]:
    """ids of the parameters of the model's ``nn.Embedding`` modules."""
    return {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}


def linear_modules(model: torch.nn.Module, names: Sequence[str]) -> dict[str, torch.nn.Linear]:
    """{weight tensor name: module} of the ``nn.Linear`` modules whose ``.weight`` is in
    ``names`` and not tied to an embedding."""
    wanted, tied = set(names), tied_to_embedding(model)
    out = {}
    for mod_name, mod in model.named_modules():
        key = f"{mod_name}.weight" if mod_name else "weight"
        if isinstance(mod, torch.nn.Linear) and key in wanted and id(mod.weight) not in tied:
            out[key] = mod
    return out


class _StopForward(Exception):
    """Raised by a forward hook to cut a forward pass once the needed layers have run."""


def collect_grams(
    model: torch.nn.Module,
    linears: Mapping[str, torch.nn.Module],
    seqs: Sequence[Sequence[int]],
    pad_id: int,
    device: str,
    batch_size: int = 8,
    stop_after: torch.nn.Module | None = None,
) -> tuple[dict[str, Tensor], int, set[str]]:
    """({name: Σ_tokens x xᵀ} in float64 on ``device``, n real tokens, unmasked linears):
    the Gram of every module in ``linears`` over the non-pad tokens of ``seqs``, run in
    batches through ``model`` (no grad); the forward pass stops after ``stop_after``."""
    grams = {n: None for n in linears}
    unmasked: set[str] = set()
    state: dict[str, Tensor] = {}

    def hook_for(name: str):
        def hook(module, args):
            x = args[0].detach()
            mask = state["mask"]
            if x.shape[:-1] == mask.shape:
                x = x[mask]
            elif x.dim() == 2 and x.shape[0] == mask.numel():
                x = x[mask.reshape(-1)]
            else:
                unmasked.add(name)
                x = x.reshape(-1, x.shape[-1])
            g = (x.float().T @ x.float()).double()
            grams[name] = g if grams[name] is None else grams[name] + g

        return hook

    def stop(module, args, output):
        raise _StopForward

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in linears.items()]
    if stop_after is not None:
        handles.append(stop_after.register_forward_hook(stop))
    tokens = 0
    try:
        with torch.no_grad():
            for i in range(0, len(seqs), batch_size):
                ids, mask = right_pad(seqs[i : i + batch_size], pad_id, device)
                state["mask"] = mask.bool()
                tokens += int(mask.sum())
                try:
                    model(input_ids=ids, attention_mask=mask)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    for n, m in linears.items():
        if grams[n] is None:  # never reached: no information from this expert
            d = m.weight.shape[1]
            grams[n] = torch.zeros(d, d, dtype=torch.float64, device=m.weight.device)
    return grams, tokens, unmasked


def block_prefix(name: str) -> str | None:
    """``model.layers.3`` for ``model.layers.3.mlp.up_proj.weight``; None outside blocks."""
    m = _BLOCK.search(name)
    return None if m is None else name[: m.end() - 1]


# ------------------------------------------------------------------------ plugin


class RegMean(MergeMethod):
    """RegMean plugin (see the module docstring for the exact form and choices).

    Options: ``alpha`` (off-diagonal scale α in [0, 1], 0.9), ``gram`` (``sum`` default or
    ``mean``), ``n_calibration`` (prompts per expert, 256), ``batch_size`` (prompts per
    forward, 8), ``max_length`` (512 tokens per prompt).

    ``report()``: the options, ``n_regmean`` / ``n_averaged`` tensor counts and
    ``regmean_per_group`` {layer group: number of RegMean-merged linears}, per expert the
    calibration tasks / prompts / tokens, ``ridge_layers``, ``unmasked_linears`` and
    ``tied_linears`` (Linears averaged because their weight is an embedding's).
    """

    name = "regmean"
    needs_data = True
    fit_state_keys = ("merged", "_report")
    plus_plus = False

    def __init__(
        self,
        alpha: float = 0.9,
        gram: str = "sum",
        n_calibration: int = 256,
        batch_size: int = 8,
        max_length: int = 512,
    ) -> None:
        self.alpha = check_unit_interval(alpha, "method.alpha")
        self.gram = check_choice(gram, "method.gram", GRAM_SCALES)
        self.n_calibration = check_int(n_calibration, "method.n_calibration", minimum=1)
        self.batch_size = check_int(batch_size, "method.batch_size", minimum=1)
        self.max_length = check_int(max_length, "method.max_length", minimum=1)
        self.expert_names: list[str] = []
        self.merged: dict[str, Tensor] | None = None
        self._report: dict[str, Any] = {}

    def setup(self, expert_names: Sequence[str], seed: int) -> None:
        super().setup(expert_names, seed)
        self.merged = None
        self._report = {}

    # ------------------------------------------------------------------ fit

    def _prepare(self, ctx: FitContext) -> tuple[dict[str, list], dict[str, dict[str, Any]]]:
        experts = list(self.expert_names)
        ctx.check_experts(experts)
        if not ctx.tensor_names:
            raise ValueError(f"{self.name}: the pool has no mergeable tensors")
        seqs, info = {}, {}
        for e in experts:
            tasks, prompts = expert_prompts(
                ctx.calibration, ctx.expert_tasks, e, self.n_calibration, self.name
            )
            seqs[e] = encode_prompts(ctx.tokenizer, prompts, self.max_length)
            if not seqs[e]:
                raise ValueError(f"{self.name}: expert {e!r} has no calibration prompt ({tasks})")
            info[e] = {"calibration_tasks": tasks, "n_prompts": len(seqs[e])}
        return seqs, info

    def _scaled(self, gram: Tensor, tokens: int) -> Tensor:
        g = gram / max(tokens, 1) if self.gram == "mean" else gram
        return scale_off_diagonal(g, self.alpha)

    def fit(self, ctx: FitContext) -> None:
        seqs, info = self._prepare(ctx)
        names = list(ctx.tensor_names)
        pad = pad_id_of(ctx.tokenizer)
        sum_g: dict[str, Tensor] = {}
        sum_wg: dict[str, Tensor] = {}
        sum_w: dict[str, Tensor] = {}
        unmasked: set[str] = set()
        tied: list[str] = []
        layer_names: list[str] | None = None
        for step, e in enumerate(self.expert_names):
            free_memory()
            model = ctx.build_model(e)
            linears = linear_modules(model, names)
            if layer_names is None:
                layer_names = list(linears)
                tied = self._tied(model, names)
            elif list(linears) != layer_names:
                raise ValueError(f"{self.name}: expert {e!r} has different linear layers")
            grams, tokens, um = collect_grams(
                model, linears, seqs[e], pad, ctx.device, self.batch_size
            )
            unmasked |= um
            for n, mod in linears.items():
                g = self._scaled(grams.pop(n), tokens).cpu()
                w = mod.weight.detach().double().cpu()
                if n not in sum_g:
                    sum_g[n], sum_wg[n], sum_w[n] = g, w @ g, w.clone()
                else:
                    sum_g[n] += g
                    sum_wg[n] += w @ g
                    sum_w[n] += w
            info[e]["n_tokens"] = tokens
            ctx.log({f"{self.name}/tokens/{e}": float(tokens)}, step)
            model = linears = grams = None
        free_memory()
        k = len(self.expert_names)
        self.merged, ridge = {}, []
        for n in layer_names or []:
            w, used = solve_regmean(sum_wg.pop(n), sum_g.pop(n), sum_w.pop(n) / k)
            self.merged[n] = w.float()
            if used:
                ridge.append(n)
        self._finish_report(names, info, ridge, unmasked, tied)

    @staticmethod
    def _tied(model: torch.nn.Module, names: Sequence[str]) -> list[str]:
        """Mergeable Linear weights that are an embedding's (averaged, not RegMean)."""
        tied_ids, wanted = tied_to_embedding(model), set(names)
        return [
            f"{mn}.weight"
            for mn, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)
            and f"{mn}.weight" in wanted
            and id(m.weight) in tied_ids
        ]

    def _finish_report(self, names, info, ridge, unmasked, tied) -> None:
        per_group: dict[str, int] = {}
        for n in self.merged or {}:
            g = layer_group(n)
            per_group[g] = per_group.get(g, 0) + 1
        self._report = {
            "n_regmean": len(self.merged or {}),
            "n_averaged": len(names) - len(self.merged or {}),
            "regmean_per_group": per_group,
            "experts": info,
            "ridge_layers": ridge,
            "unmasked_linears": sorted(unmasked),
            "tied_linears": tied,
        }

    # ----------------------------------------------------------------- merge

    def merge_tensor(self, name: str, base: Tensor, experts: Mapping[str, Tensor]) -> Tensor:
        if self.merged is None:
            raise RuntimeError(f"{self.name}: nothing fitted (fit has not run)")
        if name in self.merged:
            return self.merged[name].to(device=base.device, dtype=base.dtype)
        return stack([experts[e] for e in self.expert_names]).mean(0)

    def report(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "gram": self.gram,
            "n_calibration": self.n_calibration,
            **self._report,
        }


class RegMeanPlusPlus(RegMean):
    """RegMean++ plugin: RegMean with Grams from the merged earlier blocks' outputs (see
    the module docstring for the stages). Same options and report as :class:`RegMean`,
    plus ``stages`` (the block prefixes in merge order, then ``rest``)."""

    name = "regmean_pp"
    plus_plus = True

    def fit(self, ctx: FitContext) -> None:
        seqs, info = self._prepare(ctx)
        names = list(ctx.tensor_names)
        experts = list(self.expert_names)
        pad = pad_id_of(ctx.tokenizer)
        free_memory()
        work = ctx.frozen_model("base", self.name)
        state = work.state_dict()
        linears = linear_modules(work, names)
        tied = self._tied(work, names)
        tied_set = set(tied)
        blocks: dict[str, list[str]] = {}
        before, after = [], []
        for n in names:
            prefix = block_prefix(n)
            if prefix is not None:
                blocks.setdefault(prefix, []).append(n)
            elif layer_group(n) == "embed":
                before.append(n)
            else:
                after.append(n)
        before_linear = [n for n in before if n in linears]
        if before_linear:
            raise ValueError(f"{self.name}: linear layers before the blocks {before_linear[:4]}")

        def put(values: Mapping[str, Tensor]) -> None:
            with torch.no_grad():
                for n, v in values.items():
                    state[n].copy_(v.to(device=state[n].device, dtype=state[n].dtype))

        def mean_of(n: str) -> Tensor:
            _, ex = ctx.load_tensors(n)
            return stack([ex[e] for e in experts]).mean(0)

        put({n: mean_of(n) for n in before})  # embeddings first
        self.merged = {}
        ridge: list[str] = []
        unmasked: set[str] = set()
        tokens: dict[str, int] = {}
        order = sorted(blocks, key=lambda p: int(p.rsplit(".", 1)[1]))
        stages = [(p, blocks[p], work.get_submodule(p)) for p in order]
        stages.append(("rest", after, None))
        stage_counts: dict[str, int] = {}
        for step, (label, stage_names, stop) in enumerate(stages):
            loaded = {n: ctx.load_tensors(n)[1] for n in stage_names}
            stage_linears = {n: linears[n] for n in stage_names if n in linears}
            grams: dict[str, list[Tensor]] = {n: [] for n in stage_linears}
            for e in experts:  # tied heads keep the mean: they are the (merged) embedding
                put({n: loaded[n][e] for n in stage_names if n not in tied_set})
                if not stage_linears:
                    continue
                g, t, um = collect_grams(
                    work, stage_linears, seqs[e], pad, ctx.device, self.batch_size, stop
                )
                unmasked |= um
                tokens[e] = t
                for n in stage_linears:
                    grams[n].append(self._scaled(g.pop(n), t))
            merged_stage = {}
            for n in stage_names:
                ws = [loaded[n][e] for e in experts]
                if n in stage_linears:
                    num = sum(w.double() @ g for w, g in zip(ws, grams[n], strict=True))
                    w, used = solve_regmean(num, sum(grams[n]), stack(ws).double().mean(0))
                    if used:
                        ridge.append(n)
                    merged_stage[n] = self.merged[n] = w.float().cpu()
                else:
                    merged_stage[n] = stack(ws).mean(0)
            put(merged_stage)
            stage_counts[label] = len(stage_linears)
            ctx.log({f"{self.name}/stage_linears": float(len(stage_linears))}, step)
            loaded = grams = merged_stage = None
        work = state = None
        free_memory()
        for e in experts:
            info[e]["n_tokens"] = tokens.get(e, 0)
        self._finish_report(names, info, ridge, unmasked, tied)
        self._report["stages"] = stage_counts  # stage → RegMean-merged linears, in order
