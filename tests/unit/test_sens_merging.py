import json
import math

import pytest
import torch
from _drive import drive, instantiate_conf
from _fit import ADD_TASK, CALIBRATION, EXPERT_TASKS, drive_fit, make_context, tiny_pool

from core.lm import encode_prompts
from core.numerics import one_thread
from methods.sens_merging import (
    SensMerging,
    alignment_beta,
    group_tensors,
    layer_group,
    normalise_over_layers,
    pair_alignment,
    rescale_experts,
    sens_sigma,
)
from methods.task_arithmetic import TaskArithmetic
from methods.ties import TIES
from tests.helpers.tiny_lm import make_tiny_llama


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def pool():
    return tiny_pool()


@pytest.fixture(scope="module")
def fitted(pool):
    """One TA-based Sens-Merging fit on the tiny pool (T = 0.05 for visible contrasts)."""
    m = SensMerging(temperature=0.05)
    out = drive_fit(m, make_context(pool), pool.base, pool.experts)
    return m, out


# -------------------------------------------------------------------- groups


def test_layer_groups():
    assert layer_group("model.layers.11.mlp.up_proj.weight") == "layers.11"
    assert layer_group("transformer.h.3.attn.c_attn.weight") == "layers.3"
    assert layer_group("model.embed_tokens.weight") == "embed"
    assert layer_group("transformer.wte.weight") == "embed"
    assert layer_group("lm_head.weight") == "head"
    assert layer_group("gpt_neox.embed_out.weight") == "head"
    assert layer_group("model.norm.weight") == "other"
    groups = group_tensors(["model.embed_tokens.weight", "model.layers.0.a", "model.layers.0.b"])
    assert groups == {
        "embed": ["model.embed_tokens.weight"],
        "layers.0": ["model.layers.0.a", "model.layers.0.b"],
    }


# ------------------------------------------------------------ pure functions


def test_normalisations():
    s = torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    alpha = normalise_over_layers(s)
    assert alpha.tolist()[0] == pytest.approx([0.25, 0.75, 0.0])
    assert alpha.tolist()[1] == pytest.approx([1 / 3] * 3)  # all-zero row: uniform
    beta = torch.tensor([0.7, 0.3], dtype=torch.float64)
    sigma = sens_sigma(alpha, beta, 0.1)
    assert sigma.sum(0).tolist() == pytest.approx([1.0, 1.0, 1.0])
    # by hand, layer 1: softmax([0.75·0.7, (1/3)·0.3] / 0.1)
    a, b = 0.75 * 0.7 / 0.1, 0.1 / 0.1
    assert sigma[0, 1].item() == pytest.approx(math.exp(a) / (math.exp(a) + math.exp(b)))


def test_pair_alignment_metrics():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 7, generator=g)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert pair_alignment(z, z, mask, "kl").item() == pytest.approx(0.0, abs=1e-5)
    assert pair_alignment(z, z, mask, "l2").item() == 0.0
    assert pair_alignment(z, z, mask, "cosine").item() == pytest.approx(5.0)  # 5 real positions
    # KL ignores a per-position logit shift, L2 does not
    assert pair_alignment(z + 3.0, z, mask, "kl").item() == pytest.approx(0.0, abs=1e-5)
    assert pair_alignment(z + 3.0, z, mask, "l2").item() == pytest.approx(5 * 3.0 * math.sqrt(7))


def test_beta_orders_models_by_alignment():
    # constructed logits: models A and B agree with each other, C is far from both
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(4, 5, 11, generator=g)
    mask = torch.ones(4, 5)
    logits = {"A": ref, "B": ref + 0.1 * torch.randn(4, 5, 11, generator=g), "C": -2 * ref}
    for kind in ("kl", "l2", "cosine"):
        scores = []
        for k in logits:
            pair = [pair_alignment(logits[k], logits[j], mask, kind) / 20 for j in logits if j != k]
            scores.append(float(sum(pair)) / len(pair))
        beta = alignment_beta(scores, kind)
        assert beta.sum().item() == pytest.approx(1.0)
        assert beta[2] < beta[0] and beta[2] < beta[1], kind
    assert alignment_beta([3.0], "kl").tolist() == [1.0]


def test_rescale_experts():
    base, e = (
        torch.tensor([1.0, 1.0]),
        {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([2.0, 2.0])},
    )
    out = rescale_experts(base, e, {"a": 0.5, "b": 1.0})
    assert out["a"].tolist() == [2.0, 0.5] and out["b"] is e["b"]


# ------------------------------------------------------------------- fitting


def test_sigma_and_alpha_normalise(fitted):
    m, _ = fitted
    rep = json.loads(json.dumps(m.report()))
    groups = list(rep["sigma"])
    assert groups == ["embed", "layers.0", "layers.1", "other", "head"]
    for g in groups:
        assert sum(rep["sigma"][g].values()) == pytest.approx(1.0, abs=1e-12)
        assert rep["scale"][g]["add"] == pytest.approx(2 * rep["sigma"][g]["add"])
    for e in ("add", "color"):
        assert sum(rep["alpha"][g][e] for g in groups) == pytest.approx(1.0, abs=1e-12)
    assert sum(rep["beta"].values()) == pytest.approx(1.0)
    assert rep["calibration_tasks"] == {"add": ["tiny_add"], "color": ["tiny_color"]}
    assert rep["n_prompts"] == {"add": 12, "color": 8}


def test_coefficients_differ_across_layers(fitted):
    rep = fitted[0].report()
    add_sigma = [row["add"] for row in rep["sigma"].values()]
    assert max(add_sigma) - min(add_sigma) > 0.05
    add_alpha = [row["add"] for row in rep["alpha"].values()]
    assert len({round(a, 6) for a in add_alpha}) == len(add_alpha)


def test_ta_base_is_ta_on_rescaled_vectors(pool, fitted):
    m, out = fitted
    scale = m.report()["scale"]
    for k in pool.base:
        c = scale[layer_group(k)]
        want = pool.base[k] + 0.3 * sum(
            c[e] * (pool.experts[e][k] - pool.base[k]) for e in pool.experts
        )
        assert torch.allclose(out[k], want, atol=1e-6), k


def test_sensitivity_is_mean_abs_weight_times_grad(pool, fitted):
    m = fitted[0]
    model = make_tiny_llama(pool.vocab, seed=0, hidden_size=32, num_layers=2)
    model.load_state_dict(pool.experts["add"])
    seqs = encode_prompts(pool.tokenizer, CALIBRATION[ADD_TASK][:2], 512)
    groups = group_tensors(list(pool.base))
    got = m._sensitivity(model, groups, seqs, "cpu")
    want = dict.fromkeys(groups, 0.0)
    model.requires_grad_(True)
    params = dict(model.named_parameters())
    for s in seqs:
        ids = torch.tensor([s])
        loss = model(input_ids=ids, labels=ids).loss
        names = list(pool.base)
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        for n, gr in zip(names, grads, strict=True):
            want[layer_group(n)] += float((params[n].detach() * gr).abs().sum()) / len(seqs)
    assert got == pytest.approx(want, rel=1e-5)


def test_equal_sigma_reduces_to_ta(pool):
    m = SensMerging(temperature=1e12)  # α·β/T ≈ 0: σ = 1/K, K·σ = 1
    out = drive_fit(m, make_context(pool), pool.base, pool.experts)
    ta = drive(TaskArithmetic(scaling=0.3), pool.base, pool.experts)
    assert all(torch.allclose(out[k], ta[k], atol=1e-6) for k in ta)
    m.setup(list(pool.experts), 0)  # exactly equal σ: K·σ = 1 in every group
    m.factors = {g: dict.fromkeys(pool.experts, 1.0) for g in group_tensors(list(pool.base))}
    for k in pool.base:
        exp = {e: s[k] for e, s in pool.experts.items()}
        assert torch.equal(m.merge_tensor(k, pool.base[k], exp), ta[k])


def test_ties_base_sees_rescaled_vectors(pool):
    m = SensMerging(base_method="ties", density=0.3, temperature=0.05)
    assert m.stat_passes == 2
    out = drive_fit(m, make_context(pool), pool.base, pool.experts)
    scale = m.report()["scale"]
    rescaled = {
        e: {k: pool.base[k] + scale[layer_group(k)][e] * (s[k] - pool.base[k]) for k in pool.base}
        for e, s in pool.experts.items()
    }
    ref_ties = TIES(density=0.3)
    ref = drive(ref_ties, pool.base, rescaled)
    assert m.report()["base"]["thresholds"] == ref_ties.report()["thresholds"]
    assert all(torch.equal(out[k], ref[k]) for k in pool.base)
    raw = TIES(density=0.3)
    drive(raw, pool.base, pool.experts)
    assert raw.report()["thresholds"] != ref_ties.report()["thresholds"]


@pytest.mark.parametrize("alignment", ["kl", "l2", "cosine"])
def test_beta_penalises_a_misaligned_expert(pool, alignment):
    g = torch.Generator().manual_seed(5)
    far = {k: v + 0.5 * torch.randn(v.shape, generator=g) for k, v in pool.base.items()}
    experts = {**pool.experts, "far": far}
    ctx = make_context(
        pool,
        experts=experts,
        expert_tasks={**EXPERT_TASKS, "far": ["tiny_far"]},
        calibration={**CALIBRATION, "tiny_far": ["hello ", "abc", "xyz"]},
    )
    m = SensMerging(alignment=alignment, n_calibration=6)
    drive_fit(m, ctx, pool.base, experts)
    beta = m.report()["beta"]
    assert beta["far"] < min(beta["add"], beta["color"]), beta
    assert m.report()["n_prompts"] == {"add": 6, "color": 6, "far": 3}


def test_expert_without_tasks_falls_back_to_all_prompts(pool):
    m = SensMerging(n_calibration=4)
    ctx = make_context(pool, expert_tasks={"add": ["tiny"], "color": []})
    with pytest.warns(UserWarning, match="no calibration prompts of its own tasks"):
        drive_fit(m, ctx, pool.base, pool.experts)
    tasks = m.report()["calibration_tasks"]
    assert tasks == {"add": ["tiny_add", "tiny_color"], "color": ["tiny_add", "tiny_color"]}


def test_merge_before_fit_raises():
    m = SensMerging()
    m.setup(["a"], 0)
    with pytest.raises(RuntimeError, match="fit has not run"):
        m.merge_tensor("w", torch.zeros(2), {"a": torch.ones(2)})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base_method": "metagpt"}, "method.base_method must be one of"),
        ({"temperature": 0}, "method.temperature must be > 0"),
        ({"alignment": "js"}, r"method.alignment must be one of \['kl', 'l2', 'cosine'\]"),
        ({"n_calibration": 0}, "method.n_calibration must be an integer >= 1"),
        ({"density": 1.5}, r"method.density must be in \(0, 1\]"),
        ({"drop_rate": 1.0}, r"method.drop_rate must be in \[0, 1\)"),
        ({"scaling": float("inf")}, "method.scaling"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SensMerging(**kwargs)


@pytest.mark.parametrize(
    ("conf", "base_cls", "passes"),
    [("sens_ta", "TaskArithmetic", 0), ("sens_ties", "TIES", 2), ("sens_dare", "DARELinear", 0)],
)
def test_yaml_instantiates(conf, base_cls, passes):
    m = instantiate_conf(conf)
    assert isinstance(m, SensMerging) and m.name == "sens_merging" and m.needs_data
    assert type(m.base).__name__ == base_cls and m.stat_passes == passes
    assert (m.temperature, m.n_calibration, m.alignment) == (1.0, 100, "kl")
    # null options take the base method's defaults
    assert SensMerging().base.coefficients.scaling == 0.3
