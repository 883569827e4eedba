import json

import pytest
import torch
from _drive import drive, instantiate_conf

from core.dropout import dare_keep_mask, mask_seed
from methods.metagpt import MetaGPT, metagpt_bound, metagpt_coefficients, metagpt_merge
from methods.ties import TIES, ties_merge
from methods.weight_average import weight_average


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def _random_pool(seed: int, scales=(1.0, 2.0, 0.5)):
    g = torch.Generator().manual_seed(seed)
    shapes = {"emb": (17, 6), "w": (9, 9), "b": (9,), "s": (1,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    pool = {}
    for e, sc in zip(["math", "code", "chat"], scales, strict=True):
        pool[e] = {k: base[k] + sc * torch.randn(s, generator=g) for k, s in shapes.items()}
    return base, pool


def _whole_sq_norms(base, pool):
    return {
        e: float(
            torch.cat([(pool[e][k] - base[k]).double().reshape(-1) for k in base]).square().sum()
        )
        for e in pool
    }


# ------------------------------------------------------------- closed form


def test_coefficients_nonnegative_and_sum_to_one():
    g = torch.Generator().manual_seed(0)
    for k in (1, 2, 3, 7):
        norms = (torch.rand(k, generator=g) * 10).tolist()
        lam = metagpt_coefficients(norms)
        assert all(x >= 0 for x in lam) and sum(lam) == pytest.approx(1.0, abs=1e-12)
        assert lam == pytest.approx([n / sum(norms) for n in norms])
    assert metagpt_coefficients([0.0, 3.0]) == [0.0, 1.0]
    assert metagpt_coefficients([0.0, 0.0]) == [0.5, 0.5]  # undefined: uniform
    with pytest.raises(ValueError, match=">= 0"):
        metagpt_coefficients([1.0, -1.0])


def test_bound_by_hand():
    # n = [1, 3], λ = [.5, .5]: 1·(.25·3 + .25·1) + 3·(.25·1 + .25·3) = 4
    assert metagpt_bound([0.5, 0.5], [1.0, 3.0]) == pytest.approx(4.0)
    # λ = [1, 0]: 1·(0 + 0) + 3·(1·1 + 1·3) = 12
    assert metagpt_bound([1.0, 0.0], [1.0, 3.0]) == pytest.approx(12.0)
    lam = torch.tensor([0.2, 0.8], requires_grad=True)
    metagpt_bound(lam, [1.0, 3.0]).backward()
    assert lam.grad is not None and lam.grad.abs().sum() > 0


@pytest.mark.parametrize("k", [2, 3, 5])
def test_coefficients_minimise_the_bound(k):
    from scipy.optimize import minimize

    g = torch.Generator().manual_seed(k)
    norms = (torch.rand(k, generator=g) * 5 + 0.1).tolist()
    closed = metagpt_coefficients(norms)
    x0 = [1.0 / k] * k
    # on the simplex (SLSQP) and unconstrained (BFGS): both find the closed form
    simplex = minimize(
        lambda x: metagpt_bound(list(x), norms),
        x0,
        method="SLSQP",
        bounds=[(0, 1)] * k,
        constraints=[{"type": "eq", "fun": lambda x: sum(x) - 1}],
        options={"ftol": 1e-14, "maxiter": 500},
    )
    free = minimize(lambda x: metagpt_bound(list(x), norms), x0, method="BFGS", tol=1e-12)
    assert simplex.x.tolist() == pytest.approx(closed, abs=1e-3)
    assert free.x.tolist() == pytest.approx(closed, abs=1e-3)
    assert metagpt_bound(closed, norms) <= min(simplex.fun, free.fun) + 1e-9


def test_grid_minimiser_k2():
    norms = [2.0, 5.0]
    grid = [i / 10000 for i in range(10001)]
    best = min(grid, key=lambda a: metagpt_bound([a, 1 - a], norms))
    assert best == pytest.approx(metagpt_coefficients(norms)[0], abs=1e-3)


# ------------------------------------------------------------------- plugin


def test_equal_norms_is_weight_averaging():
    base = {"w": t(1, 2, 3, 4), "b": t(0.5, -1)}
    taus = [{"w": t(1, 0, -2, 0), "b": t(0, 1)}, {"w": t(0, 2, 0, 1), "b": t(1, 0)}]
    pool = {e: {k: base[k] + tau[k] for k in base} for e, tau in zip("ab", taus, strict=True)}
    m = MetaGPT()
    out = drive(m, base, pool)
    assert m.report()["sq_norms"] == {"a": 6.0, "b": 6.0}
    assert m.report()["coefficients"] == {"a": 0.5, "b": 0.5}
    for k in base:
        assert torch.allclose(out[k], weight_average([pool["a"][k], pool["b"][k]]), atol=1e-6)


def test_streaming_equals_whole_model_computation():
    base, pool = _random_pool(1)
    m = MetaGPT()
    assert m.stat_passes == 1
    out = drive(m, base, pool)
    norms = _whole_sq_norms(base, pool)
    rep = json.loads(json.dumps(m.report()))
    assert rep["sq_norms"] == pytest.approx(norms, rel=1e-12)
    lam = [norms[e] / sum(norms.values()) for e in pool]
    assert list(rep["coefficients"].values()) == pytest.approx(lam, rel=1e-12)
    assert rep["coefficients"]["code"] > rep["coefficients"]["math"] > rep["coefficients"]["chat"]
    for k in base:
        want = base[k] + sum(x * (pool[e][k] - base[k]) for x, e in zip(lam, pool, strict=True))
        assert torch.allclose(out[k], want, atol=1e-6), k
        assert torch.equal(out[k], metagpt_merge(base[k], [pool[e][k] for e in pool], lam))
    out2 = drive(MetaGPT(), base, pool, order=list(reversed(list(base))))
    assert all(torch.equal(out[k], out2[k]) for k in base)


def test_ties_variant_by_hand():
    # one expert vector split over two tensors; global density 0.5 keeps 2 of 4 entries
    # a: τ = [3, -1 | 2, 0]  ‖τ‖² = 14 -> trimmed [3, 0 | 2, 0]
    # b: τ = [-1, 2 | 4, 1]  ‖τ‖² = 22 -> trimmed [0, 2 | 4, 0]
    # γ = sign([3, 2 | 6, 0]); λ = [14/36, 22/36]; entry 2: (14·2 + 22·4) / 36
    base = {"w1": t(0, 0), "w2": t(0, 0)}
    pool = {"a": {"w1": t(3, -1), "w2": t(2, 0)}, "b": {"w1": t(-1, 2), "w2": t(4, 1)}}
    m = MetaGPT(base_method="ties", density=0.5)
    assert m.stat_passes == 2
    out = drive(m, base, pool)
    assert torch.allclose(out["w1"], t(3, 2))
    assert torch.allclose(out["w2"], t(116 / 36, 0))
    rep = m.report()
    assert rep["coefficients"] == pytest.approx({"a": 14 / 36, "b": 22 / 36})
    assert rep["thresholds"] == {"a": 2.0, "b": 2.0}


def test_ties_variant_equals_ties_with_metagpt_weights():
    base, pool = _random_pool(2)
    for scope in ("global", "per_tensor"):
        m = MetaGPT(base_method="ties", density=0.3, trim_scope=scope)
        out = drive(m, base, pool, seed=5)
        lam = list(m.report()["coefficients"].values())
        ties = TIES(density=0.3, scaling=1.0, trim_scope=scope, weights=lam)
        ref = drive(ties, base, pool, seed=5)
        assert all(torch.equal(out[k], ref[k]) for k in base), scope
        if scope == "global":
            assert m.report()["thresholds"] == ties.report()["thresholds"]
            for k in base:
                th = list(ties.report()["thresholds"].values())
                want = ties_merge(base[k], [pool[e][k] for e in pool], thresholds=th, weights=lam)
                assert torch.equal(out[k], want)
    # density 1: no trim passes, all kept
    m = MetaGPT(base_method="ties", density=1.0)
    assert m.stat_passes == 1
    drive(m, base, pool)


def test_dare_variant_by_hand():
    base, pool = _random_pool(3)
    p = 0.4
    m = MetaGPT(base_method="dare", drop_rate=p)
    assert m.stat_passes == 1
    out = drive(m, base, pool, seed=7)
    norms = _whole_sq_norms(base, pool)  # λ from the raw (undropped) task vectors
    lam = {e: n / sum(norms.values()) for e, n in norms.items()}
    assert m.report()["coefficients"] == pytest.approx(lam, rel=1e-12)
    for k in base:
        want = base[k].clone()
        for e in pool:
            keep = dare_keep_mask(base[k].shape, p, mask_seed(7, e, k))
            want += lam[e] * (pool[e][k] - base[k]) * keep / (1 - p)
        assert torch.allclose(out[k], want, atol=1e-6), k
    # p = 0 keeps everything: plain MetaGPT
    plain = drive(MetaGPT(), base, pool)
    no_drop = drive(MetaGPT(base_method="dare", drop_rate=0.0), base, pool)
    assert all(torch.allclose(plain[k], no_drop[k], atol=1e-6) for k in base)


def test_merge_before_pass_raises():
    m = MetaGPT()
    m.setup(["a"], 0)
    with pytest.raises(RuntimeError, match="statistics pass"):
        m.merge_tensor("w", torch.zeros(2), {"a": torch.ones(2)})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base_method": "dare_ties"}, r"method.base_method must be one of"),
        ({"density": 0.0}, r"method.density must be in \(0, 1\]"),
        ({"drop_rate": 1.0}, r"method.drop_rate must be in \[0, 1\)"),
        ({"trim_scope": "layer"}, r"method.trim_scope must be one of"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MetaGPT(**kwargs)


@pytest.mark.parametrize(
    ("conf", "base_method", "passes"),
    [("metagpt", "none", 1), ("metagpt_ties", "ties", 2), ("metagpt_dare", "dare", 1)],
)
def test_yaml_instantiates(conf, base_method, passes):
    m = instantiate_conf(conf)
    assert isinstance(m, MetaGPT) and m.name == "metagpt" and not m.needs_data
    assert (m.base_method, m.stat_passes) == (base_method, passes)
    assert MetaGPT(base_method=None).base_method == "none"
