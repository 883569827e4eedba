"""mergelab's pure merge functions against mergekit 0.1.5 and fusion-bench 0.2.33.

Every test merges tiny float32 LLaMA-shaped checkpoints (``_peer_pool.LLAMA_SHAPES``) with
mergelab and with a peer's own tensor-level function, and asserts either bit-identity
(``torch.equal``) or a documented difference that the test reproduces exactly (mergelab
re-run with the peer's convention, or the peer's result built from mergelab's pieces).
Where only floating-point rounding differs (where a weight is multiplied in, float32
versus float64 angles), the test states the bound it asserts and why it holds.

Peer conventions found (each test's docstring gives the details):

- mergekit's ``Tensor.add_(x, alpha=w)``-free arithmetic: it rounds w·τ before summing,
  while mergelab's ``add_(τ, alpha=w)`` is a fused multiply-add on CPU (one rounding).
  Power-of-two weights make both exact; other weights differ by ≤ 1 rounding per term.
- TIES keep count: mergekit ``max(1, int(d·n))`` per tensor; fusion-bench (and the official
  TIES code) ``int(d·n) + 1`` over the whole flattened task vector; mergelab ⌈d·n⌉.
- mergekit TIES weights the task vectors before the sign vote; mergelab votes unweighted.
- mergekit ``dare_*`` rescales survivors by the L1 ratio ‖τ‖₁/‖m⊙τ‖₁ per tensor, and its
  ``dare_ties`` / ``breadcrumbs_ties`` default to ``normalize: false`` (sum of the agreeing
  entries instead of their mean).
"""

from __future__ import annotations

import math

import pytest
import torch
from _peer_pool import LLAMA_SHAPES, make_pool

from core.combine import disjoint_merge, elect_sign, sum_combine, ties_combine
from core.dropout import dare_keep_mask, dare_rescale, l1_rescale
from core.trim import (
    count_to_keep,
    global_kth_largest_magnitude,
    global_trim_threshold,
    kth_largest_magnitude,
    trim_by_threshold,
)
from methods.breadcrumbs import breadcrumbs_mask, breadcrumbs_merge
from methods.consensus import consensus_merge, tall_masks
from methods.dare import dare_linear_merge, dare_ties_merge
from methods.model_stock import model_stock
from methods.slerp import slerp
from methods.task_arithmetic import task_arithmetic
from methods.ties import TIES, ties_merge
from methods.weight_average import weight_average

pytestmark = pytest.mark.peers

EPS32 = torch.finfo(torch.float32).eps  # 2^-23


def names():
    return list(LLAMA_SHAPES)


def flat(sd: dict[str, torch.Tensor]) -> torch.Tensor:
    """fusion-bench's ``state_dict_to_vector`` order: keys sorted, each tensor flattened."""
    return torch.cat([sd[k].reshape(-1) for k in sorted(sd)])


def mk_merge(mergekit, method, tensors, base_index=None, **parameters):
    return mergekit.merge_methods.merge_tensors(
        tensors, method, base_index=base_index, parameters=parameters
    )


# ------------------------------------------------------------------ weight average


def test_weight_average_vs_mergekit_linear_and_fusion_bench_simple_average(mergekit, fusion_bench):
    """Identical to mergekit ``linear`` and fusion-bench ``simple_average`` for 2 and 4
    experts and for weights summing to a power of two ([1, 2, 1]).

    With 3 experts both peers compute (Σθk)/K while mergelab computes Σ (1/K)·θk (fused
    multiply-adds with α = w/Σw): the peers' result is reproduced exactly as mergelab's
    unweighted sum (``sum_combine`` on a zero base) divided by K, and mergelab differs from
    it by rounding only: |Δ| ≤ 2K·ε·max_k|θk| elementwise (measured: ≤ 1 ulp, 7.5e-9 at
    |θ| ≈ 0.06). For K a power of two, 1/K scaling is exact and the roundings coincide.
    """
    base, experts = make_pool(1, 4)
    for name in names():
        ts = [e[name] for e in experts]
        for k in (2, 4):
            ml = weight_average(ts[:k])
            assert torch.equal(ml, mk_merge(mergekit, "linear", ts[:k], weight=1.0)), name
            assert torch.equal(ml, fusion_bench.simple_average.simple_average(ts[:k])), name
        ml = weight_average(ts[:3], [1.0, 2.0, 1.0])
        assert torch.equal(ml, mk_merge(mergekit, "linear", ts[:3], weight=[1.0, 2.0, 1.0]))

        three = ts[:3]
        peer_mk = mk_merge(mergekit, "linear", three, weight=1.0)
        peer_fb = fusion_bench.simple_average.simple_average(three)
        rebuilt = sum_combine(torch.zeros_like(three[0]), three) / 3
        assert torch.equal(peer_mk, rebuilt) and torch.equal(peer_fb, rebuilt), name
        bound = 2 * 3 * EPS32 * torch.stack(three).abs().amax(0)
        assert ((weight_average(three) - rebuilt).abs() <= bound).all(), name

    # fusion-bench's module path (simple_average over state dicts) gives the same tensors
    avg = fusion_bench.simple_average.simple_average(experts[:2])
    for name in names():
        assert torch.equal(avg[name], weight_average([experts[0][name], experts[1][name]]))


# ------------------------------------------------------------------ task arithmetic


def test_task_arithmetic_vs_mergekit_and_fusion_bench(mergekit, fusion_bench, pool3):
    """Identical to mergekit ``task_arithmetic`` (unit weights, and power-of-two weights
    [0.5, 2, 1]) and to fusion-bench ``TaskArithmeticAlgorithm.run`` on ``nn.Module``s
    (λ = 0.3, unit weights; fusion-bench 0.2.33's ``task_arithmetic_merge`` helper raises
    a TypeError on its own keep_vars state dicts — Parameter vs Tensor — so the algorithm
    class is used).

    Other weights ([0.7, 1.3, 0.45]): mergekit rounds w·τ before summing; mergelab's
    ``add_(τ, alpha=w)`` is a fused multiply-add (one rounding). mergekit's result is
    reproduced exactly by mergelab's ``sum_combine`` on the pre-multiplied vectors
    fl(w·τ) with unit weights; mergelab's own result differs from it by at most one
    rounding of each product in the sum S = Σ w_k τ_k (|δS| ≤ K·ε·Σ|w_k τ_k|), which the
    final rounding of θ0 + λ·S can turn into one ulp of θ0: asserted
    |Δ| ≤ 2ε·(|θ0| + |θ| + K·λ·Σ_k|w_k τ_k|) (measured: ≤ 3.7e-9 at |θ0| ≈ 0.02, one
    entry of 6e-8 = 1 ulp on a norm weight ≈ 1; 0–6% of entries differ).
    """
    base, experts = pool3
    models = {"_pretrained_": _as_module(base)}
    models.update({f"expert{i}": _as_module(e) for i, e in enumerate(experts)})
    algorithm = fusion_bench.task_arithmetic.TaskArithmeticAlgorithm(scaling_factor=0.3)
    fb_merged = algorithm.run(models).state_dict()
    odd = [0.7, 1.3, 0.45]
    for name in names():
        b, ts = base[name], [e[name] for e in experts]
        ml = task_arithmetic(b, ts, 0.3)
        assert torch.equal(
            ml, mk_merge(mergekit, "task_arithmetic", [b, *ts], 0, weight=1.0, **{"lambda": 0.3})
        )
        assert torch.equal(ml, fb_merged[name]), name
        w2 = [0.5, 2.0, 1.0]
        assert torch.equal(
            task_arithmetic(b, ts, 0.3, w2),
            mk_merge(mergekit, "task_arithmetic", [b, *ts], 0, weight=w2, **{"lambda": 0.3}),
        )
        peer = mk_merge(mergekit, "task_arithmetic", [b, *ts], 0, weight=odd, **{"lambda": 0.3})
        taus = [t - b for t in ts]
        assert torch.equal(
            peer, sum_combine(b, [w * tau for w, tau in zip(odd, taus, strict=True)], 0.3)
        )
        wsum = sum(abs(w) * tau.abs() for w, tau in zip(odd, taus, strict=True))
        bound = 2 * EPS32 * (b.abs() + peer.abs() + 3 * 0.3 * wsum)
        assert ((task_arithmetic(b, ts, 0.3, odd) - peer).abs() <= bound).all(), name


def _as_module(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An ``nn.Module`` whose state dict is ``sd`` (fusion-bench merges modules)."""
    root = torch.nn.Module()
    for name, t in sd.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if not hasattr(mod, part):
                mod.add_module(part, torch.nn.Module())
            mod = getattr(mod, part)
        mod.register_parameter(leaf, torch.nn.Parameter(t.clone(), requires_grad=False))
    return root


# ------------------------------------------------------------------------------ TIES


def _trim_to_count(tau: torch.Tensor, k: int) -> torch.Tensor:
    """mergelab's trim at the k-th largest |τ| (k entries kept when |τ| has no ties)."""
    return trim_by_threshold(tau, kth_largest_magnitude(tau, k))


def test_ties_vs_mergekit_differs_only_by_keep_count(mergekit, pool3):
    """mergekit ``ties`` (magnitude top-k per tensor, ``normalize: true``) keeps
    max(1, int(d·n)) entries per tensor; mergelab per-tensor keeps ⌈d·n⌉.

    - d = 0.25 (d·n an integer for every LLaMA shape here): mergelab's own
      ``ties_merge(density=0.25)`` is bit-identical to mergekit.
    - d = 0.2 (d·n fractional for every shape: one more entry per expert and tensor in
      mergelab): mergelab trimmed at mergekit's count (``kth_largest_magnitude`` with
      int(d·n)) and combined by ``ties_combine`` is bit-identical to mergekit; mergelab's
      own merge differs on the entries the extra kept values touch (≤ 3 per tensor).
    Unit weights, λ ∈ {1, 0.7}. (mergekit elects +1 where the trimmed sum is exactly 0;
    mergelab gives 0 there; with continuous random weights that never happens off
    all-trimmed entries, where both give 0.)
    """
    base, experts = pool3
    for name in names():
        b, ts = base[name], [e[name] for e in experts]
        n = b.numel()
        for lam in (1.0, 0.7):
            peer = mk_merge(
                mergekit, "ties", [b, *ts], 0, weight=1.0, density=0.25, **{"lambda": lam}
            )
            assert int(0.25 * n) == count_to_keep(0.25, n)
            assert torch.equal(ties_merge(b, ts, density=0.25, scaling=lam), peer), name

            peer = mk_merge(
                mergekit, "ties", [b, *ts], 0, weight=1.0, density=0.2, **{"lambda": lam}
            )
            k_mk = max(1, int(0.2 * n))
            assert count_to_keep(0.2, n) == k_mk + 1
            trimmed = [_trim_to_count(t - b, k_mk) for t in ts]
            assert all(int(torch.count_nonzero(t)) == k_mk for t in trimmed)
            assert torch.equal(ties_combine(b, trimmed, lam), peer), name
            own = ties_merge(b, ts, density=0.2, scaling=lam)
            assert 0 < int((own != peer).sum()) <= 3, name
            floor = ties_merge(b, ts, density=0.2, scaling=lam, keep_count="floor")
            assert torch.equal(floor, peer), name  # the option reproduces mergekit's count


def test_ties_vs_mergekit_weighted_sign_vote(mergekit, pool3):
    """With weights [0.5, 2, 1], mergekit votes on sign(Σ w_k τ̂_k); mergelab (Algorithm 1)
    on sign(Σ τ̂_k). mergekit's result is reproduced exactly from mergelab's pieces:
    ``disjoint_merge(τ̂, elect_sign([w·τ̂]), w)``; mergelab's own merge equals mergekit
    wherever the two votes agree and differs wherever they disagree on a kept entry.
    (Power-of-two weights keep w·τ̂ exact, so no rounding difference enters; d = 0.25 keeps
    the same count in both.)
    """
    base, experts = pool3
    w = [0.5, 2.0, 1.0]
    for name in names():
        b, ts = base[name], [e[name] for e in experts]
        peer = mk_merge(mergekit, "ties", [b, *ts], 0, weight=w, density=0.25, **{"lambda": 1.0})
        trimmed = [_trim_to_count(t - b, count_to_keep(0.25, b.numel())) for t in ts]
        weighted_sign = elect_sign([wk * t for wk, t in zip(w, trimmed, strict=True)])
        assert torch.equal(b + 1.0 * disjoint_merge(trimmed, weighted_sign, w), peer), name
        own = ties_merge(b, ts, density=0.25, weights=w)
        votes_differ = (weighted_sign != elect_sign(trimmed)) & (weighted_sign != 0)
        assert torch.equal(own[~votes_differ], peer[~votes_differ]), name
        assert (own[votes_differ] != peer[votes_differ]).all(), name
        as_mergekit = ties_merge(b, ts, density=0.25, weights=w, weighted_vote=True)
        assert torch.equal(as_mergekit, peer), name


def test_ties_plugin_with_mergekit_conventions_is_mergekit(mergekit, pool3):
    """``method=ties method.trim_scope=per_tensor method.keep_count=floor
    method.sign_vote=weighted`` is mergekit's ``ties`` bit for bit (d = 0.2, where the
    keep counts differ, and unequal power-of-two weights, where the votes differ)."""
    base, experts = pool3
    w = [0.5, 2.0, 1.0]
    plugin = TIES(
        density=0.2, trim_scope="per_tensor", keep_count="floor", sign_vote="weighted", weights=w
    )
    plugin.setup(["a", "b", "c"], seed=0)
    assert plugin.stat_passes == 0
    for name in names():
        b, ts = base[name], [e[name] for e in experts]
        merged = plugin.merge_tensor(name, b, dict(zip(["a", "b", "c"], ts, strict=True)))
        peer = mk_merge(mergekit, "ties", [b, *ts], 0, weight=w, density=0.2, **{"lambda": 1.0})
        assert torch.equal(merged, peer), name


def test_ties_vs_fusion_bench_global_keep_count(fusion_bench, pool3):
    """fusion-bench ``ties_merging`` (``merge_func="mean"``) trims the whole flattened task
    vector of each model, keeping int(d·N) + 1 entries (its ``topk_values_mask`` keeps all
    |τ| ≥ the (N − int(d·N))-th smallest), as the official TIES code does; mergelab's
    global trim keeps ⌈d·N⌉. N = 65 984 here.

    - d = 0.2 (d·N = 13 196.8, fractional: int + 1 = ⌈⌉): mergelab's global TIES
      (``global_trim_threshold`` + per-tensor ``ties_merge``) is bit-identical.
    - d = 0.25 (d·N = 16 496, an integer): fusion-bench keeps one entry more per model;
      mergelab re-run with thresholds at the (int(d·N)+1)-th largest |τ| is bit-identical,
      and mergelab's own merge differs on ≤ 3 entries.
    λ = 0.3. (fusion-bench resolves a zero sign to the majority sign of the whole vector;
    that only matters where the trimmed sum is exactly 0 with non-zero entries: never here.)
    """
    base, experts = pool3
    utils = fusion_bench.ties_utils
    flat_ptm = flat(base)
    tv = torch.vstack([flat(e) for e in experts]) - flat_ptm
    N = flat_ptm.numel()
    assert N == 65984

    def mergelab_global(thresholds):
        out = {
            n: ties_merge(base[n], [e[n] for e in experts], thresholds=thresholds, scaling=0.3)
            for n in names()
        }
        return flat(out)

    taus = [[e[n] - base[n] for n in names()] for e in experts]
    for d in (0.2, 0.25):
        peer = flat_ptm + 0.3 * utils.ties_merging(tv, reset_thresh=d, merge_func="mean")
        own = mergelab_global([global_trim_threshold(t, d) for t in taus])
        k_fb = int(d * N) + 1
        if d == 0.2:
            assert count_to_keep(d, N) == k_fb
            assert torch.equal(own, peer)
        else:
            assert count_to_keep(d, N) == k_fb - 1
            rerun = mergelab_global([global_kth_largest_magnitude(t, k_fb) for t in taus])
            assert torch.equal(rerun, peer)
            assert 0 < int((own != peer).sum()) <= 3
        as_official = [global_trim_threshold(t, d, "floor_plus_one") for t in taus]
        assert torch.equal(mergelab_global(as_official), peer)  # keep_count=floor_plus_one


# ------------------------------------------------------------------------------ DARE


def _mergekit_masks(seed: int, shape, density: float, n: int) -> list[torch.Tensor]:
    """Replay the draws of mergekit's ``bernoulli`` sparsifier: one
    ``torch.bernoulli(full(density))`` per expert, in order, from the global RNG."""
    torch.manual_seed(seed)
    return [torch.bernoulli(torch.full(shape, density)).bool() for _ in range(n)]


def test_dare_rescale_rule_vs_mergekit(mergekit, pool3):
    """mergekit 0.1.5's DARE sparsifier (``random`` with ``rescale_norm=l1``) keeps each
    entry with probability d and multiplies the survivors by ‖τ‖₁/‖m⊙τ‖₁ (per tensor),
    not by 1/(1−p) = 1/d as DARE and mergelab do. With the survivors read from mergekit's
    own output, mergekit's tensor is exactly mergelab's ``rescale: l1`` rule
    (``core.dropout.l1_rescale`` of the pure mask), and mergelab's default tensor is
    (1/d)/ratio times mergekit's (≤ 1 ulp): the two rules differ by the factor
    d·‖τ‖₁/‖m⊙τ‖₁, a random variable around 1 with spread ≈ 1.15/√n for Gaussian τ at
    d = 0.3 (measured: 0.1–4.5% off for n ≥ 4096, up to 18% for the 64-entry norms;
    asserted < 5/√n).
    """
    base, experts = pool3
    sp = mergekit.sparsify
    d = 0.3
    for name in names():
        tau = experts[0][name] - base[name]
        torch.manual_seed(7)
        peer = sp.sparsify(tau, d, sp.SparsificationMethod.random, rescale_norm=sp.RescaleNorm.l1)
        keep = peer != 0
        assert torch.equal(keep, _mergekit_masks(7, tau.shape, d, 1)[0])
        masked = dare_rescale(tau, keep, 0.0)
        ratio = tau.abs().sum() / masked.abs().sum()
        assert torch.equal(peer, l1_rescale(tau, masked)), name
        ours = dare_rescale(tau, keep, 1 - d)
        factor = (1 / d) / ratio
        assert torch.allclose(ours, peer * factor, rtol=2 * EPS32, atol=0), name
        assert abs(float(factor) - 1) < 5 / math.sqrt(tau.numel()), (name, float(factor))


def test_dare_linear_and_dare_ties_vs_mergekit(mergekit, pool3):
    """Full mergekit ``dare_linear`` / ``dare_ties`` with its masks replayed from the seeded
    global RNG (``_mergekit_masks``):

    - ``rescale: false``: ``dare_linear`` is bit-identical to mergelab's
      ``dare_linear_merge`` with those masks and p = 0 (no rescale); ``dare_ties`` with
      ``normalize: true`` is bit-identical to ``dare_ties_merge`` likewise.
    - mergekit's defaults (``rescale: true``; ``dare_ties`` also ``normalize: false``) are
      rebuilt exactly from mergelab's pieces: ``rescale: l1``'s masked τ (see the rescale test)
      summed by ``sum_combine``; for ``dare_ties``, the *sum* of the sign-agreeing entries
      (mergelab's ``elect_sign`` and agreement mask), not their mean as in DARE-TIES and
      mergelab's ``dare_ties``.
    Unit weights, λ = 0.8, d = 0.4 (p = 0.6).
    """
    base, experts = pool3
    d, lam = 0.4, 0.8
    for name in names():
        b, ts = base[name], [e[name] for e in experts]
        masks = _mergekit_masks(11, b.shape, d, len(ts))
        params = dict(weight=1.0, density=d, **{"lambda": lam})

        torch.manual_seed(11)
        peer = mk_merge(mergekit, "dare_linear", [b, *ts], 0, rescale=False, **params)
        assert torch.equal(peer, dare_linear_merge(b, ts, masks, 0.0, lam)), name
        torch.manual_seed(11)
        peer = mk_merge(mergekit, "dare_ties", [b, *ts], 0, rescale=False, normalize=True, **params)
        assert torch.equal(peer, dare_ties_merge(b, ts, masks, 0.0, lam)), name

        l1 = [
            l1_rescale(t - b, dare_rescale(t - b, m, 0.0)) for t, m in zip(ts, masks, strict=True)
        ]
        torch.manual_seed(11)
        peer = mk_merge(mergekit, "dare_linear", [b, *ts], 0, **params)
        assert torch.equal(peer, sum_combine(b, l1, lam)), name
        torch.manual_seed(11)
        peer = mk_merge(mergekit, "dare_ties", [b, *ts], 0, **params)
        sign = elect_sign(l1)
        agreeing = [t * ((torch.sign(t) == sign) & (t != 0)) for t in l1]
        assert torch.equal(peer, sum_combine(b, agreeing, lam)), name
        torch.manual_seed(11)
        peer = mk_merge(mergekit, "dare_ties", [b, *ts], 0, normalize=True, **params)
        assert torch.equal(peer, ties_combine(b, l1, lam)), name


def test_dare_vs_fusion_bench_same_uniforms(fusion_bench, pool3):
    """fusion-bench's ``param_random_drop_`` keeps u > p for u = ``torch.rand_like`` from the
    global RNG and divides survivors by 1 − p: the same rescale rule as mergelab. Seeding
    the global RNG with mergelab's generator seed gives both the same uniforms; mergelab
    keeps u ≥ p, so the masks can differ only where u == p exactly (asserted absent), and
    fusion-bench's result is bit-identical to ``dare_rescale(τ, dare_keep_mask(...), p)``.
    The full DARE merges then use the same ``sum_combine`` / TIES code as fusion-bench's
    task arithmetic and TIES (see those tests).
    """
    base, experts = pool3
    p = 0.7
    for i, name in enumerate(names()):
        tau = experts[1][name] - base[name]
        seed = 1000 + i
        torch.manual_seed(seed)
        u = torch.rand_like(tau)
        assert not (u == p).any()
        param = torch.nn.Parameter(tau.clone(), requires_grad=False)
        torch.manual_seed(seed)
        fusion_bench.dare_utils.param_random_drop_(param, p, rescale=True)
        keep = dare_keep_mask(tau.shape, p, seed)
        assert torch.equal(keep, u >= p)
        assert torch.equal(param.data, dare_rescale(tau, keep, p)), name


# ----------------------------------------------------------------------------- SLERP


def _slerp_bound(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |mergelab − peer| where the peer computes the angle and the two
    factors in float32 and mergelab in float64: each factor s carries a relative error of a
    few ε (the float32 acos/sin/div chain, ~4 roundings, plus the float32 dot's error
    propagated through d(s)/d(cos Ω), which is O(1) away from Ω ≈ 0); then two products
    and a sum are rounded. 16·ε·(|s0·a| + |s1·b|) covers this with margin."""
    ua, ub = a / a.norm(), b / b.norm()
    omega = math.acos(float((ua * ub).sum()))
    s0 = math.sin((1 - t) * omega) / math.sin(omega)
    s1 = math.sin(t * omega) / math.sin(omega)
    return 16 * EPS32 * (abs(s0) * a.abs() + abs(s1) * b.abs())


def test_slerp_vs_mergekit_and_fusion_bench(mergekit, fusion_bench):
    """Both peers implement the same SLERP (dot threshold 0.9995, norm eps 1e-8, raw weights
    not task vectors).

    - Nearly colinear pairs (a model and a 1%-perturbed copy: cos > 0.9995, lerp branch):
      bit-identical to both peers.
    - Far-apart pairs (independent tensors, cos ≈ 0, the spherical branch): mergelab
      computes the angle and factors in float64, mergekit (torch float32 tensors) and
      fusion-bench (torch float32 0-d tensors) in float32, so results differ by rounding:
      asserted |Δ| ≤ 16·ε·(|s0·a| + |s1·b|) (see ``_slerp_bound``); measured
      ≤ 1.7·ε·(|a| + |b|), and bit-identical on about a third of the tensors. The peers
      agree with each other bit-for-bit on most but not all tensors.
    t ∈ {0.3, 0.5}.
    """
    base, _ = make_pool(3, 0)
    g = torch.Generator().manual_seed(3)
    near = {n: w + 2e-4 * torch.randn(w.shape, generator=g) for n, w in base.items()}
    far_a, far_b = make_pool(4, 0)[0], make_pool(5, 0)[0]
    fb_slerp = fusion_bench.slerp_utils.slerp
    for name in names():
        for t in (0.3, 0.5):
            a, b = base[name], near[name]
            ua, ub = a / a.norm(), b / b.norm()
            assert float((ua * ub).sum()) > 0.9995
            ml = slerp(t, a, b)
            assert torch.equal(ml, mk_merge(mergekit, "slerp", [a, b], 0, t=t)), name
            assert torch.equal(ml, fb_slerp(t, a, b)), name

            a, b = far_a[name], far_b[name]
            if name.endswith("norm.weight") or "layernorm" in name:
                a, b = a - 1.0, b - 1.0  # 1 + noise norms are colinear; use the noise
            ua, ub = a / a.norm(), b / b.norm()
            assert abs(float((ua * ub).sum())) < 0.9995
            ml = slerp(t, a, b)
            bound = _slerp_bound(t, a, b)
            for peer in (mk_merge(mergekit, "slerp", [a, b], 0, t=t), fb_slerp(t, a, b)):
                assert ((ml - peer).abs() <= bound).all(), (name, t, float((ml - peer).abs().max()))


# ----------------------------------------------------------------------- Model Stock


def test_model_stock_vs_mergekit(mergekit):
    """Identical to mergekit ``model_stock`` (per tensor, not ``filter_wise``): both use the
    mean over pairs of the task vectors' cosines (norm product clamped at 1e-6, cosine
    clamped to [−1, 1]) and t = k·cos/(1 + (k−1)·cos), for 2 and 3 experts.
    (mergekit also maps |1 + (k−1)·cos| < 1e-6 to t = 0; that singular case is not hit.)
    fusion-bench's Model Stock averages the pairwise *angles* (in degrees) and adds 1e-8
    to the denominator — a different estimator, not compared.
    """
    for k in (2, 3):
        base, experts = make_pool(6 + k, k)
        for name in names():
            b, ts = base[name], [e[name] for e in experts]
            ml, _ = model_stock(b, ts)
            assert torch.equal(ml, mk_merge(mergekit, "model_stock", [b, *ts], 0)), (k, name)


# ----------------------------------------------------------------------- Breadcrumbs


def test_breadcrumbs_vs_mergekit(mergekit, pool3):
    """mergekit ``breadcrumbs`` (``magnitude_outliers``: drop the int(γ·n) largest and the
    smallest |τ|, keep int(d·n)) and mergelab's ⌊⌋ counts are the same: the masks and the
    merges are bit-identical (d = 0.7, γ = 0.05, λ = 0.3, unit and power-of-two weights),
    also when d + γ > 1 (d = 0.98, γ = 0.05: the outlier cut shrinks to 1 − d).

    ``breadcrumbs_ties``: with ``normalize: true`` bit-identical to mergelab's
    ``sign_election=True`` (TIES' disjoint mean). mergekit's default ``normalize: false``
    adds the *sum* of the sign-agreeing entries instead of their mean; rebuilt exactly
    from mergelab's masks, ``elect_sign`` and ``sum_combine``.
    """
    base, experts = pool3
    for name in names():
        b, ts = base[name], [e[name] for e in experts]
        for d, g in ((0.7, 0.05), (0.98, 0.05)):
            tau = ts[0] - b
            peer_masked = mergekit.sparsify.magnitude_outliers(tau, d, gamma=g)
            assert torch.equal(peer_masked != 0, breadcrumbs_mask(tau, d, g)), name
            for w in ([1.0, 1.0, 1.0], [0.5, 2.0, 1.0]):
                peer = mk_merge(
                    mergekit,
                    "breadcrumbs",
                    [b, *ts],
                    0,
                    weight=w,
                    density=d,
                    gamma=g,
                    **{"lambda": 0.3},
                )
                ml = breadcrumbs_merge(b, ts, density=d, gamma=g, scaling=0.3, weights=w)
                assert torch.equal(ml, peer), (name, d, w)

        d, g, w = 0.7, 0.05, [1.0, 1.0, 1.0]
        peer = mk_merge(
            mergekit, "breadcrumbs_ties", [b, *ts], 0, weight=w, density=d, gamma=g, normalize=True
        )
        ml = breadcrumbs_merge(
            b, ts, density=d, gamma=g, scaling=1.0, weights=w, sign_election=True
        )
        assert torch.equal(ml, peer), name
        peer = mk_merge(mergekit, "breadcrumbs_ties", [b, *ts], 0, weight=w, density=d, gamma=g)
        masked = [(t - b) * breadcrumbs_mask(t - b, d, g) for t in ts]
        sign = elect_sign(masked)
        agreeing = [m * ((torch.sign(m) == sign) & (m != 0)) for m in masked]
        assert torch.equal(peer, sum_combine(b, agreeing, 1.0)), name


# ------------------------------------------------------------------- Consensus / TALL


def test_consensus_tall_masks_vs_fusion_bench(fusion_bench):
    """fusion-bench's TALL mask (``tall_mask.utils.generate_task_masks``, a port of the
    official code) is m_t = |θ0 − θt| > λ·|θ0 + τ_MTL − θt|, computed on weights; mergelab's
    is |τt| ≥ λ·|τ_MTL − τt| on task vectors. Two differences, both reproduced:

    - strict > versus ≥: on a dyadic grid (every weight a multiple of 2^-10, all sums
      exact, λ = 0.5) the two sides tie often; fusion-bench's mask equals mergelab's mask
      minus the exact ties, and the consensus merge (min_agreement 2, α = 0.3) built
      from fusion-bench's masks equals mergelab's ``consensus_merge`` wherever no tie
      changed a vote count.
    - weights versus task vectors on continuous random checkpoints (λ = 0.6): the two
      right-hand sides are the same number up to float32 rounding, so the masks agree
      except where |τt| and λ·|τ_MTL − τt| are within 4 ulp of each other.
    The consensus count (Σ masks ≥ k) and θ0 + α·τ_MTL⊙mask are then identical in form
    to fusion-bench's ``construct_consensus_mask`` (which only reads masks from disk).
    """
    gen = fusion_bench.tall_mask_utils.generate_task_masks
    # dyadic grid: exact arithmetic, ties between the two sides
    g = torch.Generator().manual_seed(8)
    shape = (172, 64)
    base = torch.randint(-64, 64, shape, generator=g).float() / 1024
    experts = [base + torch.randint(-8, 9, shape, generator=g).float() / 1024 for _ in range(3)]
    taus = [e - base for e in experts]
    tv = torch.stack(taus)
    fb = gen(tv, torch.stack(experts), base, tall_mask_lambda=0.5)
    ml = tall_masks(taus, 0.5)
    total = tv.sum(0)
    for k in range(3):
        tie = taus[k].abs() == 0.5 * (total - taus[k]).abs()
        assert tie.any()
        assert torch.equal(fb[k], ml[k] & ~tie)
    votes_fb = fb.sum(0)
    keep_fb = votes_fb >= 2
    merged_fb = base + 0.3 * (total * keep_fb)
    merged_ml, _ = consensus_merge(base, experts, mask_lambda=0.5, min_agreement=2, scaling=0.3)
    same_votes = torch.stack(ml).sum(0) == votes_fb
    assert torch.equal(merged_fb[same_votes], merged_ml[same_votes])

    # continuous weights: agreement up to rounding at the comparison
    base_sd, experts_sd = make_pool(9, 3)
    for name in names():
        b, ts = base_sd[name], [e[name] for e in experts_sd]
        taus = [t - b for t in ts]
        tv = torch.stack(taus)
        fb = gen(tv, torch.stack(ts), b, tall_mask_lambda=0.6)
        ml = torch.stack(tall_masks(taus, 0.6))
        lhs = tv.abs()
        rhs = 0.6 * (tv.sum(0) - tv).abs()
        close = (lhs - rhs).abs() <= 4 * EPS32 * torch.maximum(lhs, b.abs() + tv.abs().sum(0))
        assert torch.equal(fb[~close], ml[~close]), name
