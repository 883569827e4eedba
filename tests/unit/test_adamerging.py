import json
import math

import pytest
import torch
from _drive import instantiate_conf
from _fit import drive_fit, make_context, tiny_pool

from core.combine import disjoint_merge, elect_sign
from core.lm import encode_prompts, entropy, last_positions, last_token_entropy, right_pad
from core.numerics import one_thread
from core.trim import trim_by_threshold
from methods.adamerging import (
    AdaMerging,
    clamp_coefficients,
    combine,
    disjoint_task_vectors,
    merged_parameters,
)
from methods.ties import TIES

FAST = {"steps": 12, "lr": 0.05, "batch_size": 8}


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def pool():
    return tiny_pool()


def _fit(pool, seed=0, log=None, **kwargs):
    m = AdaMerging(**{**FAST, **kwargs})
    out = drive_fit(m, make_context(pool, seed=seed, log=log), pool.base, pool.experts, seed=seed)
    return m, out


def _full_entropy(pool, state):
    """The objective over all calibration prompts for a model holding ``state``."""
    from _fit import CALIBRATION

    from tests.helpers.tiny_lm import make_tiny_llama

    model = make_tiny_llama(pool.vocab, seed=0, hidden_size=32, num_layers=2)
    model.load_state_dict(state)
    total = 0.0
    with torch.no_grad():
        for prompts in CALIBRATION.values():
            ids, mask = right_pad(encode_prompts(pool.tokenizer, prompts, 512), 0)
            total += float(
                last_token_entropy(model(input_ids=ids, attention_mask=mask).logits, mask).mean()
            )
    return total


# ------------------------------------------------------------------ helpers


def test_padding_and_last_positions():
    ids, mask = right_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert last_positions(mask).tolist() == [2, 0]
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert last_positions(left).tolist() == [3, 3]


def test_encode_keeps_the_end_of_long_prompts(pool):
    full = encode_prompts(pool.tokenizer, ["abcdef"], 512)[0]
    assert len(full) == 7  # BOS + 6 characters
    assert encode_prompts(pool.tokenizer, ["abcdef"], 3)[0] == full[-3:]


def test_entropy_values():
    assert entropy(torch.zeros(5)).item() == pytest.approx(math.log(5))
    assert entropy(torch.tensor([0.0, -1e4])).item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.zeros(2, 3, 4)
    logits[0, 1] = torch.tensor([30.0, 0, 0, 0])  # sample 0's last real position: peaked
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    h = last_token_entropy(logits, mask)
    assert h[0].item() == pytest.approx(0.0, abs=1e-6) and h[1].item() == pytest.approx(math.log(4))


def test_combine_and_clamp():
    v = torch.stack([torch.tensor([1.0, 2.0]), torch.tensor([10.0, 20.0])])
    out = combine(torch.tensor([1.0, 1.0]), v, clamp_coefficients(torch.tensor([-0.5, 0.5])))
    assert out.tolist() == [6.0, 11.0]


# ------------------------------------------------------------------ fitting


def test_task_wise_entropy_drops_and_coefficients_stay_in_unit_interval(pool):
    logged = []
    m, _ = _fit(pool, log=lambda metrics, step: logged.append((step, metrics)))
    rep = json.loads(json.dumps(m.report()))
    assert rep["entropy_final"] < rep["entropy_init"] - 0.1
    assert set(rep["coefficients"]) == {"add", "color"}
    assert all(0.0 <= v <= 1.0 for v in rep["coefficients"].values())
    assert any(v != pytest.approx(0.3) for v in rep["coefficients"].values())
    assert rep["steps"] == 12 and len(rep["entropy_curve"]) == 12
    assert [s for s, _ in logged] == list(range(12))
    keys = set(logged[0][1])
    assert {"adamerging/entropy", "adamerging/coef_mean", "adamerging/coef/add"} <= keys
    # the objective is measured on the model the merge produces
    assert rep["entropy_init"] == pytest.approx(
        _full_entropy(pool, _task_arithmetic(pool, 0.3)), abs=1e-4
    )


def test_forward_pass_uses_clamped_coefficients(pool):
    logged = []
    m, _ = _fit(pool, lr=0.3, log=lambda metrics, step: logged.append(metrics))
    seen = [v for metrics in logged for k, v in metrics.items() if k.startswith("adamerging/coef/")]
    assert all(0.0 <= v <= 1.0 for v in seen)
    assert max(seen) == 1.0  # the raw value left [0, 1]; the forward pass saw it clamped
    assert m.report()["entropy_final"] < m.report()["entropy_init"]


def _task_arithmetic(pool, lam):
    return {
        k: pool.base[k] + sum(lam * (s[k] - pool.base[k]) for s in pool.experts.values())
        for k in pool.base
    }


def test_merge_uses_the_learned_coefficients(pool):
    m, out = _fit(pool)
    lam = m.report()["coefficients"]
    for k in pool.base:
        want = pool.base[k] + sum(
            lam[e] * (pool.experts[e][k] - pool.base[k]) for e in pool.experts
        )
        assert torch.allclose(out[k], want, atol=1e-6), k
    assert _full_entropy(pool, out) == pytest.approx(m.report()["entropy_final"], abs=1e-4)


def test_layer_wise_shape_and_bounds(pool):
    m, out = _fit(pool, granularity="layer")
    names = list(pool.base)
    assert tuple(m._coef.shape) == (len(names), 2)
    rep = json.loads(json.dumps(m.report()))
    assert list(rep["coefficients"]) == names
    values = [v for row in rep["coefficients"].values() for v in row.values()]
    assert all(0.0 <= v <= 1.0 for v in values) and len(set(values)) > 2
    assert rep["entropy_final"] < rep["entropy_init"]
    k = names[3]
    row = rep["coefficients"][k]
    want = pool.base[k] + sum(row[e] * (pool.experts[e][k] - pool.base[k]) for e in pool.experts)
    assert torch.allclose(out[k], want, atol=1e-6)


def test_pp_masks_are_ties_disjoint_masks(pool):
    m, out = _fit(pool, pp=True, granularity="layer", density=0.3)
    ties = TIES(density=0.3, scaling=1.0)
    from _drive import drive

    ref = drive(ties, pool.base, pool.experts)
    assert m.report()["thresholds"] == ties.report()["thresholds"]
    th = list(ties.report()["thresholds"].values())
    lam = m.report()["coefficients"]
    for k in pool.base:
        taus = [pool.experts[e][k] - pool.base[k] for e in pool.experts]
        trimmed = [trim_by_threshold(t, x) for t, x in zip(taus, th, strict=True)]
        sign = elect_sign(trimmed)
        vs = disjoint_task_vectors(taus, th)
        for tr, v in zip(trimmed, vs, strict=True):
            mask = (torch.sign(tr) == sign) & (tr != 0)
            assert torch.equal(v != 0, mask) and torch.equal(v[mask], tr[mask])
        # TIES' disjoint mean is Σ v_k / #agreeing
        count = sum((v != 0).float() for v in vs)
        mean = torch.where(count > 0, sum(vs) / count.clamp_min(1), 0.0)
        assert torch.allclose(disjoint_merge(trimmed, sign), mean)
        assert torch.allclose(ref[k], pool.base[k] + mean, atol=1e-6)
        want = pool.base[k] + sum(lam[k][e] * v for e, v in zip(pool.experts, vs, strict=True))
        assert torch.allclose(out[k], want, atol=1e-6)
    assert m.report()["entropy_final"] < m.report()["entropy_init"]


def test_bfloat16_model_and_vectors(pool):
    m = AdaMerging(**{**FAST, "fit_dtype": "bfloat16", "granularity": "layer"})
    ctx = make_context(pool)
    build = ctx.build_model
    ctx.build_model = lambda member: build(member).to(torch.bfloat16)  # a bf16 checkpoint
    out = drive_fit(m, ctx, pool.base, pool.experts)
    rep = m.report()
    assert rep["entropy_final"] < rep["entropy_init"]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())


def test_functional_call_params_are_differentiable(pool):
    from tests.helpers.tiny_lm import make_tiny_llama

    model = make_tiny_llama(pool.vocab, seed=0, hidden_size=32, num_layers=2)
    model.load_state_dict(pool.base)
    model.requires_grad_(False)
    names = list(pool.base)
    vectors = {
        n: torch.stack([pool.experts[e][n] - pool.base[n] for e in pool.experts]) for n in names
    }
    ids, mask = right_pad(encode_prompts(pool.tokenizer, ["1+2=", "sky is "], 512), 0)
    for shape in [(2,), (len(names), 2)]:
        lam = torch.full(shape, 0.3, requires_grad=True)
        params = merged_parameters(pool.base, vectors, clamp_coefficients(lam), names)
        out = torch.func.functional_call(
            model, params, args=(), kwargs={"input_ids": ids, "attention_mask": mask}
        )
        last_token_entropy(out.logits, mask).mean().backward()
        assert lam.grad is not None and lam.grad.abs().sum() > 0
        assert lam.grad.shape == shape
    # the model itself was not modified
    assert all(torch.equal(v, pool.base[k]) for k, v in model.state_dict().items())


def test_same_seed_same_coefficients(pool):
    kw = {"batch_size": 4, "steps": 6}  # batches are sampled (12 and 8 prompts > 4)
    a, _ = _fit(pool, seed=3, **kw)
    b, _ = _fit(pool, seed=3, **kw)
    c, _ = _fit(pool, seed=4, **kw)
    assert torch.equal(a._coef, b._coef)
    assert a.report()["entropy_curve"] == b.report()["entropy_curve"]
    assert a.report()["entropy_curve"] != c.report()["entropy_curve"]


@pytest.mark.parametrize(("granularity", "pp"), [("task", False), ("layer", True)])
def test_coefficients_path_reuse_skips_fitting(pool, tmp_path, granularity, pp):
    m, out = _fit(pool, granularity=granularity, pp=pp)
    bare = tmp_path / "report.json"
    bare.write_text(json.dumps(m.report()))
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"method": {"name": "adamerging", "report": m.report()}}))
    for path in (bare, result):
        r = AdaMerging(granularity=granularity, pp=pp, coefficients_path=str(path))
        assert r.needs_data is False and AdaMerging.needs_data is True
        assert r.stat_passes == (2 if pp else 0)
        again = drive_fit(r, None, pool.base, pool.experts)
        assert all(torch.allclose(again[k], out[k], atol=1e-6) for k in out)
        assert r.report()["coefficients"] == m.report()["coefficients"]
        assert r.report()["coefficients_path"] == str(path)

        def boom(member):
            raise AssertionError("fit must not build a model when reusing coefficients")

        ctx = make_context(pool)
        ctx.build_model = boom
        r.fit(ctx)  # a runner that calls fit anyway: checks coverage, learns nothing


def test_coefficients_path_mismatch(pool, tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"granularity": "task", "pp": False, "coefficients": {"x": 0.5}}))
    with pytest.raises(ValueError, match="granularity"):
        AdaMerging(granularity="layer", coefficients_path=str(path))
    r = AdaMerging(coefficients_path=str(path))
    with pytest.raises(ValueError, match=r"no coefficient for experts \['add', 'color'\]"):
        r.setup(["add", "color"], 0)
    with pytest.raises(ValueError, match="is not a file"):
        AdaMerging(coefficients_path=str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text(json.dumps({"method": {"report": {}}}))
    with pytest.raises(ValueError, match="holds no AdaMerging coefficients"):
        AdaMerging(coefficients_path=str(tmp_path / "bad.json"))


def test_no_calibration_is_an_error(pool):
    m = AdaMerging(**FAST)
    m.setup(list(pool.experts), 0)
    with pytest.raises(ValueError, match="calibration prompts"):
        m.fit(make_context(pool, calibration={"tiny_add": []}))


def test_merge_before_fit_raises():
    m = AdaMerging()
    m.setup(["a"], 0)
    with pytest.raises(RuntimeError, match="fit has not run"):
        m.merge_tensor("w", torch.zeros(2), {"a": torch.ones(2)})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"granularity": "tensor"}, r"method.granularity must be one of \['task', 'layer'\]"),
        ({"init": 1.5}, r"method.init must be in \[0, 1\]"),
        ({"lr": 0}, "method.lr must be > 0"),
        ({"steps": -1}, "method.steps must be an integer >= 0"),
        ({"batch_size": 0}, "method.batch_size must be an integer >= 1"),
        ({"density": 0}, r"method.density must be in \(0, 1\]"),
        ({"pp": "yes"}, "method.pp must be true or false"),
        ({"trim_scope": "x"}, "method.trim_scope"),
        ({"fit_dtype": "int8"}, "method.fit_dtype must be one of"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdaMerging(**kwargs)


@pytest.mark.parametrize(
    ("conf", "granularity", "pp"),
    [
        ("adamerging", "task", False),
        ("adamerging_layerwise", "layer", False),
        ("adamerging_pp", "task", True),
        ("adamerging_layerwise_pp", "layer", True),
    ],
)
def test_yaml_instantiates(conf, granularity, pp):
    m = instantiate_conf(conf)
    assert isinstance(m, AdaMerging) and m.name == "adamerging" and m.needs_data
    assert (m.granularity, m.pp, m.init, m.lr, m.steps, m.batch_size) == (
        granularity,
        pp,
        0.3,
        1e-3,
        500,
        16,
    )
    assert m.stat_passes == 0
