import json
import math

import pytest
import torch
from _drive import drive, instantiate_conf

from core.combine import disjoint_merge, elect_sign, ties_combine
from core.trim import (
    count_to_keep,
    global_kth_largest_magnitude,
    global_trim_threshold,
    kth_largest_magnitude,
    trim_by_threshold,
    trim_mask_per_tensor,
    trim_threshold_per_tensor,
)
from methods.ties import TIES, ties_merge


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


# ----------------------------------------------------------------------------- trim


def test_count_to_keep_is_exact_ceil():
    assert count_to_keep(0.7, 10) == 7  # 0.7 * 10 == 7.000000000000001 in floats
    assert count_to_keep(0.2, 7) == 2  # ceil(1.4)
    assert count_to_keep(1e-9, 10) == 1  # at least one entry
    assert count_to_keep(1.0, 5) == 5
    assert count_to_keep(0.5, 0) == 0


TAU = t(0.5, -3, 2, -2, 1, 0.1)


@pytest.mark.parametrize(
    ("density", "kept"),
    [
        (0.5, [False, True, True, True, False, False]),  # k = 3, threshold 2
        (0.3, [False, True, True, True, False, False]),  # k = 2, threshold 2: tie kept
        (0.1, [False, True, False, False, False, False]),  # k = 1, threshold 3
    ],
)
def test_trim_mask_per_tensor(density, kept):
    assert trim_mask_per_tensor(TAU, density).tolist() == kept


def test_trim_threshold_ties_and_values():
    assert trim_threshold_per_tensor(TAU, 0.3) == 2.0
    assert trim_threshold_per_tensor(TAU, 0.7) == 0.5  # k = ceil(4.2) = 5
    assert kth_largest_magnitude(TAU, 6) == pytest.approx(0.1)
    assert torch.equal(trim_by_threshold(TAU, 2.0), t(0, -3, 2, -2, 0, 0))


def test_trim_per_tensor_2d():
    tau = torch.tensor([[1.0, -5.0], [4.0, -2.0]])
    assert trim_mask_per_tensor(tau, 0.5).tolist() == [[False, True], [True, False]]


# ------------------------------------------------------------ global radix select


def _topk_kth(tensors, k):
    return torch.cat([x.abs().reshape(-1) for x in tensors]).topk(k).values[-1].item()


def test_global_radix_matches_concat_topk():
    g = torch.Generator().manual_seed(0)
    for trial in range(3):
        shapes = [(7, 5), (13,), (3, 4, 2), (1,), (64, 33)]
        ts = [torch.randn(s, generator=g) * 10.0 ** (2 * trial - 2) for s in shapes]
        ts[1][:5] = ts[0].reshape(-1)[:5]  # exact duplicates across tensors
        ts[2].view(-1)[:6] = -ts[0].reshape(-1)[5]  # duplicates with flipped sign
        ts[3][0] = -0.0
        ts[4][0, :10] = 0.0
        ts[4][1, 0] = 1e-40  # subnormal
        n = sum(x.numel() for x in ts)
        for k in [1, 6, 7, n // 3, n - 11, n]:
            assert global_kth_largest_magnitude(ts, k) == _topk_kth(ts, k), (trial, k)


def test_global_radix_many_duplicates_and_zeros():
    ts = [torch.tensor([2.0, -2.0, 2.0, 0.0]), torch.tensor([[2.0, 1.0], [-0.0, 0.0]])]
    got = [global_kth_largest_magnitude(ts, k) for k in range(1, 9)]
    assert got == [2.0, 2.0, 2.0, 2.0, 1.0, 0.0, 0.0, 0.0]
    assert global_trim_threshold([torch.zeros(3)], 0.5) == 0.0
    with pytest.raises(ValueError, match="k must be in"):
        global_kth_largest_magnitude(ts, 9)


def test_global_trim_threshold_spans_tensors():
    # |τ| over the whole expert: 4, 3, 2, 1, 1, 0.5; k = 3 -> threshold 2
    assert global_trim_threshold([t(4, -3), t(0.5, -2, 1, 1)], 0.5) == 2.0


# ---------------------------------------------------------------- sign and merge


def test_elect_sign_unweighted_with_cancellation():
    trimmed = [t(1, -2, 0, 3), t(-3, 1, 0, -3), t(1, 0, 0, 0)]
    assert elect_sign(trimmed).tolist() == [-1.0, -1.0, 0.0, 0.0]


def test_disjoint_merge_divides_by_agreeing_count():
    trimmed = [t(2, 1, -1, 0), t(4, -3, -1, 5), t(0, 2, 3, 0)]
    sign = elect_sign(trimmed)  # sums 6, 0, 1, 5
    assert sign.tolist() == [1.0, 0.0, 1.0, 1.0]
    assert disjoint_merge(trimmed, sign).tolist() == [3.0, 0.0, 3.0, 5.0]  # not /K
    # weighted: entry 0 = (1*2 + 3*4) / (1 + 3); c's weight never used where c is 0
    assert torch.allclose(disjoint_merge(trimmed, sign, [1, 3, 1]), t(3.5, 0, 3, 5))


def test_disjoint_merge_no_agreeing_expert_gives_zero():
    trimmed = [t(0.0, 1.0), t(0.0, 2.0)]
    assert disjoint_merge(trimmed, t(0, -1)).tolist() == [0.0, 0.0]
    # only a zero-weight expert agrees -> 0, not NaN
    assert disjoint_merge([t(1.0), t(-2.0)], t(1.0), [0.0, 1.0]).tolist() == [0.0]


BASE = t(1, 1, 1, 1)
EXPERTS = [
    BASE + t(4, -1, 2, 3),  # trim 0.5 -> [4, 0, 0, 3]
    BASE + t(-3, 2, -1, 5),  # -> [-3, 0, 0, 5]
    BASE + t(1, -4, -2, 0),  # -> [0, -4, -2, 0]
]


def test_ties_merge_by_hand():
    # γ = sign([1, -4, -2, 8]); merged = [4, -4, -2, (3 + 5) / 2]
    out = ties_merge(BASE, EXPERTS, density=0.5, scaling=0.5)
    assert torch.allclose(out, t(3, -1, 0, 3))


def test_ties_merge_weights_do_not_vote():
    # weights [1, 10, 1]: a weighted vote would flip entry 0 to b's -3; the paper's
    # unweighted vote keeps +, so entry 0 = 4; entry 3 = (3 + 50) / 11
    out = ties_merge(BASE, EXPERTS, density=0.5, scaling=0.5, weights=[1, 10, 1])
    assert torch.allclose(out, BASE + 0.5 * t(4, -4, -2, 53 / 11))


def test_ties_merge_with_explicit_thresholds():
    # thresholds 0 for all: no trim; γ = sign([2, -3, -1, 8])
    out = ties_merge(BASE, EXPERTS, thresholds=[0.0, 0.0, 0.0])
    merged = t((4 + 1) / 2, -(1 + 4) / 2, -(1 + 2) / 2, (3 + 5) / 2)
    assert torch.allclose(out, BASE + merged)
    assert torch.equal(out, ties_combine(BASE, [e - BASE for e in EXPERTS]))


def test_weighted_vote_is_mergekits():
    # weights [1, 10, 1]: the weighted vote flips entry 0 to b's sign (−3·10 outweighs
    # 4 + 1); only b agrees there → −3; entry 3 as before: (3 + 50) / 11
    out = ties_merge(
        BASE, EXPERTS, density=0.5, scaling=0.5, weights=[1, 10, 1], weighted_vote=True
    )
    assert torch.allclose(out, BASE + 0.5 * t(-3, -4, -2, 53 / 11))


def test_peer_keep_counts():
    # d·n = 0.2·7 = 1.4: ⌈⌉ 2, mergekit ⌊⌋ 1, official ⌊⌋+1 2; d·n = 0.25·8 = 2: 2, 2, 3
    assert [count_to_keep(0.2, 7, r) for r in ("ceil", "floor", "floor_plus_one")] == [2, 1, 2]
    assert [count_to_keep(0.25, 8, r) for r in ("ceil", "floor", "floor_plus_one")] == [2, 2, 3]
    # clamped to [1, n]; the peers' rules use the float product, as they compute it
    assert count_to_keep(0.01, 5, "floor") == 1 and count_to_keep(1.0, 4, "floor_plus_one") == 4
    assert count_to_keep(0.29, 100, "floor") == 28 and count_to_keep(0.29, 100) == 29
    tau = t(5, -4, 3, -2, 1, 0.5, 0.25)
    assert int(trim_mask_per_tensor(tau, 0.2, "floor").sum()) == 1
    with pytest.raises(ValueError, match="keep-count rule"):
        count_to_keep(0.5, 4, "round")


# ------------------------------------------------------------------------ plugin


def test_peer_convention_options_are_validated_and_change_the_merge():
    with pytest.raises(ValueError, match="method.keep_count"):
        TIES(keep_count="round")
    with pytest.raises(ValueError, match="method.sign_vote"):
        TIES(sign_vote="majority")
    base = {"w": BASE}
    experts = {k: {"w": e} for k, e in zip("abc", EXPERTS, strict=True)}
    weighted = drive(
        TIES(
            density=0.5,
            scaling=0.5,
            weights=[1, 10, 1],
            sign_vote="weighted",
            trim_scope="per_tensor",
        ),
        base,
        experts,
    )
    assert torch.allclose(weighted["w"], BASE + 0.5 * t(-3, -4, -2, 53 / 11))


def test_stat_passes_per_instance():
    assert TIES().stat_passes == 2
    assert TIES(trim_scope="per_tensor").stat_passes == 0
    assert TIES(density=1.0).stat_passes == 0


@pytest.mark.parametrize(
    ("scope", "want_w1", "want_w2"),
    [
        ("global", t(4, -3), t(0, -2, 0, 0)),  # one threshold (2) over all 6 entries
        ("per_tensor", t(4, 0), t(0, -2, 1, 1)),  # thresholds 4 and 1 (tie kept)
    ],
)
def test_plugin_trim_scope(scope, want_w1, want_w2):
    base = {"w1": torch.zeros(2), "w2": torch.zeros(4)}
    pool = {"a": {"w1": t(4, -3), "w2": t(0.5, -2, 1, 1)}}
    m = TIES(density=0.5, scaling=1.0, trim_scope=scope)
    out = drive(m, base, pool)  # one expert: merged = its trimmed task vector
    assert torch.equal(out["w1"], want_w1) and torch.equal(out["w2"], want_w2)
    rep = json.loads(json.dumps(m.report()))
    if scope == "global":
        assert rep["thresholds"] == {"a": 2.0}
        assert rep["kept_fraction"] == {"a": 3 / 6}
    else:
        assert "thresholds" not in rep and rep["kept_fraction"] == {"a": 4 / 6}


def _random_pool(seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = {"emb": (17, 6), "w": (9, 9), "b": (9,), "s": (1,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    pool = {}
    for i, e in enumerate(["math", "code", "chat"]):
        pool[e] = {k: base[k] + torch.randn(s, generator=g) * (i + 1) for k, s in shapes.items()}
    return base, pool


def test_plugin_streaming_equals_in_memory_global():
    base, pool = _random_pool(1)
    density, scaling, weights = 0.3, 0.7, {"code": 2.0}
    m = TIES(density=density, scaling=scaling, weights=weights)
    out = drive(m, base, pool, seed=3)
    # reference: thresholds from concatenation + topk, then the pure per-tensor merge
    thresholds = []
    for e in pool:
        taus = [pool[e][k] - base[k] for k in base]
        n = sum(x.numel() for x in taus)
        thresholds.append(_topk_kth(taus, math.ceil(density * n)))
    assert m.report()["thresholds"] == dict(zip(pool, thresholds, strict=True))
    for k in base:
        want = ties_merge(
            base[k],
            [pool[e][k] for e in pool],
            thresholds=thresholds,
            scaling=scaling,
            weights=[1.0, 2.0, 1.0],
        )
        assert torch.equal(out[k], want), k
    # execution order does not matter
    m2 = TIES(density=density, scaling=scaling, weights=weights)
    out2 = drive(m2, base, pool, order=list(reversed(list(base))))
    assert all(torch.equal(out[k], out2[k]) for k in base)


def test_plugin_per_tensor_equals_pure():
    base, pool = _random_pool(2)
    out = drive(TIES(density=0.4, trim_scope="per_tensor"), base, pool)
    for k in base:
        assert torch.equal(out[k], ties_merge(base[k], [pool[e][k] for e in pool], density=0.4))


def test_plugin_density_one_keeps_everything():
    base, pool = _random_pool(3)
    out = drive(TIES(density=1.0, scaling=0.5), base, pool)
    for k in base:
        want = ties_combine(base[k], [pool[e][k] - base[k] for e in pool], 0.5)
        assert torch.equal(out[k], want)


def test_merge_before_passes_raises():
    m = TIES()
    m.setup(["a"], 0)
    with pytest.raises(RuntimeError, match="statistics passes"):
        m.merge_tensor("w", torch.zeros(2), {"a": torch.ones(2)})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"density": 0.0}, r"method.density must be in \(0, 1\], got 0.0"),
        ({"density": 1.5}, r"method.density must be in \(0, 1\]"),
        ({"trim_scope": "layer"}, r"method.trim_scope must be one of \['global', 'per_tensor'\]"),
        ({"scaling": float("nan")}, "method.scaling"),
        ({"weights": "x"}, "method.weights"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TIES(**kwargs)


def test_yaml_instantiates():
    m = instantiate_conf("ties")
    assert isinstance(m, TIES) and m.name == "ties"
    trim = m.transform
    assert (trim.density, trim.trim_scope, trim.keep_count) == (0.2, "global", "ceil")
    assert (m.coefficients.scaling, m.coefficients.weights_option) == (1.0, None)
    assert m.stat_passes == 2
