"""mergelab's newer merges (DELLA, SCE, Karcher / multi-SLERP, TSV-Merge, Iso-C, Iso-CTS,
EMR) against mergekit 0.1.5 and fusion-bench 0.2.33, on tiny float32 LLaMA-shaped
checkpoints (``_peer_pool.LLAMA_SHAPES``).

As in ``test_peer_oracles.py``, every test asserts either bit-identity (``torch.equal``),
or a documented convention difference that it reproduces exactly (mergelab re-run with
the peer's option, or the peer's result rebuilt from mergelab's pieces), or a pure
rounding difference under a stated bound. Where a bound is asserted, the test also shows
the difference *is* rounding: on float64 copies of the same inputs the gap closes to the
same bound with float64's ε.

Peer functions: mergekit ``merge_tensors`` with ``della`` / ``della_linear`` (masks from
``sparsify.della_magprune``), ``sce`` (``merge_methods.sce.sce_mask`` / ``sce_weight``),
``karcher``, ``multislerp``; fusion-bench
``task_singular_vector.utils.TSVM_utils.compute_and_sum_svd_mem_reduction`` (TSVM),
``isotropic_merging.iso_utils.iso_c`` / ``iso_cts``, ``emr_merging.utils.emr_merge``.
fusion-bench 0.2.33 has all four of the compared fusion-bench methods.
"""

from __future__ import annotations

import pytest
import torch
from _peer_pool import LLAMA_SHAPES, make_pool

from core.combine import disjoint_merge, elect_sign
from core.numerics import one_thread
from methods.della import della_merge, magprune, magprune_keep_probabilities
from methods.emr import EMRMerging, emr_masks, emr_model, emr_unify
from methods.iso import iso_c_delta, iso_cts_delta, iso_cts_sizes
from methods.karcher import karcher_mean, multislerp
from methods.sce import sce_merge, sce_select_mask, sce_weights
from methods.tsv import other_rule, tsv_delta

pytestmark = pytest.mark.peers

EPS32 = torch.finfo(torch.float32).eps  # 2^-23
EPS64 = torch.finfo(torch.float64).eps  # 2^-52
EPS = {torch.float32: EPS32, torch.float64: EPS64}


def names():
    return list(LLAMA_SHAPES)


def mk_merge(mergekit, method, tensors, base_index=None, **parameters):
    return mergekit.merge_methods.merge_tensors(
        tensors, method, base_index=base_index, parameters=parameters
    )


def taus_of(base, experts, dtype=torch.float32):
    return [{n: (e[n] - base[n]).to(dtype) for n in names()} for e in experts]


# ----------------------------------------------------------------------------- DELLA


def _mergekit_della_keeps(mergekit, seed, b, ts, density, epsilon):
    """Replay mergekit's DELLA masks: its merge calls ``della_magprune`` once per expert,
    in order, and ``torch.bernoulli`` there is its only draw from the global RNG; with no
    rescale the survivors are the non-zero entries (τ has no exact zeros here)."""
    torch.manual_seed(seed)
    keeps = []
    for t in ts:
        tau = t - b
        assert bool((tau != 0).all())
        keeps.append(mergekit.sparsify.della_magprune(tau, density, epsilon) != 0)
    return keeps


def _as_uniforms(keep: torch.Tensor) -> torch.Tensor:
    """Uniforms that make mergelab keep exactly ``keep``: u = 1 ≥ 1 − p, u = 0 < 1 − p."""
    return keep.float()


D, E, LAM = 0.7, 0.07, 1.1  # the DELLA authors' 3-expert defaults (drop 0.3, window 0.14)


def test_della_vs_mergekit(mergekit, pool3, monkeypatch):
    """mergekit ``della`` (``della_magprune`` + TIES sum election, ``normalize: true``).

    - Keep-probabilities: mergelab's ``magprune_keep_probabilities`` (float64) against
      the ``probs`` mergekit hands ``torch.bernoulli`` (read by a spy): the same rank
      rule, p = (d − ε) + 2ε·r/(n − 1) per row; mergekit rounds ≤ 4 float32 steps
      (ranks/(max − min), ×2ε, + (d − ε) and the cast of d − ε), each ≤ 2^-24 × a value
      ≤ 1, so |Δp| ≤ ε32 asserted (measured 3.8e-8 = 0.32 ε32).
    - Masks are random in both (different streams); with mergekit's masks replayed
      (``_mergekit_della_keeps``) and fed to mergelab (``_as_uniforms``), unit weights:
      ``rescale: l1`` is bit-identical to mergekit's default ``rescale: true`` (one
      ‖τ‖₁/‖m⊙τ‖₁ factor per tensor), ``rescale: none`` to ``rescale: false``.
      (mergelab's default ``inverse_p`` divides each survivor by its own p: the paper's
      rule, not compared.)
    - Weights [0.5, 2, 1]: mergekit votes on sign(Σ w_k τ̃_k), mergelab on sign(Σ τ̃_k).
      mergekit is rebuilt exactly as θ0 + λ·``disjoint_merge``(τ̃, ``elect_sign``(w·τ̃), w);
      mergelab's own merge equals mergekit wherever the two votes agree and differs
      wherever they disagree (power-of-two weights: no rounding enters).
    d = 0.7, ε = 0.07, λ = 1.1.
    """
    base, experts = pool3
    probs = []
    real_bernoulli = torch.bernoulli

    def spy(p, *args, **kwargs):
        probs.append(p.clone())
        return real_bernoulli(p, *args, **kwargs)

    for name in names():
        tau = experts[0][name] - base[name]
        probs.clear()
        with monkeypatch.context() as m:
            m.setattr(torch, "bernoulli", spy)
            mergekit.sparsify.della_magprune(tau, D, E)
        (p_mk,) = probs
        p_ml = magprune_keep_probabilities(tau, D, E)
        assert float((p_mk.reshape(tau.shape).double() - p_ml).abs().max()) <= EPS32, name

    w = [0.5, 2.0, 1.0]
    for name in names():
        b, ts = base[name], [e[name] for e in experts]
        keeps = _mergekit_della_keeps(mergekit, 5, b, ts, D, E)
        uniforms = [_as_uniforms(k) for k in keeps]
        params = dict(density=D, epsilon=E, **{"lambda": LAM})
        kw = dict(density=D, epsilon=E, scaling=LAM)
        for mk_rescale, ml_rescale in ((True, "l1"), (False, "none")):
            torch.manual_seed(5)
            peer = mk_merge(
                mergekit, "della", [b, *ts], 0, weight=1.0, rescale=mk_rescale, **params
            )
            ml, masks = della_merge(b, ts, uniforms, rescale=ml_rescale, **kw)
            assert all(torch.equal(m, k) for m, k in zip(masks, keeps, strict=True))
            assert torch.equal(ml, peer), (name, mk_rescale)

        torch.manual_seed(5)
        peer = mk_merge(mergekit, "della", [b, *ts], 0, weight=w, **params)
        pruned = [
            magprune(t - b, magprune_keep_probabilities(t - b, D, E), u, "l1")[0]
            for t, u in zip(ts, uniforms, strict=True)
        ]
        weighted_sign = elect_sign([wk * p for wk, p in zip(w, pruned, strict=True)])
        assert torch.equal(b + LAM * disjoint_merge(pruned, weighted_sign, w), peer), name
        own, _ = della_merge(b, ts, uniforms, weights=w, rescale="l1", **kw)
        votes_differ = (weighted_sign != elect_sign(pruned)) & (weighted_sign != 0)
        assert torch.equal(own[~votes_differ], peer[~votes_differ]), name
        assert (own[votes_differ] != peer[votes_differ]).all(), name


def test_della_linear_vs_mergekit(mergekit, pool3):
    """mergekit ``della_linear`` (``della_magprune``, weighted sum, ``normalize: false``):
    with mergekit's masks replayed, bit-identical to mergelab's ``della_merge`` with
    ``sign_election=False`` for unit and power-of-two weights ([0.5, 2, 1]), with
    ``rescale: l1`` ↔ mergekit's default ``rescale: true`` and ``none`` ↔ ``false``.
    No vote, so the weighted-vote difference of ``della`` does not arise. d = 0.7,
    ε = 0.07, λ ∈ {1.1, 0.3}.
    """
    base, experts = pool3
    for name in names():
        b, ts = base[name], [e[name] for e in experts]
        keeps = _mergekit_della_keeps(mergekit, 9, b, ts, D, E)
        uniforms = [_as_uniforms(k) for k in keeps]
        for w in ([1.0, 1.0, 1.0], [0.5, 2.0, 1.0]):
            for lam in (LAM, 0.3):
                for mk_rescale, ml_rescale in ((True, "l1"), (False, "none")):
                    torch.manual_seed(9)
                    peer = mk_merge(
                        mergekit,
                        "della_linear",
                        [b, *ts],
                        0,
                        weight=w,
                        density=D,
                        epsilon=E,
                        rescale=mk_rescale,
                        **{"lambda": lam},
                    )
                    ml, _ = della_merge(
                        b,
                        ts,
                        uniforms,
                        density=D,
                        epsilon=E,
                        scaling=lam,
                        weights=w,
                        sign_election=False,
                        rescale=ml_rescale,
                    )
                    assert torch.equal(ml, peer), (name, w, lam, mk_rescale)


# ------------------------------------------------------------------------------- SCE


def _sce_bound(peer, selected, dtype):
    """|Δ| ≤ ε·|θ| + 40·ε·max_k|τ̂_k| (elementwise): the final θ0 + merged rounds once in
    each (≤ ε|θ| together); the η-weighted mean of the agreeing τ̂ is a convex combination,
    so η's relative error δ moves it by ≤ 2δ·max|τ̂| (δ ≤ 16ε: a float32 mean of ≤ 11 008
    squares by pairwise summation, ≤ log2 n ≈ 14 roundings, plus the square and the
    division by the total), and its K products, K sums and the division add ≤ (2K + 2)ε
    relative to max|τ̂|: 32 + 8 = 40 for K = 3."""
    eps = EPS[dtype]
    return eps * peer.abs() + 40 * eps * torch.stack(selected).abs().amax(0)


def test_sce_vs_mergekit(mergekit, mk_sce, pool3):
    """mergekit ``sce`` (``sce_mask`` top-k variance selection, ``sce_weight`` η, sum
    election with +1 at a zero sum, η-weighted mean clamped at 1e-6).

    - Selection: ``sce_select_mask`` equals mergekit's ``sce_mask`` bit for bit
      (select_topk 0.1 and 0.5; k = ⌊topk·#{var ≠ 0}⌋ is the same integer for these
      shapes in float32 and exactly; no variance ties).
    - η: mergelab sums in float64, mergekit in float32: relative |Δη| ≤ 16 ε32 asserted
      (see ``_sce_bound``; measured 1.6e-7 = 1.34 ε32).
    - Merge: not bit-identical (float32 vs float64 η; mergelab's fused ``add_(alpha=η)``
      versus mergekit's rounded products): |Δ| ≤ ``_sce_bound`` (measured ≤ 1.54 of the
      40 ε32 coefficient; max |Δ| 1.2e-7, 1 ulp of a norm weight ≈ 1). The clamp at 1e-6
      never binds here (Σ η_k a_k ≥ min η ≈ 1/3 where any expert agrees; 0 where none,
      where both give 0); a zero Σ τ̂ only occurs on unselected entries (all τ̂ = 0),
      where both give θ0.
    - ``weight_eps``: on this pool Σ_k mean(τ̂_k²) ≈ 4e-6 > 1e-6, so mergelab's default
      (``weight_eps: 0``, the paper's η) and ``weight_eps: 1e-6`` both match mergekit.
      With the task vectors scaled by 0.1 (sum ≈ 4e-8 < 1e-6) mergekit falls back to
      uniform η: mergelab's default then differs far beyond the bound (by up to ~16% of
      max|τ̂|), and ``weight_eps: 1e-6`` closes the gap to the bound.
    - In float64 the same comparison holds with ε64 (the gap is rounding only).
    """
    base, experts = pool3
    for dtype in (torch.float32, torch.float64):
        for scale in (1.0, 0.1):
            default_exceeds = False
            for name in names():
                b = base[name].to(dtype)
                ts = [b + scale * (e[name].to(dtype) - b) for e in experts]
                tv = torch.stack([t - b for t in ts])
                for topk in (0.1, 0.5, 1.0):
                    sel_mask = sce_select_mask(list(tv), topk)
                    if topk < 1:
                        peer_mask = mk_sce.sce_mask(tv, topk, dtype).bool()
                        assert torch.equal(peer_mask, sel_mask), (name, topk)
                    selected = list(tv * sel_mask)
                    peer = mk_merge(mergekit, "sce", [b, *ts], 0, select_topk=topk)
                    assert peer.dtype == dtype
                    bound = _sce_bound(peer, selected, dtype)

                    peer_eta = mk_sce.sce_weight(torch.stack(selected))
                    ml, eta, _ = sce_merge(b, ts, select_topk=topk, weight_eps=1e-6)
                    assert eta == sce_weights(selected, 1e-6)
                    pairs = zip(eta, peer_eta, strict=True)
                    rel = max(abs(a - float(c)) / float(c) for a, c in pairs)
                    assert rel <= 16 * EPS[dtype], (name, topk, rel)
                    assert ((ml - peer).abs() <= bound).all(), (name, topk, dtype)

                    ml_default, _, _ = sce_merge(b, ts, select_topk=topk)
                    if scale == 1.0:
                        assert ((ml_default - peer).abs() <= bound).all(), (name, topk)
                    else:
                        default_exceeds |= bool(((ml_default - peer).abs() > bound).any())
            if scale == 0.1:
                assert default_exceeds, dtype


# ------------------------------------------------------------------ Karcher / multi-SLERP


def _sphere_bound(xs, weights, peer, coefficient):
    """coefficient·ε·(|θ| + s·Σ_k w_k|x_k|/‖x_k‖) elementwise, s = Σ_k w_k‖x_k‖ (normalised
    w): the weighted sums of unit vectors round at the scale of their terms, the
    normalisations and the final scale by s at the scale of the result."""
    eps = EPS[peer.dtype]
    total = sum(weights)
    w = [wi / total for wi in weights]
    norms = [float(x.norm()) for x in xs]
    s = sum(wi * n for wi, n in zip(w, norms, strict=True))
    terms = sum(wi * x.abs() / n for wi, x, n in zip(w, xs, norms, strict=True))
    return coefficient * eps * (peer.abs() + s * terms)


def _karcher_triples(dtype):
    """(pool of 3 nearby experts, and asymmetric far-apart triples a, b, a + 0.3c whose
    Karcher mean is off the normalised arithmetic mean, so the iteration runs)."""
    _, near = make_pool(13, 3)
    far = [make_pool(s, 0)[0] for s in (20, 21, 22)]
    out = []
    for name in names():
        xs = [e[name].to(dtype) for e in near]
        a, b, c = (f[name].to(dtype) for f in far)
        if a.dim() == 1:  # 1 + noise norms are colinear; use the noise
            a, b, c = a - 1, b - 1, c - 1
        out.append((name, xs, [a, b, a + 0.3 * c]))
    return out


def test_karcher_vs_mergekit(mergekit):
    """mergekit ``karcher`` (equal weights, no base, max_iter 10, tol 1e-5).

    - Two experts: bit-identical. The start, the normalised mean of the two unit
      vectors, is their geodesic midpoint, so ‖T‖ < tol and no step is taken, and
      α = 1/2 makes mergekit's ``mean += α·u`` and mergelab's fused ``add_(u, alpha=α)``
      round alike.
    - Three experts: α = 1/3 rounds differently in the two forms, and the iteration
      (float32 ``arccos``/``sin`` tensors in mergekit, float64 scalars in mergelab) adds
      relative errors of a few ε per step on corrections of size ‖T‖: asserted
      |Δ| ≤ ``_sphere_bound`` with coefficient 4 (measured ≤ 2.0; ≤ 2.4 in float64; max |Δ|
      2.4e-7 on the norm weights ≈ 1, 1.5e-8 elsewhere), for the nearby pool (0 steps) and for
      asymmetric far-apart triples (2–3 steps taken, asserted ≥ 1).
    - In float64 (mergekit switches its work dtype to float64) the gap closes to the
      same bound with ε64.
    """
    _, experts = make_pool(12, 2)
    for name in names():
        ts = [e[name] for e in experts]
        ml, info = karcher_mean(ts)
        assert info.iterations == 0 and info.converged
        assert torch.equal(ml, mk_merge(mergekit, "karcher", ts)), name
    for dtype in (torch.float32, torch.float64):
        for name, near, far in _karcher_triples(dtype):
            for xs in (near, far):
                peer = mk_merge(mergekit, "karcher", xs)
                assert peer.dtype == dtype
                ml, info = karcher_mean(xs)
                if xs is far:
                    assert info.iterations >= 1 and info.converged, name
                bound = _sphere_bound(xs, [1.0] * 3, peer, 4)
                assert ((ml - peer).abs() <= bound).all(), (name, dtype)


def test_multislerp_vs_mergekit(mergekit, pool3):
    """mergekit ``multislerp`` (weights normalised, eps 1e-8, with and without a base).

    Same formula and eps; not bit-identical for any input here: mergekit keeps the
    tangent norm, cos and sin as float32 tensors and sums by ``(u·w).sum(0)`` reductions,
    mergelab uses fused ``add_(alpha=w)`` and float64 scalars. Asserted
    |Δ| ≤ ``_sphere_bound`` with coefficient 8 (the chain has ~8 rounded steps: unit
    vectors, mean, its norm, dots, tangent, its norm, cos/sin, scale; measured ≤ 1.8
    without a base, ≤ 3.3 with one, where θ0 + result adds a rounding at |θ0|; ≤ 3.1 in
    float64; the last bits vary with the thread count; max |Δ| 2.4e-7 on norm weights
    ≈ 1), for weights [1, 1, 1], [1, 2, 1], [0.2, 0.5, 0.3], raw
    weights (mergelab ``origin: zero``) and around the base (``origin: base``, i.e.
    ``multislerp(θk − θ0) + θ0``). In float64 the gap closes to the bound with ε64.
    """
    base, experts = pool3
    for dtype in (torch.float32, torch.float64):
        for w in ([1.0, 1.0, 1.0], [1.0, 2.0, 1.0], [0.2, 0.5, 0.3]):
            for name in names():
                b, ts = base[name].to(dtype), [e[name].to(dtype) for e in experts]
                peer = mk_merge(mergekit, "multislerp", ts, weight=w)
                assert peer.dtype == dtype
                ml = multislerp(ts, w)
                assert ((ml - peer).abs() <= _sphere_bound(ts, w, peer, 8)).all(), (name, w)

                peer = mk_merge(mergekit, "multislerp", [b, *ts], 0, weight=w)
                xs = [t - b for t in ts]
                ml = multislerp(xs, w) + b
                assert ((ml - peer).abs() <= _sphere_bound(xs, w, peer, 8)).all(), (name, w)


# ---------------------------------------------------------------- TSV / Iso-C / Iso-CTS


def _cond(a: torch.Tensor) -> float:
    s = torch.linalg.svdvals(a.double())
    return float(s[0] / s[-1])


def _gap(a: torch.Tensor, r: int) -> float:
    """σ1 / (σ_r − σ_r+1): how much rounding the top-r subspace of ``a`` amplifies."""
    s = torch.linalg.svdvals(a.double())
    return float(s[0] / (s[r - 1] - s[r])) if r < s.numel() else 1.0


def _svd_rel_bound(kappa: float, dtype) -> float:
    """Relative Frobenius bound ε·(64 + 2κ) for two SVD pipelines that compute the same
    matrix function with different call orders: LAPACK's backward-stable SVD and the
    products around it err by a modest multiple of ε·‖A‖ (the 64; measured 9–22 ε32 on
    well-conditioned weights), and by Wedin's sin Θ theorem a truncation at rank r or an
    orthogonal polar factor turns that into a subspace error ≈ ε·κ, κ the largest
    σ1/gap or σ1/σ_min of the decompositions involved (measured ≤ 0.4 κ ε32)."""
    return EPS[dtype] * (64 + 2 * kappa)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _mean_bound(ts, dtype):
    """|Δ| ≤ 6K·ε·max_k|τk| between Σ τk / K and fusion-bench's running mean
    v ← v + (τk − v)/(k + 1): ≤ 3 roundings per update, each at the scale of max|τk|,
    plus K for the sum and the division (measured ≤ 0.36 ε32·max|τ|)."""
    return 6 * len(ts) * EPS[dtype] * torch.stack(ts).abs().amax(0)


def test_tsv_merge_vs_fusion_bench(fb_new, pool3):
    """fusion-bench TSVM (``compute_and_sum_svd_mem_reduction``, 3 tasks, CPU).

    - Same algorithm and sizes (r = ⌊min(m, n)/K⌋: 21 here), but different calls:
      fusion-bench zero-pads the stacked U, S, V to min(m, n) columns (64 vs 63) and
      multiplies ``multi_dot(Pu, Qu, diag S, Pv, Qv)``; mergelab builds the compact stack
      and computes (U⊥·S) @ V⊥ᵀ. Relative Frobenius difference ≤ ``_svd_rel_bound`` with
      κ = max over the tasks of σ1/(σ_r − σ_r+1) and of cond(U stack), cond(V stack)
      (measured 16–60 ε32, ≤ 0.26 of the bound, max |Δ| 1.9e-7 on k_proj, whose U stack
      has cond ≈ 510).
    - ``rank_rtol``: every task vector and stack here is full rank far above the
      default cut (max(m, n)·ε32·σ1), so the default and ``rank_rtol: 0`` (fusion-bench's
      arithmetic, every triplet) are bit-identical; they differ only on rank-deficient
      inputs, where fusion-bench's kept null directions are arbitrary.
    - Other tensors (norms): fusion-bench's running mean vs mergelab's Σ τk / K:
      |Δ| ≤ ``_mean_bound``.
    - In float64 the gap closes to the same bounds with ε64.
    Both sides run on one thread (LAPACK's bits depend on the thread count).
    """
    base, experts = pool3
    for dtype in (torch.float32, torch.float64):
        taus = taus_of(base, experts, dtype)
        with one_thread():
            peer = fb_new.tsvm.compute_and_sum_svd_mem_reduction(taus, accelerator="cpu")
            for name in names():
                ts = [t[name] for t in taus]
                assert peer[name].dtype == dtype
                if ts[0].dim() != 2:
                    ml = other_rule(ts, "mean")
                    assert ((ml - peer[name]).abs() <= _mean_bound(ts, dtype)).all(), name
                    continue
                ml = tsv_delta(ts)
                assert torch.equal(ml, tsv_delta(ts, 0.0)), name
                r = min(ts[0].shape) // len(ts)
                us = [torch.linalg.svd(t.double(), full_matrices=False) for t in ts]
                kappa = max(
                    max(_gap(t, r) for t in ts),
                    _cond(torch.cat([u[:, :r] for u, _, _ in us], 1)),
                    _cond(torch.cat([vh[:r] for _, _, vh in us], 0)),
                )
                assert _rel(ml, peer[name]) <= _svd_rel_bound(kappa, dtype), (name, dtype)


def test_iso_c_vs_fusion_bench(fb_new, pool3):
    """fusion-bench ``iso_c`` (CPU): Δ = σ̄·U Vᵀ of Σ τk.

    - Other tensors (norms): both compute ``sum(τ) / K`` alike: bit-identical.
    - 2-D weights: fusion-bench forms (Σ τk / K)·K (rounding the sum twice more) and
      ``multi_dot(U, diag(σ̄), Vᵀ)``; mergelab σ̄·(U @ Vᵀ) on Σ τk. Relative Frobenius
      difference ≤ ``_svd_rel_bound`` with κ = cond(Σ τk) (the polar factor's
      sensitivity; measured 9–13 ε32, ≤ 0.13 of the bound, max |Δ| 4.8e-8).
      ``rank_rtol: 0`` (fusion-bench's arithmetic) is bit-identical to the default here:
      Σ τk is far from rank-deficient.
    - In float64 the gap closes to the bound with ε64.
    """
    base, experts = pool3
    for dtype in (torch.float32, torch.float64):
        taus = taus_of(base, experts, dtype)
        with one_thread():
            peer = fb_new.iso.iso_c(taus, accelerator="cpu")
            for name in names():
                ts = [t[name] for t in taus]
                if ts[0].dim() != 2:
                    assert torch.equal(other_rule(ts, "mean"), peer[name]), name
                    continue
                total = torch.stack(ts).sum(0)
                ml = iso_c_delta(total)
                assert torch.equal(ml, iso_c_delta(total, 0.0)), name
                bound = _svd_rel_bound(_cond(total), dtype)
                assert _rel(ml, peer[name]) <= bound, (name, dtype)


def test_iso_cts_vs_fusion_bench(fb_new, pool3):
    """fusion-bench ``iso_cts`` (CPU, common_space_fraction 0.8, 3 tasks).

    - Sizes: fusion-bench's arithmetic (k = r − K·round((r − ⌊f·r⌋)/K)) gives
      (k, s) = (52, 4) for every weight here, as ``iso_cts_sizes`` does.
    - 2-D weights: same subspaces, different calls: fusion-bench projects the residual as
      (U_c U_cᵀ) @ τk, mergelab U_c @ (U_cᵀ τk); it zero-pads nothing here (52 + 3·4 =
      64) but orders the stack [tasks, common], and multiplies by ``multi_dot``. The
      top-s subspace of a residual is sensitive to its gap σ_s − σ_s+1, so the relative
      Frobenius difference is ≤ ``_svd_rel_bound`` with κ = max(σ1/gap of Σ τk at k, of
      every residual at s, cond of the U and V stacks) (measured 16–421 ε32, ≤ 0.41 of the
      bound; the largest on up_proj, where one residual has σ1/gap ≈ 1056; max |Δ| 1.8e-6).
      ``rank_rtol: 0`` is bit-identical to the default here (full rank).
    - Other tensors: fusion-bench's running mean vs Σ τk / K: ``_mean_bound``.
    - In float64 the gap closes to the same bounds with ε64.
    """
    base, experts = pool3
    for dtype in (torch.float32, torch.float64):
        taus = taus_of(base, experts, dtype)
        with one_thread():
            peer = fb_new.iso.iso_cts(taus, 0.8, accelerator="cpu")
            for name in names():
                ts = [t[name] for t in taus]
                if ts[0].dim() != 2:
                    ml = other_rule(ts, "mean")
                    assert ((ml - peer[name]).abs() <= _mean_bound(ts, dtype)).all(), name
                    continue
                ml, (k, s) = iso_cts_delta(ts, 0.8)
                assert (k, s) == iso_cts_sizes(64, 3, 0.8) == (52, 4)
                assert torch.equal(ml, iso_cts_delta(ts, 0.8, 0.0)[0]), name
                total = torch.stack(ts).sum(0).double()
                u, _, vh = torch.linalg.svd(total, full_matrices=False)
                uc = u[:, :k]
                kappas, ust, vst = [_gap(total, k)], [uc], [vh[:k]]
                for t in ts:
                    residual = t.double() - uc @ (uc.T @ t.double())
                    kappas.append(_gap(residual, s))
                    ru, _, rvh = torch.linalg.svd(residual, full_matrices=False)
                    ust.append(ru[:, :s])
                    vst.append(rvh[:s])
                kappas += [_cond(torch.cat(ust, 1)), _cond(torch.cat(vst, 0))]
                bound = _svd_rel_bound(max(kappas), dtype)
                assert _rel(ml, peer[name]) <= bound, (name, dtype, _rel(ml, peer[name]))


# ------------------------------------------------------------------------------- EMR


def _emr_plugin(base, experts, rescale):
    """mergelab's EMR plugin after its statistics pass, for experts a, b, c."""
    m = EMRMerging(rescale=rescale)
    m.setup(["a", "b", "c"], 0)
    for name in names():
        m.observe(0, name, base[name], dict(zip("abc", (e[name] for e in experts), strict=True)))
    m.end_pass(0)
    return m


def test_emr_vs_fusion_bench(fb_new, pool3):
    """fusion-bench ``emr_merge`` (the official EMR code's port) and its modulator's
    θ0 + τ_uni ⊙ Mk · λk (``EMRTaskModulator.apply``: ``param.add_(τ_uni * Mk * λk)``).

    - τ_uni and the masks Mk: bit-identical (continuous task vectors: Σ τk ≠ 0).
    - Rescalers: fusion-bench accumulates per-tensor ``mean|·|`` in float32;
      mergelab's ``rescale: official`` the same sums in float64: relative |Δλ| ≤ 32 ε32
      (a float32 ``mean`` of ≤ 11 008 entries, ≤ log2 n ≈ 14 roundings, then 12 tensor
      additions, for each of the two sums of the ratio; measured 0.84 ε32). mergelab's
      default ``rescale: paper`` (Σ|·| over every entry) is a different estimator:
      it differs by far more (measured 1.4e-3–8e-3 relative).
    - Task models: with fusion-bench's (float32) λk, ``emr_model`` is bit-identical to
      fusion-bench's modulator; the plugin's own models (float64 λk) differ by that
      rescaler rounding only: |Δ| ≤ ε32·|θ| + 33 ε32·λk·|τ_uni ⊙ Mk|.
    - Zero sums: fusion-bench elects −1 where Σ τk = 0 (``(x > 0)·2 − 1``), mergelab 0.
      On a dyadic grid (exact sums, many zero sums), fusion-bench's τ_uni equals
      mergelab's off the zero-sum entries; on them it is −max{|τk| : τk < 0} (0 if no
      τk < 0) and mergelab's is 0, and fusion-bench's masks add exactly the zero-sum
      entries with τk < 0.
    """
    base, experts = pool3
    taus = taus_of(base, experts)
    unified, masks, rescalers = fb_new.emr.emr_merge(taus)
    official = _emr_plugin(base, experts, "official")
    paper = _emr_plugin(base, experts, "paper")
    for k, e in enumerate("abc"):
        ref = float(rescalers[k])
        assert abs(official.rescalers[e] - ref) <= 32 * EPS32 * ref, e
        assert abs(paper.rescalers[e] - ref) > 1e3 * EPS32 * ref, e
    for name in names():
        ts = [t[name] for t in taus]
        uni = emr_unify(ts)
        assert torch.equal(uni, unified[name]), name
        ms = emr_masks(ts, uni)
        for k, e in enumerate("abc"):
            assert torch.equal(ms[k], masks[name][k]), (name, e)
            param = base[name].clone()
            param.add_(unified[name] * masks[name][k] * rescalers[k])
            assert torch.equal(emr_model(base[name], uni, ms[k], float(rescalers[k])), param)
            official.task = e
            own = official.merge_tensor(
                name, base[name], dict(zip("abc", (x[name] for x in experts), strict=True))
            )
            bound = EPS32 * param.abs() + 33 * EPS32 * float(rescalers[k]) * (uni * ms[k]).abs()
            assert ((own - param).abs() <= bound).all(), (name, e)

    # dyadic grid: exact sums, zero sums common
    g = torch.Generator().manual_seed(12)
    shape = (64, 64)
    grid = [{"w": torch.randint(-3, 4, shape, generator=g).float() / 1024} for _ in range(3)]
    ts = [t["w"] for t in grid]
    fb_uni, fb_masks, _ = fb_new.emr.emr_merge(grid)
    uni = emr_unify(ts)
    tv = torch.stack(ts)
    zero = tv.sum(0) == 0
    assert zero.any() and (zero & (tv < 0).any(0)).any()
    assert torch.equal(fb_uni["w"][~zero], uni[~zero])
    assert (uni[zero] == 0).all()
    neg_max = torch.where(tv < 0, tv.abs(), torch.zeros_like(tv)).amax(0)
    assert torch.equal(fb_uni["w"][zero], -neg_max[zero])
    for k, m in enumerate(emr_masks(ts, uni)):
        assert torch.equal(fb_masks["w"][k], m | (zero & (ts[k] < 0)))
