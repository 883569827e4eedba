import json

import pytest
import torch
from _fit import CALIBRATION, drive_fit, make_context, tiny_pool

from core.lm import encode_prompts, right_pad
from core.numerics import one_thread
from methods.fisher import FisherMerging, fisher_merge
from methods.regmean import (
    RegMean,
    RegMeanPlusPlus,
    collect_grams,
    linear_modules,
    regmean_merge,
    scale_off_diagonal,
    solve_regmean,
)


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def pool():
    return tiny_pool()


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ------------------------------------------------------------ fisher_merge by hand


def test_fisher_merge_hand_values():
    out = fisher_merge([t(0.0), t(4.0)], [t(1.0), t(3.0)], eps=0.0)
    assert out.item() == pytest.approx(3.0)  # (1·0 + 3·4) / (1 + 3)
    out = fisher_merge([t(0.0, 2.0), t(4.0, 6.0)], [t(1.0, 1.0), t(3.0, 0.0)], eps=0.0)
    assert out.tolist() == pytest.approx([3.0, 2.0])
    # per-expert weights λ multiply the Fishers: (1·1·0 + 3·1·4) / (1 + 3)
    out = fisher_merge([t(0.0), t(4.0)], [t(1.0), t(1.0)], eps=0.0, weights=[1.0, 3.0])
    assert out.item() == pytest.approx(3.0)


def test_fisher_floor_and_zero_fisher_fallback():
    experts = [t(0.0, 0.0, 2.0), t(4.0, 4.0, 6.0)]
    fishers = [t(0.0, 0.0, 0.0), t(3.0, 0.0, 0.0)]
    # eps = 0: entries with Σ F = 0 take the plain mean, others the Fisher average
    assert fisher_merge(experts, fishers, eps=0.0).tolist() == pytest.approx([4.0, 2.0, 4.0])
    # the floor is a max: F̃ = [1, 3] → 3 where expert 2 has F = 3, the mean elsewhere
    assert fisher_merge(experts, fishers, eps=1.0).tolist() == pytest.approx([3.0, 2.0, 4.0])
    # the fallback mean is λ-weighted
    out = fisher_merge(experts, fishers, eps=0.0, weights=[1.0, 3.0])
    assert out.tolist() == pytest.approx([4.0, 3.0, 5.0])


# ----------------------------------------------------------- regmean_merge by hand


def test_regmean_diagonal_grams_pick_columns():
    w1, w2 = t([1.0, 2.0], [3.0, 4.0]), t([5.0, 6.0], [7.0, 8.0])
    g1, g2 = torch.diag(t(1.0, 0.0)), torch.diag(t(0.0, 1.0))
    # input feature 0 is seen only by expert 1, feature 1 only by expert 2
    out = regmean_merge([w1, w2], [g1, g2], alpha=1.0)
    assert torch.allclose(out, t([1.0, 6.0], [3.0, 8.0]))
    assert torch.allclose(regmean_merge([w1, w2], [g1, g2], alpha=0.3), out)


def test_off_diagonal_scaling():
    g = t([2.0, 1.0], [1.0, 3.0])
    assert scale_off_diagonal(g, 0.5).tolist() == [[2.0, 0.5], [0.5, 3.0]]
    assert torch.equal(scale_off_diagonal(g, 1.0), g)
    # α = 0: each input column is the diag(G)-weighted average of the experts' columns
    w1, w2 = t([1.0, 2.0], [3.0, 4.0]), t([5.0, 6.0], [7.0, 8.0])
    g1, g2 = t([1.0, 1.0], [1.0, 4.0]), t([3.0, 0.5], [0.5, 1.0])
    out = regmean_merge([w1, w2], [g1, g2], alpha=0.0)
    want = torch.stack([(1 * w1[:, 0] + 3 * w2[:, 0]) / 4, (4 * w1[:, 1] + 1 * w2[:, 1]) / 5], 1)
    assert torch.allclose(out, want, atol=1e-6)


def test_regmean_is_the_least_squares_solution_in_linear_orientation():
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(20, 3, generator=gen), torch.randn(30, 3, generator=gen)]
    ws = [torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)]  # out × in
    grams = [x.T @ x for x in xs]
    out = regmean_merge(ws, grams, alpha=1.0)
    # min_W Σ_k ‖X_k Wᵀ − X_k W_kᵀ‖²: ordinary least squares on the stacked data
    x = torch.cat(xs).double()
    y = torch.cat([xk @ wk.T for xk, wk in zip(xs, ws, strict=True)]).double()
    want = torch.linalg.lstsq(x, y).solution.T
    assert out.shape == (4, 3)
    assert torch.allclose(out.double(), want, atol=1e-5)
    # by hand: (W1 G1 + W2 G2)(G1 + G2)⁻¹
    hand = (ws[0] @ grams[0] + ws[1] @ grams[1]) @ torch.linalg.inv(grams[0] + grams[1])
    assert torch.allclose(out, hand, atol=1e-4)


def test_identical_grams_give_the_average():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 5, generator=gen)
    g = x.T @ x
    ws = [torch.randn(3, 5, generator=gen) for _ in range(3)]
    for alpha in (1.0, 0.5):
        out = regmean_merge(ws, [g, g, g], alpha=alpha)
        assert torch.allclose(out, torch.stack(ws).mean(0), atol=1e-5)


def test_singular_gram_falls_back_to_the_mean_direction():
    w1, w2 = t([1.0, 2.0]), t([3.0, 10.0])  # one output row, two input features
    g = torch.diag(t(1.0, 0.0))  # input feature 1 never active
    merged, ridge = solve_regmean(w1 @ g + w2 @ g, g + g, (w1 + w2) / 2)
    assert ridge
    assert torch.allclose(merged, t([2.0, 6.0]).double(), atol=1e-6)


# ------------------------------------------------------------------ tiny-model fits


def _seqs(pool, expert):
    task = {"add": "tiny_add", "color": "tiny_color"}[expert]
    return encode_prompts(pool.tokenizer, CALIBRATION[task], 512)


def test_gram_equals_xtx_of_captured_inputs(pool):
    ctx = make_context(pool)
    model = ctx.build_model("add")
    name = "model.layers.0.mlp.down_proj.weight"
    linears = linear_modules(model, [name])
    seqs = _seqs(pool, "add")
    captured = []
    handle = linears[name].register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))
    ids, mask = right_pad(seqs, 0)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    x = captured[0][mask.bool()].double()  # real tokens only
    assert x.shape[0] == sum(len(s) for s in seqs)
    for bs in (1, 5):
        grams, tokens, unmasked = collect_grams(model, linears, seqs, 0, "cpu", batch_size=bs)
        assert tokens == x.shape[0] and not unmasked
        assert torch.allclose(grams[name], x.T @ x, rtol=1e-4, atol=1e-4)


def test_regmean_fit_merges_linears_by_their_grams_and_averages_the_rest(pool):
    m = RegMean(alpha=0.9)
    out = drive_fit(m, make_context(pool), pool.base, pool.experts)
    rep = json.loads(json.dumps(m.report()))
    assert rep["n_regmean"] == 2 * 7 + 1  # q k v o gate up down per block + lm_head
    assert rep["regmean_per_group"] == {"layers.0": 7, "layers.1": 7, "head": 1}
    assert rep["experts"]["add"]["n_prompts"] == len(CALIBRATION["tiny_add"])
    assert rep["experts"]["color"]["calibration_tasks"] == ["tiny_color"]
    ctx = make_context(pool)
    name = "model.layers.1.self_attn.o_proj.weight"
    grams = []
    for e in ("add", "color"):
        model = ctx.build_model(e)
        g, _, _ = collect_grams(model, linear_modules(model, [name]), _seqs(pool, e), 0, "cpu")
        grams.append(g[name])
    want = regmean_merge([pool.experts[e][name] for e in ("add", "color")], grams, 0.9)
    assert torch.allclose(out[name], want, atol=1e-5)
    for n in ("model.norm.weight", "model.embed_tokens.weight"):
        assert torch.allclose(out[n], (pool.experts["add"][n] + pool.experts["color"][n]) / 2)
    again = drive_fit(RegMean(alpha=0.9), make_context(pool), pool.base, pool.experts)
    assert all(torch.equal(out[n], again[n]) for n in out)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_regmean_pp_uses_merged_earlier_blocks(pool):
    m = RegMeanPlusPlus(alpha=0.9)
    out = drive_fit(m, make_context(pool), pool.base, pool.experts)
    rep = json.loads(json.dumps(m.report()))
    assert rep["stages"] == {"model.layers.0": 7, "model.layers.1": 7, "rest": 1}
    ctx = make_context(pool)
    experts = ("add", "color")
    embed = "model.embed_tokens.weight"
    block0 = [n for n in pool.names if n.startswith("model.layers.0.")]
    name = "model.layers.0.self_attn.q_proj.weight"
    grams = []
    for e in experts:  # block 0's inputs: the merged (mean) embedding, the expert's block 0
        model = ctx.build_model("base")
        state = {**pool.base, embed: out[embed], **{n: pool.experts[e][n] for n in block0}}
        model.load_state_dict(state)
        g, _, _ = collect_grams(model, linear_modules(model, [name]), _seqs(pool, e), 0, "cpu")
        grams.append(g[name])
    want = regmean_merge([pool.experts[e][name] for e in experts], grams, 0.9)
    assert torch.allclose(out[name], want, atol=1e-5)
    plain = drive_fit(RegMean(alpha=0.9), make_context(pool), pool.base, pool.experts)
    later = "model.layers.1.mlp.down_proj.weight"
    assert not torch.allclose(out[later], plain[later], atol=1e-6)
    again = drive_fit(RegMeanPlusPlus(alpha=0.9), make_context(pool), pool.base, pool.experts)
    assert all(torch.equal(out[n], again[n]) for n in out)


@pytest.mark.parametrize("cls", [RegMean, RegMeanPlusPlus])
def test_regmean_of_identical_experts_is_that_expert(pool, cls):
    twins = {"a": pool.experts["add"], "b": pool.experts["add"]}
    ctx = make_context(pool, experts=twins, expert_tasks={"a": ["tiny_add"], "b": ["tiny_color"]})
    out = drive_fit(cls(alpha=1.0), ctx, pool.base, twins)
    for n, v in out.items():
        assert torch.allclose(v, pool.experts["add"][n], atol=1e-4), n


def test_fisher_fit_matches_squared_lm_loss_gradients(pool):
    m = FisherMerging(labels="text", normalize=False, eps=0.0)
    out = drive_fit(m, make_context(pool), pool.base, pool.experts)
    rep = json.loads(json.dumps(m.report()))
    assert rep["experts"]["add"]["n_prompts"] == len(CALIBRATION["tiny_add"])
    name = "model.layers.0.mlp.up_proj.weight"
    model = make_context(pool).build_model("color")
    param = dict(model.named_parameters())[name]
    seqs = _seqs(pool, "color")
    acc = torch.zeros_like(param)
    for s in seqs:  # Σ_t log p(x_{t+1} | x_≤t) = −(T − 1) · mean LM loss
        ids = torch.tensor([s])
        model.zero_grad()
        (-(len(s) - 1) * model(input_ids=ids, labels=ids).loss).backward()
        acc += param.grad.detach() ** 2
    assert torch.allclose(m.fishers[name][1], acc / len(seqs), rtol=1e-4, atol=1e-12)
    want = fisher_merge([pool.experts[e][name] for e in ("add", "color")], m.fishers[name])
    assert torch.allclose(out[name], want)


def test_fisher_sampled_labels_are_deterministic_and_between_the_experts(pool):
    m = FisherMerging()
    out = drive_fit(m, make_context(pool, seed=3), pool.base, pool.experts)
    again = drive_fit(FisherMerging(), make_context(pool, seed=3), pool.base, pool.experts)
    assert all(torch.equal(out[n], again[n]) for n in out)
    for n, v in out.items():
        a, b = pool.experts["add"][n], pool.experts["color"][n]
        assert (v >= torch.minimum(a, b) - 1e-6).all() and (v <= torch.maximum(a, b) + 1e-6).all()
    rep = json.loads(json.dumps(m.report()))
    assert rep["labels"] == "sample" and rep["normaliser"]["add"] > 0
    assert sum(rep["fisher_share"][g]["add"] for g in rep["fisher_share"]) == pytest.approx(1.0)


def test_options_are_validated():
    with pytest.raises(ValueError, match="method.alpha"):
        RegMean(alpha=1.5)
    with pytest.raises(ValueError, match="method.gram"):
        RegMean(gram="median")
    with pytest.raises(ValueError, match="method.labels"):
        FisherMerging(labels="gold")
    with pytest.raises(ValueError, match="method.eps"):
        FisherMerging(eps=-1.0)
