"""mergelab's data-dependent merges (Fisher merging, RegMean, RegMean++) against
fusion-bench 0.2.33's tensor-level functions.

Each test feeds mergelab and the peer the same weights and statistics (random SPD Grams at
LLaMA shapes, random Fishers, or the inputs a tiny Llama's linears see) and asserts either
bit-identity (``torch.equal``), or the documented convention difference reproduced exactly
(mergelab re-run with the peer's convention, or the peer's result built from mergelab's
pieces), or a pure rounding difference under a stated bound.

Peer conventions found (details in each test's docstring):

- RegMean (``merging_with_regmean_weights``, ``regmean_params_merge``): off-diagonals
  times ``reduce_non_diagonal_ratio`` (= mergelab's α, not 1 − α) through a *float32* mask,
  so α is rounded to float32 (0.9 → 0.89999998); the diagonal is kept bit-exactly;
  ``torch.inverse`` then a matmul in the inputs' dtype, where mergelab solves in float64.
- RegMean Grams (the forward hook on every ``nn.Linear``): a running per-token mean over
  all positions of all batches, padding included, in the model's dtype; mergelab sums over
  the non-pad tokens (its ``gram: mean`` option divides by the real-token count).
- Fisher (``merging_with_fisher_weights``): F̃ = F + ε (added, not a ``max`` floor), each
  expert weighted by c_k/(‖F_k‖₂ + ε) when normalising (c_k = 1/K), no fallback where the
  Fishers are all zero (0/0 = NaN for ε = 0), float32 arithmetic for float32 inputs.
"""

from __future__ import annotations

import pytest
import torch
from _peer_pool import LLAMA_SHAPES, make_pool

from core.lm import right_pad
from methods.fisher import fisher_merge
from methods.regmean import (
    RegMean,
    collect_grams,
    linear_modules,
    regmean_merge,
    scale_off_diagonal,
)
from tests.helpers.tiny_lm import make_tiny_lm

pytestmark = pytest.mark.peers

EPS32 = torch.finfo(torch.float32).eps  # 2^-23
EPS64 = torch.finfo(torch.float64).eps  # 2^-52
ALPHA32 = float(torch.tensor(0.9, dtype=torch.float32))  # 0.8999999761581421

# the Linear weights of one LLaMA layer (+ head), out × in
LINEARS = [n for n, s in LLAMA_SHAPES.items() if len(s) == 2 and "embed" not in n]


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Single-threaded torch (the machine is shared; tiny ops slow down with 2 threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _spd_grams(seed: int, d: int, k: int) -> list[torch.Tensor]:
    """K float32 per-token Grams XᵀX/n of n = 4d rows with column scales e^{N(0, 0.5²)}
    (condition numbers ~ 10–100, like real activations' uneven feature scales)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        scale = torch.exp(0.5 * torch.randn(d, generator=g))
        x = torch.randn(4 * d, d, generator=g) * scale
        out.append(x.T @ x / (4 * d))
    return out


# ----------------------------------------------------------------------- RegMean merge


def test_regmean_scaled_grams_vs_fusion_bench_reduce_non_diagonal(fb):
    """``reduce_non_diagonal_elements(G, r)`` multiplies G by a float32 mask (1 on the
    diagonal, r off it): r = mergelab's α. For α ∈ {1, 0.5} it is bit-identical to
    ``scale_off_diagonal`` (float32 and float64 Grams). For α = 0.9 on float64 Grams the
    peer's off-diagonals are G·fl32(0.9) — bit-identical to ``scale_off_diagonal(G,
    fl32(0.9))`` — and its diagonal is G's exactly, while mergelab forms α·g + (1 − α)·g
    (≤ 2 float64 roundings: |Δ| ≤ 2ε₆₄|g|); the float32 α differs from 0.9 by 2.7e-8
    relative. The RegMean++ module's copy of the function gives the same tensors."""
    for d in (64, 172):
        for g32 in _spd_grams(d, d, 2):
            g64 = g32.double()
            for alpha in (1.0, 0.5):
                for g in (g32, g64):
                    peer = fb.regmean.reduce_non_diagonal_elements(g, alpha)
                    assert torch.equal(peer, scale_off_diagonal(g, alpha))
                    assert torch.equal(peer, fb.regmean_pp.reduce_non_diagonal_elements(g, alpha))
            peer = fb.regmean.reduce_non_diagonal_elements(g64, 0.9)
            off = ~torch.eye(d, dtype=torch.bool)
            assert torch.equal(peer[off], scale_off_diagonal(g64, ALPHA32)[off])
            assert torch.equal(peer[off], (g64 * ALPHA32)[off])
            assert torch.equal(torch.diagonal(peer), torch.diagonal(g64))
            ours = scale_off_diagonal(g64, 0.9)
            dg = torch.diagonal(g64)
            assert ((torch.diagonal(ours) - dg).abs() <= 2 * EPS64 * dg.abs()).all()
            assert abs(ALPHA32 - 0.9) / 0.9 < 3e-8


def _fb_regmean(fb, ws, grams, ratio):
    """fusion-bench ``merging_with_regmean_weights`` on one Linear's weights and Grams."""
    name = "layer.proj"
    out = fb.regmean.merging_with_regmean_weights(
        {f"{name}.weight": list(ws)}, [{name: g} for g in grams], reduce_non_diagonal_ratio=ratio
    )
    return out[f"{name}.weight"]


def test_regmean_merge_vs_fusion_bench_merging_with_regmean_weights(fb):
    """fusion-bench ``merging_with_regmean_weights`` (and RegMean++'s per-layer
    ``regmean_params_merge``, the same arithmetic: bit-identical to it) computes
    W = ((Σ G̃_k)⁻¹ · Σ G̃_k W_kᵀ)ᵀ with ``torch.inverse`` in the inputs' dtype; mergelab's
    ``regmean_merge`` solves (Σ G̃_k) Wᵀ = (Σ W_k G̃_k)ᵀ with ``torch.linalg.solve`` in
    float64. Three experts at every Linear shape of a LLaMA layer (in 64 or 172), per-token
    Grams (the peer's scale; the solution is invariant to a common Gram scale), α = 0.9.

    - Peer in float64 (weights and Grams cast up) vs ``regmean_merge`` on float64 weights
      re-run with the peer's float32 α (fl32(0.9)): the same linear system, solved two ways;
      asserted |Δ| ≤ n·κ(ΣG̃)·ε₆₄·max|W| (the standard forward-error bound of a backward-
      stable solve / inverse, n = in-features; measured ≤ 1.6e-16 at |W| ≤ 0.1, κ ≤ 46).
    - mergelab's own α = 0.9 vs the peer's fl32(0.9), both float64: the off-diagonals differ
      by δ = |0.9 − fl32(0.9)|/0.9 = 2.6e-8 relative, which moves W by ≤ 2κδ·max|W|
      (first-order perturbation of a linear system; measured ≤ 1e-10).
    - mergelab in float32 (α = fl32(0.9)) vs the peer's float64 result rounded to float32:
      ≤ 1 ulp, |Δ| ≤ ε₃₂·|W| (the float64 values differ by ~1e-15 relative, so only values
      at a float32 rounding boundary can round apart; measured: identical everywhere).
    - Peer in float32 (what it does for a float32 model): the float32 inverse is the
      dominant error: asserted |Δ| ≤ n·κ·ε₃₂·max|W| (measured ≤ 6e-8, ~1 ulp at |W| ≈ 0.06,
      against mergelab's float32 result with α = 0.9).
    """
    _, experts = make_pool(4, 3)
    worst = {"f64": 0.0, "alpha": 0.0, "f32_rounded": 0.0, "f32_peer": 0.0}
    delta = abs(0.9 - ALPHA32) / 0.9
    for i, name in enumerate(LINEARS):
        ws = [e[name] for e in experts]
        d = ws[0].shape[1]
        grams = _spd_grams(100 + i, d, 3)
        den = sum(scale_off_diagonal(g.double(), ALPHA32) for g in grams)
        kappa = float(torch.linalg.cond(den))
        wmax = float(torch.stack(ws).abs().max())

        peer64 = _fb_regmean(fb, [w.double() for w in ws], [g.double() for g in grams], 0.9)
        pp64 = fb.regmean_pp.regmean_params_merge(
            [w.double() for w in ws], [g.double() for g in grams], reduce_non_diagonal_ratio=0.9
        )
        assert torch.equal(peer64, pp64), name
        ours64 = regmean_merge([w.double() for w in ws], [g.double() for g in grams], ALPHA32)
        diff = float((ours64 - peer64).abs().max())
        assert diff <= d * kappa * EPS64 * wmax, (name, diff, kappa)
        worst["f64"] = max(worst["f64"], diff)

        own64 = regmean_merge([w.double() for w in ws], [g.double() for g in grams], 0.9)
        diff = float((own64 - peer64).abs().max())
        assert diff <= 2 * kappa * delta * wmax, (name, diff, kappa)
        worst["alpha"] = max(worst["alpha"], diff)

        ours32 = regmean_merge(ws, grams, ALPHA32)
        assert ours32.dtype == torch.float32
        rounded = peer64.float()
        diff = (ours32 - rounded).abs()
        assert (diff <= EPS32 * torch.maximum(ours32.abs(), rounded.abs())).all(), name
        worst["f32_rounded"] = max(worst["f32_rounded"], float(diff.max()))

        ours32 = regmean_merge(ws, grams, 0.9)

        peer32 = _fb_regmean(fb, ws, grams, 0.9)
        assert peer32.dtype == torch.float32
        diff = float((ours32 - peer32).abs().max())
        assert diff <= d * kappa * EPS32 * wmax, (name, diff, kappa)
        worst["f32_peer"] = max(worst["f32_peer"], diff)
    assert worst["f64"] < 1e-14 and worst["alpha"] < 1e-8 and worst["f32_peer"] < 1e-6, worst


# ----------------------------------------------------------------------- Gram statistics


class _Trainer:
    """The three members of a HF ``Trainer`` that fusion-bench's ``regmean_merging`` uses."""

    def __init__(self, batches):
        self.batches = batches
        self._train_batch_size = int(batches[0]["input_ids"].shape[0])

    def get_train_dataloader(self):
        return self.batches

    def _prepare_inputs(self, inputs):
        return inputs


def _peer_grams(fb, monkeypatch, model, batches) -> dict[str, torch.Tensor]:
    """The Grams fusion-bench's ``regmean_merging`` collects with its forward hooks on every
    ``nn.Linear`` of ``model`` (captured where it hands them to the merge step)."""
    seen = []

    def spy(models_to_merge_param_dict, models_to_merge_regmean_weights_list, **kwargs):
        seen.append(models_to_merge_regmean_weights_list)
        return {}

    monkeypatch.setattr(fb.regmean, "merging_with_regmean_weights", spy)
    n = sum(int(b["input_ids"].shape[0]) for b in batches)
    fb.regmean.regmean_merging([model], [_Trainer(batches)], [], [n], 0.9)
    (grams,) = seen[0]
    return {f"{k}.weight": v for k, v in grams.items()}


@pytest.fixture(scope="module")
def tiny():
    model, tok = make_tiny_lm(seed=3, hidden_size=32, num_layers=2)
    names = [n for n, _ in model.named_parameters() if n.endswith("proj.weight")]
    names.append("lm_head.weight")
    return model, tok, linear_modules(model, names)


def _encode(tok, texts):
    return [tok(t)["input_ids"] for t in texts]


def _xabs_gram(model, linears, ids, mask):
    """{name: |X|ᵀ|X|} over all positions (padding included): the scale of a Gram's
    float32 rounding error (γ_n-style bounds)."""
    out, handles = {}, []
    for n, m in linears.items():

        def hook(mod, args, n=n):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double().abs()
            out[n] = out.get(n, 0) + x.T @ x

        handles.append(m.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    return out


def test_gram_accumulation_vs_fusion_bench_hook(fb, tiny, monkeypatch):
    """fusion-bench's RegMean hook (``regmean_merging``; the GPT-2 and CLIP classes' hooks
    are the same code) reshapes the input of each ``nn.Linear`` to [batch·seq, d] and keeps
    a running per-token mean over all batches, G ← (G·n + XᵀX)/(n + m), in the model's
    dtype, padding positions included; mergelab's ``collect_grams`` sums XᵀX over the
    non-pad tokens in float64 (``gram: mean`` then divides by the real-token count).

    - Equal-length prompts in one batch (no padding, one hook call): the peer's Gram is
      bit-identical to mergelab's ``gram: mean`` Gram (``RegMean(gram="mean")._scaled``
      with α = 1) rounded to float32 (the same float32 XᵀX; a float64 division of float32
      operands rounded to float32 is the float32 division).
    - The same prompts in 3 batches of 2: the peer's running mean is reproduced
      bit-identically by replaying its float32 recurrence on mergelab's per-batch Grams;
      mergelab's single mean differs from it by the recurrence's roundings (≤ 3 per batch),
      asserted |Δ| ≤ 4·B·ε₃₂·|X|ᵀ|X|/N (B batches, N tokens).
    - Prompts of different lengths, right-padded in one batch: the peer averages the pad
      positions' inputs in too (their hidden states are finite, not zero). Its Gram equals
      (mergelab's sum + X_padᵀX_pad)/N_all, X_pad the inputs at pad positions captured in
      the same forward pass, up to float32 matmul rounding: asserted
      |Δ| ≤ 2·N_all·ε₃₂·|X|ᵀ|X|/N_all; mergelab's ``gram: mean`` Gram differs from the
      peer's by far more (the pad rows' share).
    """
    model, tok, linears = tiny
    mean_gram = RegMean(alpha=1.0, gram="mean")

    # equal lengths, one batch
    seqs = _encode(tok, ["3+4=", "2+1=", "sky.", "leaf", "1+1=", "rose"])
    assert len({len(s) for s in seqs}) == 1
    ids, mask = right_pad(seqs, 0)
    peer = _peer_grams(fb, monkeypatch, model, [{"input_ids": ids, "attention_mask": mask}])
    ours, tokens, unmasked = collect_grams(model, linears, seqs, 0, "cpu", batch_size=len(seqs))
    assert set(peer) == set(linears) and not unmasked and tokens == ids.numel()
    for n in linears:
        assert peer[n].dtype == torch.float32
        assert torch.equal(peer[n], mean_gram._scaled(ours[n], tokens).float()), n

    # equal lengths, three batches
    batches = [{"input_ids": ids[i : i + 2], "attention_mask": mask[i : i + 2]} for i in (0, 2, 4)]
    peer = _peer_grams(fb, monkeypatch, model, batches)
    per_batch = [
        collect_grams(model, linears, seqs[i : i + 2], 0, "cpu", batch_size=2) for i in (0, 2, 4)
    ]
    xabs = _xabs_gram(model, linears, ids, mask)
    for n in linears:
        run, count = None, 0
        for grams, t, _ in per_batch:
            xtx = grams[n].float()  # each batch's float32 XᵀX, exact in float64
            run = xtx / t if run is None else (run * count + xtx) / (count + t)
            count += t
        assert torch.equal(peer[n], run), n
        diff = (peer[n].double() - mean_gram._scaled(ours[n], tokens)).abs()
        assert (diff <= 4 * 3 * EPS32 * xabs[n] / tokens).all(), n

    # different lengths, right padding
    seqs = _encode(tok, ["3+4=7", "2+1=", "sky is blue", "a", "1+1=2", "rose is red"])
    ids, mask = right_pad(seqs, 0)
    n_all, n_real = ids.numel(), int(mask.sum())
    assert n_real < n_all
    peer = _peer_grams(fb, monkeypatch, model, [{"input_ids": ids, "attention_mask": mask}])
    ours, tokens, _ = collect_grams(model, linears, seqs, 0, "cpu", batch_size=len(seqs))
    assert tokens == n_real
    pad_rows, handles = {}, []
    for n, m in linears.items():

        def grab(mod, args, n=n):
            pad_rows[n] = args[0].detach()[~mask.bool()].float()

        handles.append(m.register_forward_pre_hook(grab))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    xabs = _xabs_gram(model, linears, ids, mask)
    for n in linears:
        xp = pad_rows[n]
        rebuilt = (ours[n] + (xp.T @ xp).double()) / n_all
        bound = 2 * n_all * EPS32 * xabs[n] / n_all
        assert ((peer[n].double() - rebuilt).abs() <= bound).all(), n
        real_only = mean_gram._scaled(ours[n], tokens)
        assert float((peer[n].double() - real_only).abs().max()) > 1e3 * float(bound.max()), n


# ------------------------------------------------------------------------ Fisher merge


def _fishers(seed: int, k: int) -> list[dict[str, torch.Tensor]]:
    """Float32 diagonal Fishers F = (1e-3·z)², z ~ N(0, 1): entries ~ 1e-6, the size of the
    peer's ε, so that adding ε and flooring at ε visibly differ."""
    g = torch.Generator().manual_seed(seed)
    return [
        {n: (1e-3 * torch.randn(s, generator=g)) ** 2 for n, s in LLAMA_SHAPES.items()}
        for _ in range(k)
    ]


def _fb_fisher(fb, experts, fishers, normalize, eps, coef=None):
    k = len(experts)
    coef = torch.ones(k) / k if coef is None else coef
    return fb.fisher.merging_with_fisher_weights(
        {n: [e[n] for e in experts] for n in experts[0]},
        fishers,
        coef,
        normalize_fisher_weight=normalize,
        minimal_fisher_weight=eps,
    )


def _f64(sds):
    return [{n: t.double() for n, t in sd.items()} for sd in sds]


def test_fisher_merge_vs_fusion_bench_merging_with_fisher_weights(fb):
    """fusion-bench ``merging_with_fisher_weights`` (its default: c_k = 1/K, ε = 1e-6):
    Σ_k λ_k (F_k + ε) θ_k / Σ_k λ_k (F_k + ε), with λ_k = c_k unnormalised and
    λ_k = c_k · (1/(‖F_k‖₂ + ε)) / Σ_j 1/(‖F_j‖₂ + ε) normalised (‖F_k‖₂ over every merged
    tensor, the peer's ``get_models_fisher_norm``). mergelab's ``fisher_merge`` floors
    instead (max(F, ε)) and its ``fit`` normalises by RMS(F_k) = ‖F_k‖₂/√P before the floor.
    Three experts, every LLaMA tensor, Fishers ~ 1e-6.

    - Unnormalised, float64 inputs: bit-identical to ``fisher_merge(θ, F + ε, eps=0,
      weights=c)`` (the same products (λF̃)·θ, sums and division in float64; c = fl32(1/3)
      as the peer's float32 ``ones(K)/K``). mergelab's own ``eps=1e-6`` floor differs
      (max vs add: both weights change by up to ε, here the Fishers' own size).
    - Normalised, float64: bit-identical to ``fisher_merge(θ, λ_k·(F_k + ε), eps=0)``
      with λ built from the peer's norms (λ folded into the Fishers: ``fisher_merge``
      builds its weights with ``torch.tensor(weights)``, i.e. rounds λ to float32 before its
      float64 arithmetic — harmless for the unnormalised c = fl32(1/3), not for λ here).
      With the peer's ε = 0, its normalisation is mergelab's (weights ∝ 1/‖F_k‖ vs
      Fishers ∝ √P/‖F_k‖: the constant cancels):
      ``fisher_merge`` on F_k/RMS(F_k) agrees to |Δ| ≤ 8ε₆₄·max_k|θ_k| (rounding of the
      two scalings).
    - Float32 inputs (the peer's arithmetic in float32): the unnormalised reproduction
      agrees with the peer to |Δ| ≤ (2K + 4)·ε₃₂·Σ λF̃|θ|/Σ λF̃ (K + 1 roundings in the
      numerator, K in the denominator, the division, mergelab's final rounding).
    """
    _, experts = make_pool(5, 3)
    fishers = _fishers(6, 3)
    k, eps = 3, 1e-6
    c = float(torch.ones(k)[0] / k)
    e64, f64 = _f64(experts), _f64(fishers)

    peer = _fb_fisher(fb, e64, f64, normalize=False, eps=eps)
    some_differ = False
    for n in LLAMA_SHAPES:
        th, fs = [e[n] for e in e64], [f[n] for f in f64]
        ours = fisher_merge(th, [f + eps for f in fs], eps=0.0, weights=[c] * k)
        assert torch.equal(peer[n], ours), n
        own = fisher_merge(th, fs, eps=eps)
        some_differ |= not torch.equal(own, ours)
    assert some_differ

    peer = _fb_fisher(fb, e64, f64, normalize=True, eps=eps)
    norms = fb.fisher.get_models_fisher_norm({n: None for n in LLAMA_SHAPES}, f64)
    inv = 1.0 / (norms + eps)
    lam = torch.full((k,), c, dtype=torch.float32) * (inv / inv.sum())
    for n in LLAMA_SHAPES:
        th, fs = [e[n] for e in e64], [f[n] for f in f64]
        ours = fisher_merge(th, [lk * (f + eps) for lk, f in zip(lam, fs, strict=True)])
        assert torch.equal(peer[n], ours), n

    peer = _fb_fisher(fb, e64, f64, normalize=True, eps=0.0)
    count = sum(t.numel() for t in fishers[0].values())
    rms = [(sum(float(t.pow(2).sum()) for t in f.values()) / count) ** 0.5 for f in f64]
    for n in LLAMA_SHAPES:
        th = [e[n] for e in e64]
        ours = fisher_merge(th, [f[n] / r for f, r in zip(f64, rms, strict=True)], eps=0.0)
        bound = 8 * EPS64 * torch.stack(th).abs().amax(0)
        assert ((ours - peer[n]).abs() <= bound).all(), n

    peer = _fb_fisher(fb, experts, fishers, normalize=False, eps=eps)
    for n in LLAMA_SHAPES:
        th, fs = [e[n] for e in experts], [f[n] + eps for f in fishers]
        assert peer[n].dtype == torch.float32
        ours = fisher_merge(th, fs, eps=0.0, weights=[c] * k)
        w = torch.stack(fs).double() * c
        scale = (w * torch.stack(th).double().abs()).sum(0) / w.sum(0)
        assert ((ours.double() - peer[n].double()).abs() <= (2 * k + 4) * EPS32 * scale).all()


def test_fisher_zero_fisher_handling_vs_fusion_bench(fb):
    """All-zero Fishers, float64 inputs.

    - A tensor where every expert's Fisher is 0, peer ε = 1e-6: the peer's F̃ = ε gives
      the plain mean, computed as Σ(c·ε)θ/Σ(c·ε): bit-identical to
      ``fisher_merge(θ, 0 + ε, eps=0, weights=c)``; mergelab's own max floor (F̃ = ε, λ = 1)
      agrees within 2 ulp of the mean.
    - Peer ε = 0 on that tensor: 0/0 = NaN everywhere; mergelab (``eps=0``) takes the
      explicit λ-weighted mean (equal to Σθ/K).
    - An expert whose Fisher is 0 on the whole model, normalised: the peer's weight
      1/(‖0‖ + ε) = 10⁶ makes that expert dominate (its F̃ = ε then weighs ~ √P times
      more than the others' normalised Fishers (F_j + ε)/‖F_j‖ ~ 1/√P): its share
      λ_0ε/Σλ_k(F_k + ε) has median > 0.98, and the peer's merge lies within (1 − share) of
      the experts' spread from θ_0; mergelab leaves such an expert unnormalised (c_k = 1) and floors
      it to ε ≪ the others' F/RMS ~ 1: mergelab's merge is the other two experts' Fisher
      merge moved toward θ_0 by exactly its weight share ε/(ε + Σ_j F̃_j) (median < 1e-5;
      up to ~1e-2 where both others' F/RMS happen to be ~1e-4), asserted with a 8ε₆₄
      slack. The peer's result is still reproduced bit-identically by ``fisher_merge``
      with its λ folded into the Fishers.
    """
    _, experts = make_pool(7, 3)
    e64 = _f64(experts)
    fishers = _f64(_fishers(8, 3))
    zero = "model.layers.0.mlp.up_proj.weight"
    for f in fishers:
        f[zero] = torch.zeros_like(f[zero])
    k, eps = 3, 1e-6
    c = float(torch.ones(k)[0] / k)
    th = [e[zero] for e in e64]
    mean = torch.stack(th).sum(0) / k

    peer = _fb_fisher(fb, e64, fishers, normalize=False, eps=eps)[zero]
    zeros = [torch.zeros_like(t) for t in th]
    assert torch.equal(peer, fisher_merge(th, [z + eps for z in zeros], eps=0.0, weights=[c] * k))
    own = fisher_merge(th, zeros, eps=eps)
    assert ((own - mean).abs() <= 2 * EPS64 * torch.stack(th).abs().amax(0)).all()
    assert ((peer - mean).abs() <= 2 * EPS64 * torch.stack(th).abs().amax(0)).all()

    peer = _fb_fisher(fb, e64, fishers, normalize=False, eps=0.0)[zero]
    assert torch.isnan(peer).all()
    assert torch.equal(fisher_merge(th, zeros, eps=0.0), mean)

    fishers = _f64(_fishers(9, 3))
    fishers[0] = {n: torch.zeros_like(t) for n, t in fishers[0].items()}
    peer = _fb_fisher(fb, e64, fishers, normalize=True, eps=eps)
    norms = fb.fisher.get_models_fisher_norm({n: None for n in LLAMA_SHAPES}, fishers)
    inv = 1.0 / (norms + eps)
    lam = torch.full((k,), c, dtype=torch.float32) * (inv / inv.sum())
    count = sum(t.numel() for t in fishers[1].values())
    rms = [1.0] + [
        (sum(float(t.pow(2).sum()) for t in f.values()) / count) ** 0.5 for f in fishers[1:]
    ]
    for n in LLAMA_SHAPES:
        th, fs = [e[n] for e in e64], [f[n] for f in fishers]
        rebuilt = fisher_merge(th, [lk * (f + eps) for lk, f in zip(lam, fs, strict=True)])
        assert torch.equal(peer[n], rebuilt), n
        wts = [lk * (f + eps) for lk, f in zip(lam, fs, strict=True)]
        share0 = wts[0] / sum(wts)
        spread = torch.maximum((th[1] - th[0]).abs(), (th[2] - th[0]).abs())
        slack = 8 * EPS64 * torch.stack(th).abs().amax(0)
        assert ((peer[n] - th[0]).abs() <= (1 - share0) * spread + slack).all(), n
        assert float(share0.median()) > 0.98, n
        scaled = [f / r for f, r in zip(fs, rms, strict=True)]
        ours = fisher_merge(th, scaled, eps=eps)
        others = fisher_merge(th[1:], scaled[1:], eps=eps)
        share = eps / (eps + sum(f.clamp_min(eps) for f in scaled[1:]))
        bound = share * (th[0] - others).abs() + 8 * EPS64 * torch.stack(th).abs().amax(0)
        assert ((ours - others).abs() <= bound).all(), n
        assert float(share.median()) < 1e-5, n


# ---------------------------------------------------------------------------- RegMean++


def test_regmean_plus_plus_layer_merge_vs_fusion_bench(fb):
    """RegMean++: fusion-bench's per-layer merge ``regmean_plusplus.merging_with_regmean_
    weights`` (→ ``regmean_params_merge``) is the same arithmetic as plain RegMean's and is
    compared with ``regmean_merge`` in the RegMean test above (bit-identical to the plain
    peer there); here the layer-level function on one LLaMA layer's Linears plus its norms
    is checked against the plain peer (bit-identical, float32) and its non-Linear tensors
    against mergelab's mean (``torch.stack(...).mean(0)``, bit-identical).

    Not compared: the RegMean++ stage order itself (embeddings averaged first, then layer l's
    Grams from the merged layers < l on each expert's data, then layer l merged). fusion-
    bench implements it only in ``RegMeanAlgorithmForCLIPPlusPlus`` (CLIP vision encoders,
    images, zero-shot heads); its abstract ``RegMeanAlgorithmPlusPlus.run`` would need
    LLaMA-specific ``get_layers`` / first-layer inputs / decoder-layer forwards (rotary
    embeddings, masks) written here, so the comparison would test that glue rather than
    the peer. Its hook is the same running per-token mean as plain RegMean's (covered by
    the Gram test). mergelab's stage order is covered by the unit test
    ``test_regmean_pp_uses_merged_earlier_blocks``.
    """
    _, experts = make_pool(10, 3)
    prefix = "model.layers.0."
    layer = [n for n in LLAMA_SHAPES if n.startswith(prefix)]
    params = {n.removeprefix(prefix): [e[n] for e in experts] for n in layer}
    grams, i = [{} for _ in experts], 0
    for n, ws in params.items():
        if ws[0].dim() == 2:
            for k, g in enumerate(_spd_grams(200 + i, ws[0].shape[1], 3)):
                grams[k][n.removesuffix(".weight")] = g
            i += 1
    assert len(grams[0]) == 7
    pp = fb.regmean_pp.merging_with_regmean_weights(params, grams, reduce_non_diagonal_ratio=0.9)
    plain = fb.regmean.merging_with_regmean_weights(params, grams, reduce_non_diagonal_ratio=0.9)
    assert set(pp) == set(params)
    for n, ws in params.items():
        assert torch.equal(pp[n], plain[n]), n
        if ws[0].dim() == 1:
            assert torch.equal(pp[n], torch.stack(ws).mean(0)), n
        else:
            module = n.removesuffix(".weight")
            gs = [g[module] for g in grams]
            d = ws[0].shape[1]
            den = sum(scale_off_diagonal(g.double(), ALPHA32) for g in gs)
            kappa = float(torch.linalg.cond(den))
            wmax = float(torch.stack(ws).abs().max())
            diff = float((regmean_merge(ws, gs, 0.9) - pp[n]).abs().max())
            assert diff <= d * kappa * EPS32 * wmax, (n, diff)
