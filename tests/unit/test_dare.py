import json

import pytest
import torch
from _drive import drive, instantiate_conf

from core.dropout import dare_keep_mask, dare_rescale, mask_seed
from methods.dare import DARELinear, DARETies, dare_linear_merge, dare_ties_merge
from methods.task_arithmetic import task_arithmetic
from methods.ties import ties_merge


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


# ------------------------------------------------------------------ drop / rescale


def test_rescale_survivors_and_drops():
    keep = torch.tensor([True, False, True, False])
    assert dare_rescale(t(1, 2, -3, 4), keep, 0.5).tolist() == [2.0, 0.0, -6.0, 0.0]
    assert torch.allclose(dare_rescale(t(1, 2, 3, 4), keep, 0.75), t(4, 0, 12, 0))


def test_keep_rate_and_expectation_on_big_tensor():
    m = dare_keep_mask((400, 500), 0.9, mask_seed(0, "math", "w"))
    assert m.dtype == torch.bool and m.shape == (400, 500)
    assert abs(m.float().mean().item() - 0.1) < 0.005  # std ≈ 0.0007
    assert abs(dare_rescale(torch.ones(400, 500), m, 0.9).mean().item() - 1.0) < 0.05


def test_drop_rate_zero_keeps_all():
    assert dare_keep_mask((3, 3), 0.0, 123).all()


# ------------------------------------------------------------------------- seeds


def test_mask_seed_is_63_bit_and_keyed():
    s = mask_seed(0, "math", "layers.0.w")
    assert s == mask_seed(0, "math", "layers.0.w") and 0 <= s < 2**63
    others = {mask_seed(1, "math", "layers.0.w"), mask_seed(0, "code", "layers.0.w")}
    others |= {mask_seed(0, "math", "layers.1.w"), mask_seed(0, "mat", "hlayers.0.w")}
    assert s not in others and len(others) == 4


def test_mask_does_not_depend_on_global_rng_or_call_order():
    torch.manual_seed(1)
    a1 = dare_keep_mask((64,), 0.5, mask_seed(7, "math", "x"))
    b1 = dare_keep_mask((64,), 0.5, mask_seed(7, "math", "y"))
    torch.manual_seed(2)
    torch.rand(10)
    b2 = dare_keep_mask((64,), 0.5, mask_seed(7, "math", "y"))
    a2 = dare_keep_mask((64,), 0.5, mask_seed(7, "math", "x"))
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(a1, b1)  # different tensor name -> different mask
    assert not torch.equal(a1, dare_keep_mask((64,), 0.5, mask_seed(8, "math", "x")))


# --------------------------------------------------------------- fixed-mask merges

BASE = t(1, 1, 1, 1)
EXPERTS = [BASE + t(2, -2, 4, 1), BASE + t(-1, 3, 1, 2)]
MASKS = [torch.tensor([True, True, False, True]), torch.tensor([True, False, True, True])]
# p = 0.5: τ̃a = [4, -4, 0, 2], τ̃b = [-2, 0, 2, 4]


def test_dare_linear_fixed_mask():
    # 1 + 0.5 * (1 * τ̃a + 2 * τ̃b) = 1 + 0.5 * [0, -4, 4, 10]
    out = dare_linear_merge(BASE, EXPERTS, MASKS, 0.5, scaling=0.5, weights=[1.0, 2.0])
    assert torch.allclose(out, t(1, -1, 3, 6))


def test_dare_ties_fixed_mask():
    # γ = sign([2, -4, 2, 6]); merged = [4, -4, 2, (2 + 4) / 2]
    out = dare_ties_merge(BASE, EXPERTS, MASKS, 0.5, scaling=1.0)
    assert torch.allclose(out, t(5, -3, 3, 4))


# ------------------------------------------------------------------------ plugins


def _random_pool(seed: int):
    g = torch.Generator().manual_seed(seed)
    shapes = {"emb": (11, 4), "w": (6, 6), "b": (6,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    pool = {
        e: {k: base[k] + torch.randn(s, generator=g) for k, s in shapes.items()}
        for e in ["math", "code"]
    }
    return base, pool


@pytest.mark.parametrize("cls", [DARELinear, DARETies])
def test_plugin_uses_keyed_masks(cls):
    base, pool = _random_pool(0)
    m = cls(drop_rate=0.3, scaling=0.8, weights={"code": 0.5})
    out = drive(m, base, pool, seed=11)
    pure = dare_linear_merge if cls is DARELinear else dare_ties_merge
    for k in base:
        masks = [dare_keep_mask(base[k].shape, 0.3, mask_seed(11, e, k)) for e in pool]
        want = pure(base[k], [pool[e][k] for e in pool], masks, 0.3, 0.8, [1.0, 0.5])
        assert torch.equal(out[k], want), k
    rep = json.loads(json.dumps(m.report()))
    assert rep["weights"] == {"math": 1.0, "code": 0.5}
    assert 0.3 < rep["kept_fraction"]["math"] < 1.0


@pytest.mark.parametrize("cls", [DARELinear, DARETies])
def test_plugin_order_independent_and_seeded(cls):
    base, pool = _random_pool(1)
    torch.manual_seed(0)
    out1 = drive(cls(drop_rate=0.5), base, pool, seed=5)
    torch.manual_seed(99)
    out2 = drive(cls(drop_rate=0.5), base, pool, seed=5, order=["b", "w", "emb"])
    out3 = drive(cls(drop_rate=0.5), base, pool, seed=6)
    assert all(torch.equal(out1[k], out2[k]) for k in base)
    assert not torch.equal(out1["w"], out3["w"])


def test_drop_rate_zero_equals_ta_and_untrimmed_ties():
    base, pool = _random_pool(2)
    lin = drive(DARELinear(drop_rate=0.0, scaling=0.4), base, pool)
    ties = drive(DARETies(drop_rate=0.0, scaling=0.4), base, pool)
    for k in base:
        experts = [pool[e][k] for e in pool]
        assert torch.allclose(lin[k], task_arithmetic(base[k], experts, 0.4))
        assert torch.allclose(ties[k], ties_merge(base[k], experts, density=1.0, scaling=0.4))
    assert not torch.allclose(lin["w"], ties["w"])


@pytest.mark.parametrize("cls", [DARELinear, DARETies])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"drop_rate": 1.0}, r"method.drop_rate must be in \[0, 1\), got 1.0"),
        ({"drop_rate": -0.1}, r"method.drop_rate must be in \[0, 1\)"),
        ({"scaling": float("inf")}, "method.scaling"),
        ({"weights": [1.0, -1.0]}, "method.weights"),
    ],
)
def test_bad_config(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


@pytest.mark.parametrize(("conf", "cls"), [("dare_linear", DARELinear), ("dare_ties", DARETies)])
def test_yaml_instantiates(conf, cls):
    m = instantiate_conf(conf)
    assert isinstance(m, cls) and m.name == conf
    assert (m.transform.drop_rate, m.transform.rescale) == (0.5, "inverse_p")
    assert (m.coefficients.scaling, m.coefficients.weights_option) == (1.0, None)
