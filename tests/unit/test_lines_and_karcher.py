"""LiNeS and the Karcher mean / multi-SLERP on hand-computed tensors, and through their
Hydra configs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _drive import drive, instantiate_conf

from core.layers import block_index, layer_group
from methods.karcher import KarcherMerge, karcher_mean, multislerp
from methods.lines import LiNeS, lines_alpha, lines_lambda

R = math.sqrt(0.5)


def _circle(angle: float, radius: float = 1.0) -> torch.Tensor:
    return radius * torch.tensor([math.cos(angle), math.sin(angle)])


# ---------------------------------------------------------------------------- LiNeS


def test_block_index_and_groups():
    assert block_index("model.layers.11.mlp.up_proj.weight") == 11
    assert block_index("model.norm.weight") is None
    assert layer_group("model.layers.0.self_attn.q_proj.weight") == "layers.0"
    assert layer_group("lm_head.weight") == "head"
    assert layer_group("model.embed_tokens.weight") == "embed"


def test_lines_lambda_rises_linearly_with_depth():
    # α = 0.25, β = 0.75 over L = 4 blocks: 0.25 + 0.75·(l−1)/3 for l = 1..4
    assert [lines_lambda(i, 4, 0.25, 0.75) for i in range(4)] == pytest.approx(
        [0.25, 0.5, 0.75, 1.0]
    )
    assert lines_lambda(0, 1, 0.3, 0.9) == 0.3  # one block: (l−1)/(L−1) taken as 0
    with pytest.raises(ValueError, match="outside"):
        lines_lambda(4, 4, 0.25, 0.75)
    assert lines_alpha(4, 2.0, 2.0) == 0.25 and lines_alpha(2, 1.0, 0.0) == 0.5


NAMES = [
    "model.embed_tokens.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.1.mlp.up_proj.weight",
    "model.layers.2.mlp.up_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]


def _pool(tau_a: float = 1.0, tau_b: float = 2.0):
    base = {n: torch.full((2,), 0.5) for n in NAMES}
    experts = {
        "a": {n: t + tau_a for n, t in base.items()},
        "b": {n: t + tau_b for n, t in base.items()},
    }
    return base, experts


def test_lines_default_scales_the_sum_by_depth():
    base, experts = _pool()  # τ_a = 1, τ_b = 2 everywhere: τ_MTL = 3
    method = instantiate_conf("lines")
    out = drive(method, base, experts)
    # α = 1/K = 0.5 (equal weights), β = 0.5, L = 3: λ = 0.5, 0.75, 1.0 over the blocks
    expected = {
        "model.embed_tokens.weight": 0.5,
        "model.layers.0.mlp.up_proj.weight": 0.5,
        "model.layers.1.mlp.up_proj.weight": 0.75,
        "model.layers.2.mlp.up_proj.weight": 1.0,
        "model.norm.weight": 0.5,  # outside_blocks=alpha: everything outside gets α
        "lm_head.weight": 0.5,
    }
    for n, lam in expected.items():
        assert torch.allclose(out[n], torch.full((2,), 0.5 + lam * 3.0)), n
    rep = method.report()
    assert rep["alpha"] == 0.5 and rep["num_blocks"] == 3 and rep["alpha_rule"] == "paper"
    assert rep["lambda"] == {
        "embed": 0.5,
        "layers.0": 0.5,
        "layers.1": 0.75,
        "layers.2": 1.0,
        "other": 0.5,
        "head": 0.5,
    }
    json.dumps(rep)


def test_lines_by_depth_puts_the_tail_deepest_and_order_does_not_matter():
    base, experts = _pool()
    method = instantiate_conf("lines", alpha=0.2, beta=0.6, outside_blocks="by_depth")
    out = drive(method, base, experts, order=list(reversed(NAMES)))
    lam = {
        "model.embed_tokens.weight": 0.2,
        "model.layers.0.mlp.up_proj.weight": 0.2,
        "model.layers.1.mlp.up_proj.weight": 0.5,
        "model.layers.2.mlp.up_proj.weight": 0.8,
        "model.norm.weight": 0.8,
        "lm_head.weight": 0.8,
    }
    for n, v in lam.items():
        assert torch.allclose(out[n], torch.full((2,), 0.5 + v * 3.0)), n
    assert method.report()["alpha_rule"] == "given"


def test_lines_paper_alpha_uses_whole_model_l1_norms():
    # weights [1, 3]. Tensor x: τ_a = [1, 0], τ_b = [0, 1] → τ_sum = [1, 1], τ_MTL = [1, 3].
    # Tensor y: τ_a = [1], τ_b = [−1] → τ_sum = [0], τ_MTL = [−2].
    # ‖τ_sum‖₁ = 2, ‖τ_MTL‖₁ = 4 + 2 = 6 → α = (1/2)·(2/6) = 1/6 (L2 norms would give
    # (1/2)·√2/√14 instead).
    base = {"model.layers.0.x": torch.zeros(2), "model.layers.1.y": torch.zeros(1)}
    experts = {
        "a": {"model.layers.0.x": torch.tensor([1.0, 0.0]), "model.layers.1.y": torch.ones(1)},
        "b": {"model.layers.0.x": torch.tensor([0.0, 1.0]), "model.layers.1.y": -torch.ones(1)},
    }
    method = instantiate_conf("lines", weights=[1.0, 3.0], beta=1.0)
    out = drive(method, base, experts)
    alpha = 1 / 6
    assert method.report()["alpha"] == pytest.approx(alpha)
    assert method.report()["norm_ratio"] == pytest.approx(1 / 3)
    assert torch.allclose(out["model.layers.0.x"], alpha * torch.tensor([1.0, 3.0]))
    assert torch.allclose(out["model.layers.1.y"], (alpha + 1.0) * torch.tensor([-2.0]))


def test_lines_needs_its_statistics_pass_and_checks_options():
    base, experts = _pool()
    method = instantiate_conf("lines")
    method.setup(list(experts), 0)
    n = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(RuntimeError, match="statistics pass"):
        method.merge_tensor(n, base[n], {e: t[n] for e, t in experts.items()})
    method.observe(0, n, base[n], {e: t[n] for e, t in experts.items()})
    method.end_pass(0)
    deeper = "model.layers.5.mlp.up_proj.weight"
    with pytest.raises(ValueError, match="block 5"):
        method.merge_tensor(deeper, base[n], {e: t[n] for e, t in experts.items()})
    with pytest.raises(ValueError, match="method.outside_blocks"):
        LiNeS(outside_blocks="tail")
    with pytest.raises(ValueError, match="method.beta"):
        LiNeS(beta=float("nan"))
    with pytest.raises(ValueError, match="method.alpha"):
        LiNeS(alpha="x")


# -------------------------------------------------------------------------- Karcher


def test_karcher_on_the_unit_circle_is_the_mean_angle():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    merged, info = karcher_mean([a, b])
    assert torch.allclose(merged, torch.tensor([R, R]))  # the angle bisector
    # weights 2:1 on angles 0 and π/2: the Fréchet mean on a circle is the weighted mean
    # angle π/6 (the Euclidean mean (2, 1)/3 points at atan(1/2) ≈ 26.6° instead); norms
    # 1 and 4 average to (2·1 + 1·4)/3 = 2.
    merged, info = karcher_mean([a, 4 * b], [2.0, 1.0])
    assert torch.allclose(merged, _circle(math.pi / 6, 2.0), atol=1e-6)
    # on a circle log/exp are exact, so one step lands on the mean and the next stops
    assert info.iterations == 1 and info.converged
    three, _ = karcher_mean([a, a, b])  # equal weights over 0, 0, π/2 → π/6 again
    assert torch.allclose(three, _circle(math.pi / 6), atol=1e-6)


def test_multislerp_is_one_step_at_the_euclidean_mean():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # mean direction m = (2, 1)/√5; the weighted tangent parts (2/3)·sin(−φ) +
    # (1/3)·cos(φ) cancel (tan φ = 1/2), so the result stays at m, scaled by 2
    out = multislerp([a, 4 * b], [2.0, 1.0])
    assert torch.allclose(out, 2 * torch.tensor([2.0, 1.0]) / math.sqrt(5), atol=1e-6)
    assert torch.allclose(multislerp([a, b]), torch.tensor([R, R]), atol=1e-6)
    # antipodal, balanced: linear fallback Σ w x = 0
    assert torch.allclose(multislerp([a, -a]), torch.zeros(2))


def test_karcher_zero_norm_and_antipodal_tensors():
    a, b, zero = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.zeros(2)
    # the zero tensor has no direction but its norm counts: scale (0 + 1 + 1)/3
    merged, _ = karcher_mean([zero, a, b])
    assert torch.allclose(merged, (2 / 3) * torch.tensor([R, R]))
    merged, _ = karcher_mean([zero, zero])
    assert torch.equal(merged, zero)
    # a, −a: the mean of units is 0, so the start is a; −a is antipodal and skipped
    merged, info = karcher_mean([a, -a])
    assert torch.allclose(merged, a) and info.antipodal == 1 and info.converged
    same, _ = karcher_mean([2 * a, 2 * a])
    assert torch.allclose(same, 2 * a)


def test_karcher_plugin_members_origin_and_report():
    base = {"w": torch.tensor([1.0, 1.0])}
    experts = {"a": {"w": torch.tensor([2.0, 1.0])}, "b": {"w": torch.tensor([1.0, 3.0])}}
    out = drive(instantiate_conf("karcher", origin="base"), base, experts)
    # task vectors [1, 0] and [0, 2]: bisector, norm (1 + 2)/2 = 1.5, base added back
    assert torch.allclose(out["w"], base["w"] + 1.5 * torch.tensor([R, R]))
    raw = drive(instantiate_conf("karcher"), base, experts)
    ua, ub = torch.tensor([2.0, 1.0]) / math.sqrt(5), torch.tensor([1.0, 3.0]) / math.sqrt(10)
    mid = (ua + ub) / (ua + ub).norm()  # two points: the Karcher mean is the bisector
    assert torch.allclose(raw["w"], (math.sqrt(5) + math.sqrt(10)) / 2 * mid, atol=1e-6)
    circle_base = {"w": torch.tensor([1.0, 0.0])}
    circle = {"a": {"w": torch.tensor([0.0, 1.0])}, "b": {"w": torch.tensor([5.0, 5.0])}}
    method = instantiate_conf("karcher", models=["base", "a"], weights={"base": 3.0})
    with_base = drive(method, circle_base, circle)
    # angles 0 (weight 3/4) and π/2 (weight 1/4): π/8; expert b is not a member
    assert torch.allclose(with_base["w"], _circle(math.pi / 8), atol=1e-6)
    rep = method.report()
    assert rep["weights"] == {"base": 0.75, "a": 0.25} and rep["not_converged"] == 0
    json.dumps(rep)
    slow = instantiate_conf("karcher", models=["base", "a"], weights=[3.0, 1.0], max_iter=1)
    drive(slow, circle_base, circle)
    assert slow.report()["not_converged"] == 1 and slow.report()["iterations_max"] == 1
    multi = drive(instantiate_conf("karcher", variant="multislerp"), base, experts)
    assert torch.allclose(multi["w"], raw["w"], atol=1e-5)  # two points: both bisect


def test_karcher_plugin_refuses_bad_options():
    base = {"w": torch.zeros(2)}
    one = {"a": {"w": torch.ones(2)}}
    with pytest.raises(ValueError, match="at least two models"):
        drive(instantiate_conf("karcher"), base, one)
    with pytest.raises(ValueError, match="method.models"):
        drive(instantiate_conf("karcher", models=["a", "poetry"]), base, one)
    with pytest.raises(ValueError, match="method.models"):
        KarcherMerge(models=["a"])
    with pytest.raises(ValueError, match="method.origin=base"):
        drive(instantiate_conf("karcher", models=["base", "a"], origin="base"), base, one)
    with pytest.raises(ValueError, match="method.variant"):
        KarcherMerge(variant="nuslerp")
    with pytest.raises(ValueError, match="method.tol"):
        KarcherMerge(tol=0.0)
    with pytest.raises(ValueError, match="method.max_iter"):
        KarcherMerge(max_iter=0)
