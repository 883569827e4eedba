"""DELLA (MAGPRUNE + TIES election or a sum) and SCE (select, calculate, erase) on
hand-computed tensors, and through their Hydra configs."""

from __future__ import annotations

import pytest
import torch
from _drive import drive, instantiate_conf

from core.dropout import mask_seed
from methods.dare import DARELinear, DARETies
from methods.della import (
    DELLA,
    della_merge,
    magprune,
    magprune_keep_probabilities,
    magprune_uniforms,
)
from methods.sce import SCE, floor_fraction, sce_merge, sce_select_mask, sce_weights
from methods.ties import ties_merge


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def _pool(seed: int = 0, shapes=((6, 5), (7,))) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    base = {f"w{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    experts = {
        e: {n: b + 0.1 * torch.randn(b.shape, generator=g) for n, b in base.items()}
        for e in ("math", "code", "safety")
    }
    return base, experts


# ------------------------------------------------------------------------ MAGPRUNE


def test_keep_probabilities_rise_with_the_rank_in_each_row():
    # row 0 ranks [0, 3, 1, 2], row 1 ranks [3, 2, 1, 0]: p = 0.4 + 0.2 · r / 3
    tau = torch.tensor([[0.1, -0.4, 0.2, 0.3], [3.0, 2.0, 1.0, 0.0]])
    p = magprune_keep_probabilities(tau, density=0.5, epsilon=0.1)
    assert p.dtype == torch.float64 and p.shape == tau.shape
    step = 0.2 / 3
    expected = [[0.4, 0.6, 0.4 + step, 0.4 + 2 * step], [0.6, 0.4 + 2 * step, 0.4 + step, 0.4]]
    assert torch.allclose(p, torch.tensor(expected, dtype=torch.float64))
    assert torch.allclose(p.mean(dim=1), torch.full((2,), 0.5, dtype=torch.float64))


def test_keep_probabilities_of_vectors_ties_and_single_entry_rows():
    # a 1-D tensor is one row: ranks [2, 0, 1], p = 0.3 + 0.4 · r / 2
    p = magprune_keep_probabilities(t(5, -1, 2), density=0.5, epsilon=0.2)
    assert torch.allclose(p, torch.tensor([0.7, 0.3, 0.5], dtype=torch.float64))
    # equal magnitudes: the lower index ranks lower (stable sort)
    tied = magprune_keep_probabilities(t(1, -1, 1), density=0.5, epsilon=0.2)
    assert torch.allclose(tied, torch.tensor([0.3, 0.5, 0.7], dtype=torch.float64))
    # rows of one entry, and ε = 0: every entry gets the density
    column = magprune_keep_probabilities(torch.ones(3, 1), 0.6, 0.2)
    assert torch.equal(column, torch.full((3, 1), 0.6, dtype=torch.float64))
    flat = magprune_keep_probabilities(t(1, 2), 0.6, 0.0)
    assert torch.equal(flat, torch.full((2,), 0.6, dtype=torch.float64))


def test_magprune_rescales_by_one_over_p_or_by_the_l1_ratio():
    tau = t(0.1, -0.4, 0.2, 0.3)
    p = magprune_keep_probabilities(tau, density=0.5, epsilon=0.1)  # [.4, .6, .4667, .5333]
    u = t(0.7, 0.5, 0.5, 0.5)  # kept iff u ≥ 1 − p = [.6, .4, .5333, .4667]
    out, keep = magprune(tau, p, u, "inverse_p")
    assert keep.tolist() == [True, True, False, True]
    assert torch.allclose(out, t(0.1 / 0.4, -0.4 / 0.6, 0.0, 0.3 / (0.4 + 0.4 / 3)))
    l1, _ = magprune(tau, p, u, "l1")  # ‖τ‖₁ = 1.0, ‖kept‖₁ = 0.8
    assert torch.allclose(l1, 1.25 * t(0.1, -0.4, 0.0, 0.3))
    none, _ = magprune(tau, p, u, "none")
    assert torch.equal(none, t(0.1, -0.4, 0.0, 0.3))
    # an all-zero tensor is left alone by the L1 rescale
    zero, _ = magprune(torch.zeros(4), p, u, "l1")
    assert torch.equal(zero, torch.zeros(4))


def test_magprune_keeps_by_magnitude_and_is_unbiased():
    tau = torch.arange(1.0, 11.0).repeat(4000, 1)  # every row ranks its columns 0 … 9
    p = magprune_keep_probabilities(tau, density=0.5, epsilon=0.3)  # 0.2 … 0.8 by column
    out, keep = magprune(tau, p, magprune_uniforms(tau.shape, mask_seed(0, "math", "w")))
    rate = keep.double().mean(dim=0)
    assert torch.allclose(rate, p[0], atol=0.03)  # binomial sd ≤ 0.008
    assert abs(keep.double().mean().item() - 0.5) < 0.01
    assert torch.allclose(out.mean(dim=0) / tau[0], torch.ones(10), atol=0.1)  # E[τ̃] = τ


# --------------------------------------------------------------------------- DELLA


def test_della_merge_by_hand():
    base = torch.zeros(3)
    e1, e2 = t(1, -3, 2), t(-2, 1, 4)
    # d = 0.5, ε = 0.25, n = 3: p ∈ {0.25, 0.5, 0.75} by rank
    # e1 ranks [0, 2, 1] → p [.25, .75, .5]; u1 keeps where u ≥ [.75, .25, .5]
    # e2 ranks [1, 0, 2] → p [.5, .25, .75]; u2 keeps where u ≥ [.5, .75, .25]
    u1, u2 = t(0.9, 0.3, 0.1), t(0.6, 0.1, 0.9)
    # τ̃1 = [1/.25, −3/.75, 0] = [4, −4, 0]; τ̃2 = [−2/.5, 0, 4/.75] = [−4, 0, 16/3]
    kw = dict(density=0.5, epsilon=0.25, weights=[1.0, 1.0])
    linear, masks = della_merge(base, [e1, e2], [u1, u2], scaling=0.5, sign_election=False, **kw)
    assert [m.tolist() for m in masks] == [[True, True, False], [True, False, True]]
    assert torch.allclose(linear, 0.5 * t(0, -4, 16 / 3))
    # signs of Σ τ̃: [0, −, +]; entry 0 has no elected sign and merges to 0
    ties, _ = della_merge(base, [e1, e2], [u1, u2], scaling=1.0, sign_election=True, **kw)
    assert torch.allclose(ties, t(0, -4, 16 / 3))


def test_della_with_zero_epsilon_is_dare_bit_for_bit():
    base, experts = _pool()
    della = DELLA(density=0.5, epsilon=0.0, scaling=1.0, sign_election=True)
    dare = DARETies(drop_rate=0.5, scaling=1.0)
    a, b = drive(della, base, experts, seed=3), drive(dare, base, experts, seed=3)
    assert all(torch.equal(a[n], b[n]) for n in base)
    lin = DELLA(density=0.5, epsilon=0.0, scaling=0.3, sign_election=False)
    a, b = drive(lin, base, experts, seed=3), drive(DARELinear(0.5, 0.3), base, experts, seed=3)
    assert all(torch.equal(a[n], b[n]) for n in base)


def test_della_at_full_density_is_ties_without_trimming():
    base, experts = _pool()
    out = drive(DELLA(density=1.0, epsilon=0.5), base, experts)
    for n, b in base.items():
        ref = ties_merge(b, [e[n] for e in experts.values()], density=1.0, scaling=1.1)
        assert torch.equal(out[n], ref)


def test_della_plugin_is_seeded_and_reports_kept_fractions():
    base, experts = _pool(shapes=((200, 50),))
    method = instantiate_conf("della")
    first = drive(method, base, experts, seed=1)
    again = drive(instantiate_conf("della"), base, experts, seed=1)
    other = drive(instantiate_conf("della"), base, experts, seed=2)
    assert torch.equal(first["w0"], again["w0"]) and not torch.equal(first["w0"], other["w0"])
    report = method.report()
    assert report["sign_election"] is True and report["rescale"] == "inverse_p"
    assert all(abs(f - 0.7) < 0.02 for f in report["kept_fraction"].values())  # sd 0.0046


def test_della_configs_and_option_errors():
    della, linear = instantiate_conf("della"), instantiate_conf("della_linear")
    assert (della.transform.density, della.transform.epsilon) == (0.7, 0.07)
    assert della.coefficients.scaling == 1.1
    assert della.sign_election is True and linear.sign_election is False
    assert linear.coefficients.scaling == 0.3
    assert instantiate_conf("della", rescale="l1").transform.rescale == "l1"
    with pytest.raises(ValueError, match="method.epsilon must keep density"):
        DELLA(density=0.9, epsilon=0.2)
    with pytest.raises(ValueError, match="method.epsilon must keep density"):
        DELLA(density=0.1, epsilon=0.1)
    with pytest.raises(ValueError, match="method.epsilon must be >= 0"):
        DELLA(epsilon=-0.01)
    with pytest.raises(ValueError, match="method.rescale"):
        DELLA(rescale="l2")
    with pytest.raises(ValueError, match="method.density"):
        DELLA(density=0.0)
    assert DELLA(density=1.0, epsilon=0.4).transform.density == 1.0  # ε ignored when nothing drops


# ----------------------------------------------------------------------------- SCE

TAUS = [t(1, 4, 0, -1), t(3, -2, 0, 1), t(2, 1, 1, -3)]
# variances per entry: [2/3, 6, 2/9, 8/3]


def test_sce_select_calculate_erase_by_hand():
    base = torch.zeros(4)
    experts = [base + x for x in TAUS]
    # top 2 of 4 by variance: entries 1 and 3; τ̂ = [0, 4, 0, −1], [0, −2, 0, 1], [0, 1, 0, −3]
    assert sce_select_mask(TAUS, 0.5).tolist() == [False, True, False, True]
    # η ∝ mean τ̂²: 17/4, 5/4, 10/4 → [17, 5, 10] / 32
    merged, eta, fraction = sce_merge(base, experts, select_topk=0.5)
    assert eta == pytest.approx([17 / 32, 5 / 32, 10 / 32]) and fraction == 0.5
    # entry 1: Σ = 3 → +, experts 1 and 3 agree; entry 3: Σ = −3 → −, experts 1 and 3
    assert torch.allclose(merged, t(0, (17 * 4 + 10) / 27, 0, (-17 - 30) / 27))
    summed, _, _ = sce_merge(base, experts, select_topk=0.5, normalize=False, scaling=2.0)
    assert torch.allclose(summed, 2.0 * t(0, 78 / 32, 0, -47 / 32))


def test_sce_without_selection_and_with_selection_for_the_weights_only():
    base = torch.ones(4)
    experts = [base + x for x in TAUS]
    # no Select: η ∝ [18, 14, 15] / 4 → [18, 14, 15] / 47
    merged, eta, fraction = sce_merge(base, experts, select_topk=1.0)
    assert eta == pytest.approx([18 / 47, 14 / 47, 15 / 47]) and fraction == 1.0
    expected = t(90 / 47, (18 * 4 + 15) / 33, 1, (-18 - 45) / 33)
    assert torch.allclose(merged, base + expected)
    # FuseChat's code: Select feeds the η ([17, 5, 10] / 32), Erase and the sum see all of τ
    merged, eta, _ = sce_merge(base, experts, select_topk=0.5, select_scope="weights_only")
    assert eta == pytest.approx([17 / 32, 5 / 32, 10 / 32])
    expected = t((17 + 5 * 3 + 10 * 2) / 32, 78 / 27, 1, -47 / 27)
    assert torch.allclose(merged, base + expected)


def test_sce_zero_sum_elects_plus_and_empty_selection_keeps_the_base():
    base = torch.zeros(2)
    merged, eta, _ = sce_merge(base, [t(1, 2), t(-1, 2)], select_topk=1.0)
    assert eta == [0.5, 0.5] and torch.equal(merged, t(1, 2))  # TIES would give 0 at entry 0
    # ⌊0.1 · 4⌋ = 0 entries selected: the tensor stays at the base, η uniform
    base = torch.full((4,), 3.0)
    merged, eta, fraction = sce_merge(base, [base + x for x in TAUS], select_topk=0.1)
    assert torch.equal(merged, base) and eta == pytest.approx([1 / 3] * 3) and fraction == 0
    # identical experts: no entry varies, nothing is selected
    same = [t(1, 2), t(1, 2)]
    assert torch.equal(sce_merge(torch.zeros(2), same, select_topk=0.5)[0], torch.zeros(2))


def test_sce_selection_ties_counts_and_weight_floor():
    # variances [1, 1, 1, 0]: 3 non-zero, equal ones taken from the lowest index
    tied = [t(1, 1, 1, 0), t(-1, -1, -1, 0)]
    assert sce_select_mask(tied, 0.5).tolist() == [True, False, False, False]  # ⌊1.5⌋
    assert sce_select_mask(tied, 0.7).tolist() == [True, True, False, False]  # ⌊2.1⌋
    assert floor_fraction(0.29, 100) == 29 and floor_fraction(0.7, 10) == 7
    small = [1e-4 * t(1, 0), 1e-4 * t(0, 2)]
    assert sce_weights(small) == pytest.approx([0.2, 0.8])
    assert sce_weights(small, weight_eps=1e-6) == [0.5, 0.5]  # mergekit's floor
    assert sce_weights([torch.zeros(2), torch.zeros(2)]) == [0.5, 0.5]


def test_sce_plugin_reports_eta_per_tensor_and_checks_options():
    base, experts = _pool(shapes=((20, 10), (7,)))
    method = instantiate_conf("sce")
    out = drive(method, base, experts)
    report = method.report()
    assert set(report["eta"]) == set(base)
    for name, eta in report["eta"].items():
        assert list(eta) == list(experts) and sum(eta.values()) == pytest.approx(1.0), name
    # ⌊0.1 · 200⌋ + ⌊0.1 · 7⌋ = 20 of 207 entries selected; the others stay at the base
    assert report["selected_fraction"] == pytest.approx(20 / 207)
    assert torch.equal(out["w1"], base["w1"])
    assert int((out["w0"] != base["w0"]).sum()) <= 20
    assert instantiate_conf("sce", select_topk=1.0).select_topk == 1.0
    with pytest.raises(ValueError, match="method.select_topk"):
        SCE(select_topk=0.0)
    with pytest.raises(ValueError, match="method.select_scope"):
        SCE(select_scope="rows")
    with pytest.raises(ValueError, match="method.weight_eps"):
        SCE(weight_eps=-1.0)
    with pytest.raises(ValueError, match="method.normalize"):
        SCE(normalize="yes")


def test_sce_refuses_a_single_expert():
    base, experts = _pool(shapes=((4, 3),))
    one = {k: experts[k] for k in list(experts)[:1]}
    with pytest.raises(ValueError, match="at least two experts"):
        drive(instantiate_conf("sce"), base, one)
