"""TSV-Merge, Iso-C and Iso-CTS on small hand-computed task matrices (diagonal, rank-1 and
45° examples whose SVDs are read off), and through their Hydra configs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _drive import drive, instantiate_conf

from methods.iso import IsoCTS, iso_c_delta, iso_cts_delta, iso_cts_sizes
from methods.tsv import TSVMerge, tsv_delta

C22, S22 = math.cos(math.pi / 8), math.sin(math.pi / 8)  # 22.5°
E1, E2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])


def outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.outer(a, b)


def test_tsv_keeps_each_tasks_top_triplets():
    # K = 2 on 2×2: one triplet per task. τ1's top is (3, e1, e1), τ2's is (2, e2, e2);
    # the stacked U = V = I are already orthonormal, so Δ = diag(3, 2) (TA: diag(3.5, 3)).
    t1, t2 = torch.diag(torch.tensor([3.0, 1.0])), torch.diag(torch.tensor([0.5, 2.0]))
    assert torch.allclose(tsv_delta([t1, t2]), torch.diag(torch.tensor([3.0, 2.0])), atol=1e-6)


def test_tsv_decorrelates_singular_vectors_by_procrustes():
    # τ1 = 3·e1 e1ᵀ, τ2 = 2·u e2ᵀ with u at 45°: U = [e1, u]; its nearest orthonormal pair
    # is the one 90° apart, symmetric about the bisector at 22.5°: r1 at −22.5°, r2 at
    # 67.5°. V = [e1, e2] stays. Δ = 3·r1 e1ᵀ + 2·r2 e2ᵀ.
    u = torch.tensor([1.0, 1.0]) / math.sqrt(2)
    t1, t2 = 3 * outer(E1, E1), 2 * outer(u, E2)
    r1, r2 = torch.tensor([C22, -S22]), torch.tensor([S22, C22])
    expected = 3 * outer(r1, E1) + 2 * outer(r2, E2)
    assert torch.allclose(tsv_delta([t1, t2]), expected, atol=1e-6)
    # −τ2: whichever sign the SVD gives its pair, task 2's contribution flips sign
    flipped = 3 * outer(r1, E1) - 2 * outer(r2, E2)
    assert torch.allclose(tsv_delta([t1, -t2]), flipped, atol=1e-6)
    assert not torch.allclose(expected, t1 + t2, atol=1e-2)  # not task arithmetic


def test_tsv_identical_rank_one_experts_and_the_peer_convention():
    # τ1 = τ2 = 3·e1 e1ᵀ: U = [e1, e1] has rank 1; its partial isometry is [e1, e1]/√2
    # (V likewise), so Δ = 3·(e1 e1ᵀ/2 + e1 e1ᵀ/2) = τ.
    tau = 3 * outer(E1, E1)
    assert torch.allclose(tsv_delta([tau, tau]), tau, atol=1e-6)
    # rank_rtol = 0 (fusion-bench) completes the rank-1 U with LAPACK's arbitrary e2 and
    # adds ±3·e2 e2ᵀ: the junk the default avoids
    peer = tsv_delta([tau, tau], rtol=0.0)
    assert peer[0, 0] == pytest.approx(3.0, abs=1e-5)
    assert abs(float(peer[1, 1])) == pytest.approx(3.0, abs=1e-5)


def test_tsv_with_one_expert_is_its_task_vector():
    # K = 1 keeps every triplet, and U, V are already orthonormal: Δ = U S Vᵀ = τ
    tau = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(tsv_delta([tau]), tau, atol=1e-5)


def test_tsv_compact_stack_matches_the_zero_padded_peer_formula():
    # fusion-bench places task i's r triplets at columns i·r… of min(m, n)-wide zero
    # matrices, then multiplies polar(U)·diag(S)·polar(Vᵀ); with full-rank tasks that is
    # the compact stack's result.
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(7, 8, generator=g, dtype=torch.float64) for _ in range(3)]
    r = 2  # ⌊7/3⌋: six of the seven columns are used, the last stays zero
    u_pad = torch.zeros(7, 7, dtype=torch.float64)
    s_pad = torch.zeros(7, dtype=torch.float64)
    vh_pad = torch.zeros(7, 8, dtype=torch.float64)
    for i, t in enumerate(taus):
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        u_pad[:, i * r : (i + 1) * r] = u[:, :r]
        s_pad[i * r : (i + 1) * r] = s[:r]
        vh_pad[i * r : (i + 1) * r] = vh[:r]
    pu, _, qu = torch.linalg.svd(u_pad)
    pv, _, qv = torch.linalg.svd(vh_pad, full_matrices=False)
    peer = pu @ qu @ torch.diag(s_pad) @ pv @ qv
    assert torch.allclose(tsv_delta(taus, rtol=0.0), peer, atol=1e-10)
    assert torch.allclose(tsv_delta(taus), peer, atol=1e-10)  # full rank: same


def test_iso_c_flattens_the_spectrum_by_hand():
    # Σ = diag(3, 1): U Vᵀ = I, σ̄ = 2
    total = torch.diag(torch.tensor([3.0, 0.0])) + torch.diag(torch.tensor([0.0, 1.0]))
    assert torch.allclose(iso_c_delta(total), 2 * torch.eye(2), atol=1e-6)
    # [[0, 2], [1, 0]] = swap · diag(1, 2): U Vᵀ = swap, σ̄ = 1.5
    swap = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert torch.allclose(iso_c_delta(torch.tensor([[0.0, 2.0], [1.0, 0.0]])), 1.5 * swap)
    # rank 1: σ̄ is the mean over the rank, σ̄ = 6 on e1 e1ᵀ (peer: 3 over both directions,
    # the second one arbitrary)
    rank_one = 6 * outer(E1, E1)
    assert torch.allclose(iso_c_delta(rank_one), rank_one, atol=1e-6)
    peer = iso_c_delta(rank_one, rtol=0.0)
    assert peer[0, 0] == pytest.approx(3.0) and abs(float(peer[1, 1])) == pytest.approx(3.0)
    assert torch.equal(iso_c_delta(torch.zeros(2, 3)), torch.zeros(2, 3))


def test_iso_cts_sizes_follow_the_peer_arithmetic():
    assert iso_cts_sizes(4096, 3, 0.8) == (3277, 273)  # k0 = 3276, (4096−3276)/3 → 273
    assert iso_cts_sizes(3, 2, 0.4) == (1, 1)
    assert iso_cts_sizes(2, 2, 0.5) == (2, 0)  # round(0.5) = 0 (half to even)
    assert iso_cts_sizes(4, 5, 0.0) == (4, 0)  # clamped: fusion-bench would give k = −1
    assert iso_cts_sizes(8, 2, 1.0) == (8, 0)


def test_iso_cts_keeps_a_direction_the_sum_cancels():
    # τ1 = diag(4, 1, 0), τ2 = diag(4, −1, 2): Σ = diag(8, 0, 2), so Iso-C loses e2:
    # σ̄ = (8 + 2)/2 = 5 on e1, e3.
    t1, t2 = torch.diag(torch.tensor([4.0, 1.0, 0.0])), torch.diag(torch.tensor([4.0, -1.0, 2.0]))
    assert torch.allclose(iso_c_delta(t1 + t2), torch.diag(torch.tensor([5.0, 0.0, 5.0])))
    # Iso-CTS with f = 0.4 on rank 3: common = top-1 of Σ (8, e1); residuals diag(0, 1, 0)
    # and diag(0, −1, 2) give (1, e2) and (2, e3). U = V = I, σ̄ = (8 + 1 + 2)/3.
    delta, sizes = iso_cts_delta([t1, t2], 0.4)
    assert sizes == (1, 1)
    assert torch.allclose(delta, 11 / 3 * torch.eye(3), atol=1e-6)


def test_iso_cts_with_the_whole_common_space_is_iso_c():
    g = torch.Generator().manual_seed(2)
    taus = [torch.randn(4, 6, generator=g) for _ in range(3)]
    delta, sizes = iso_cts_delta(taus, 1.0)
    assert sizes == (4, 0)
    assert torch.allclose(delta, iso_c_delta(sum(taus)), atol=1e-5)


def _pool(tensors_a: dict, tensors_b: dict, base: dict) -> dict:
    return {"a": {n: base[n] + t for n, t in tensors_a.items()}, "b": {
        n: base[n] + t for n, t in tensors_b.items()}}  # fmt: skip


def test_tsv_config_merges_weights_and_other_tensors():
    base = {"w": torch.ones(2, 2), "norm": torch.tensor([1.0, 1.0])}
    experts = _pool(
        {"w": torch.diag(torch.tensor([3.0, 1.0])), "norm": torch.tensor([2.0, 0.0])},
        {"w": torch.diag(torch.tensor([0.5, 2.0])), "norm": torch.tensor([0.0, 4.0])},
        base,
    )
    method = instantiate_conf("tsv_merge", scaling=0.5)
    out = drive(method, base, experts)
    assert torch.allclose(out["w"], 1 + 0.5 * torch.diag(torch.tensor([3.0, 2.0])), atol=1e-6)
    assert torch.allclose(out["norm"], torch.tensor([1.5, 2.0]))  # 1 + 0.5·mean
    report = method.report()
    assert report["svd_tensors"] == 1 and report["other_tensors"] == 1
    json.dumps(report)
    summed = drive(instantiate_conf("tsv_merge", other_tensors="sum"), base, experts)
    assert torch.allclose(summed["norm"], torch.tensor([3.0, 5.0]))
    # an excluded matrix takes the other-tensor rule: 1 + mean(diag(3, 1), diag(.5, 2))
    excluded = drive(instantiate_conf("tsv_merge", svd_exclude=["w*"]), base, experts)
    assert torch.allclose(excluded["w"], 1 + torch.diag(torch.tensor([1.75, 1.5])))


def test_tsv_falls_back_when_there_are_more_experts_than_the_rank():
    base = {"w": torch.zeros(2, 2)}
    experts = {e: {"w": torch.full((2, 2), float(i))} for i, e in enumerate("abc")}
    method = TSVMerge()
    out = drive(method, base, experts)
    assert torch.allclose(out["w"], torch.ones(2, 2))  # mean of 0, 1, 2
    assert method.report()["too_small_for_svd"] == ["w"]


def test_iso_configs_and_option_errors():
    base = {"w": torch.zeros(3, 3), "bias": torch.zeros(2)}
    experts = _pool(
        {"w": torch.diag(torch.tensor([4.0, 1.0, 0.0])), "bias": torch.tensor([1.0, 2.0])},
        {"w": torch.diag(torch.tensor([4.0, -1.0, 2.0])), "bias": torch.tensor([3.0, 4.0])},
        base,
    )
    iso_c = drive(instantiate_conf("iso_c"), base, experts)
    assert torch.allclose(iso_c["w"], torch.diag(torch.tensor([5.0, 0.0, 5.0])), atol=1e-6)
    assert torch.allclose(iso_c["bias"], torch.tensor([2.0, 3.0]))  # fusion-bench: mean
    method = instantiate_conf("iso_cts", common_space_fraction=0.4)
    cts = drive(method, base, experts)
    assert torch.allclose(cts["w"], 11 / 3 * torch.eye(3), atol=1e-6)
    assert method.report()["common_and_per_task_dims"] == {"3x3": [1, 1]}
    weighted = drive(instantiate_conf("iso_c", weights={"b": 0.0}), base, experts)
    assert torch.allclose(weighted["w"], torch.diag(torch.tensor([2.5, 2.5, 0.0])), atol=1e-6)
    assert instantiate_conf("iso_cts").fraction == 0.8
    with pytest.raises(ValueError, match="method.common_space_fraction"):
        IsoCTS(common_space_fraction=1.5)
    with pytest.raises(ValueError, match="method.other_tensors"):
        TSVMerge(other_tensors="median")
    with pytest.raises(ValueError, match="method.rank_rtol"):
        TSVMerge(rank_rtol=-1e-3)
    with pytest.raises(ValueError, match="method.svd_exclude"):
        TSVMerge(svd_exclude="embed")
    with pytest.raises(ValueError, match="method.scaling"):
        IsoCTS(scaling=float("nan"))


@pytest.mark.parametrize("conf", ["tsv_merge", "iso_c", "iso_cts"])
def test_svd_merges_do_not_depend_on_the_thread_count(conf):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(172, 64, generator=g)}
    experts = {e: {"w": base["w"] + 0.01 * torch.randn(172, 64, generator=g)} for e in "abc"}
    before = torch.get_num_threads()
    try:
        out = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out.append(drive(instantiate_conf(conf), base, experts)["w"])
            assert torch.get_num_threads() == threads  # restored after the pinned block
    finally:
        torch.set_num_threads(before)
    assert torch.equal(out[0], out[1])
