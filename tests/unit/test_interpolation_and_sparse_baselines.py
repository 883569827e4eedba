"""SLERP, Model Stock, Model Breadcrumbs and Consensus TA on hand-computed tensors, and
through their Hydra configs."""

from __future__ import annotations

import math

import pytest
import torch
from _drive import drive, instantiate_conf

from methods.breadcrumbs import Breadcrumbs, breadcrumbs_mask, breadcrumbs_merge
from methods.consensus import ConsensusTA, consensus_merge, tall_masks
from methods.model_stock import model_stock, model_stock_ratio
from methods.slerp import slerp

R = math.sqrt(0.5)


def test_slerp_on_the_unit_circle_and_its_ends():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(slerp(0.5, a, b), torch.tensor([R, R]))
    assert torch.equal(slerp(0.0, a, b), a) and torch.allclose(slerp(1.0, a, b), b, atol=1e-7)
    third = slerp(1 / 3, 2 * a, 2 * b)  # angle π/6 from a; norm 2 kept when norms agree
    assert torch.allclose(third, 2 * torch.tensor([math.cos(math.pi / 6), 0.5]))


def test_slerp_of_colinear_tensors_is_linear():
    a = torch.tensor([1.0, 2.0])
    assert torch.equal(slerp(0.25, a, 2 * a), 0.75 * a + 0.25 * (2 * a))
    # a zero tensor is left unnormalised: its dot with anything is 0, so Ω = π/2
    assert torch.allclose(slerp(0.5, torch.zeros(2), a), R * a)


def test_slerp_plugin_picks_members_and_refuses_ambiguity():
    base = {"w": torch.tensor([0.0, 0.0])}
    experts = {"a": {"w": torch.tensor([1.0, 0.0])}, "b": {"w": torch.tensor([0.0, 1.0])}}
    out = drive(instantiate_conf("slerp"), base, experts)
    assert torch.allclose(out["w"], torch.tensor([R, R]))
    with_base = drive(instantiate_conf("slerp", models=["base", "a"], t=1.0), base, experts)
    assert torch.allclose(with_base["w"], experts["a"]["w"])
    three = {**experts, "c": {"w": torch.tensor([1.0, 1.0])}}
    with pytest.raises(ValueError, match="method.models"):
        drive(instantiate_conf("slerp"), base, three)
    with pytest.raises(ValueError, match="two different pool members"):
        drive(instantiate_conf("slerp", models=["a", "poetry"]), base, three)


def test_model_stock_ratio_and_merge_by_hand():
    zero = torch.zeros(2)
    orth = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]
    assert model_stock_ratio(orth) == 0.0  # orthogonal: stay at the base
    merged, t = model_stock(zero, [torch.tensor([1.0, 0.0])] * 2)
    assert t == pytest.approx(1.0) and torch.allclose(merged, torch.tensor([1.0, 0.0]))
    merged, t = model_stock(zero, [torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])])
    c = R  # cos 45°
    assert t == pytest.approx(2 * c / (1 + c), rel=1e-6)
    assert torch.allclose(merged, t * torch.tensor([1.0, 0.5]))
    three = [
        torch.tensor([1.0, 0.0, 0.0]),
        torch.tensor([0.0, 1.0, 0.0]),
        torch.tensor([1.0, 1.0, 0.0]),
    ]
    cos = (0.0 + R + R) / 3  # mean of the three pairwise cosines
    assert model_stock_ratio(three) == pytest.approx(3 * cos / (1 + 2 * cos), rel=1e-6)


def test_model_stock_plugin_reports_its_ratios():
    method = instantiate_conf("model_stock")
    base = {"w": torch.zeros(2)}
    drive(
        method, base, {"a": {"w": torch.tensor([1.0, 0.0])}, "b": {"w": torch.tensor([1.0, 0.0])}}
    )
    assert method.report()["t_min"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least two experts"):
        drive(instantiate_conf("model_stock"), base, {"a": {"w": torch.ones(2)}})


TAU = torch.tensor([0.1, -0.5, 0.3, 2.0, -0.05, 0.2, 0.4, -0.01, 0.6, 1.0])


def test_breadcrumbs_mask_drops_both_ends():
    # sorted |τ|: .01 .05 .1 .2 | .3 .4 .5 .6 1.0 | 2.0: keep 5, drop the top 1 and bottom 4
    kept = breadcrumbs_mask(TAU, density=0.5, gamma=0.1).nonzero().flatten().tolist()
    assert kept == [1, 2, 6, 8, 9]
    # d + γ > 1: the outlier cut shrinks (2 → 1) so that ⌊d·n⌋ = 9 entries remain
    mask = breadcrumbs_mask(TAU, density=0.95, gamma=0.2)
    assert mask.sum() == 9 and not mask[3] and mask[7]  # the largest goes, the smallest stays
    assert breadcrumbs_mask(TAU, density=1.0, gamma=0.1).all()


def test_breadcrumbs_sum_and_sign_election_by_hand():
    base = torch.zeros(3)
    e1, e2 = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 1.0, -0.1])
    # density 2/3, γ 1/3 on n = 3: keep 2, drop the largest 1 → drop the largest and none
    # below: e1 keeps [1, 0.5] (index 0, 2), e2 keeps [1, -0.1] (index 1, 2)
    m1 = breadcrumbs_mask(e1, 2 / 3, 1 / 3)
    m2 = breadcrumbs_mask(e2, 2 / 3, 1 / 3)
    assert m1.tolist() == [True, False, True] and m2.tolist() == [False, True, True]
    out = breadcrumbs_merge(
        base, [e1, e2], density=2 / 3, gamma=1 / 3, scaling=0.5, weights=[1.0, 1.0]
    )
    assert torch.allclose(out, 0.5 * torch.tensor([1.0, 1.0, 0.4]))
    ties = breadcrumbs_merge(
        base,
        [e1, e2],
        density=2 / 3,
        gamma=1 / 3,
        scaling=1.0,
        weights=[1.0, 1.0],
        sign_election=True,
    )
    # signs: [+, +, +(0.5 − 0.1)]; index 2 keeps only e1's agreeing 0.5
    assert torch.allclose(ties, torch.tensor([1.0, 1.0, 0.5]))


def test_breadcrumbs_configs_and_option_errors():
    assert instantiate_conf("breadcrumbs").sign_election is False
    assert instantiate_conf("breadcrumbs_ties").sign_election is True
    with pytest.raises(ValueError, match="method.gamma"):
        Breadcrumbs(gamma=1.0)
    with pytest.raises(ValueError, match="method.density"):
        Breadcrumbs(density=0.0)


def test_consensus_by_hand():
    base = torch.zeros(3)
    t1, t2 = torch.tensor([1.0, 0.1, 1.0]), torch.tensor([1.0, 1.0, -0.2])
    m1, m2 = tall_masks([t1, t2], 0.6)
    assert m1.tolist() == [True, False, True] and m2.tolist() == [True, True, False]
    merged, kept = consensus_merge(base, [t1, t2], mask_lambda=0.6, min_agreement=2, scaling=0.3)
    assert kept == 1 and torch.allclose(merged, torch.tensor([0.6, 0.0, 0.0]))
    merged, kept = consensus_merge(base, [t1, t2], mask_lambda=0.6, min_agreement=1, scaling=1.0)
    assert kept == 3 and torch.allclose(merged, torch.tensor([2.0, 1.1, 0.8]))


def test_consensus_plugin_checks_its_options():
    base = {"w": torch.zeros(3)}
    experts = {
        "a": {"w": torch.tensor([1.0, 0.1, 1.0])},
        "b": {"w": torch.tensor([1.0, 1.0, -0.2])},
    }
    method = instantiate_conf("consensus_ta")
    out = drive(method, base, experts)
    assert torch.allclose(out["w"], torch.tensor([0.6, 0.0, 0.0]))
    assert method.report() == {"kept_fraction": pytest.approx(1 / 3)}
    with pytest.raises(ValueError, match="exceeds the pool's 2 experts"):
        drive(instantiate_conf("consensus_ta", min_agreement=3), base, experts)
    with pytest.raises(ValueError, match="method.min_agreement must be an integer >= 1"):
        ConsensusTA(min_agreement=0)
