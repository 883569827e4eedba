"""The composed task-vector core: pieces on hand-computed tensors, side-by-side statistics
passes, and ``method=task_vector`` compositions that equal the named methods bit for bit."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from _drive import drive, instantiate_overrides

from core.dropout import dare_keep_mask, mask_seed
from core.pieces import (
    DisjointMean,
    Fixed,
    Identity,
    KeptCounter,
    LearnedCoefficients,
    MagnitudeTrim,
    Passes,
    RandomDrop,
    Sum,
)
from harness.records import method_params
from methods.adamerging import AdaMerging
from methods.metagpt import MetaGPTCoefficients
from methods.task_vector import TaskVectorMerge


def _pool(k: int = 3):
    g = torch.Generator().manual_seed(0)
    shapes = {"model.layers.0.mlp.up_proj.weight": (24, 16), "model.norm.weight": (16,)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    names = ("math", "code", "chat")[:k]
    experts = {
        e: {n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base.items()} for e in names
    }
    return base, experts


def test_sum_of_identity_is_task_arithmetic_by_hand():
    base = torch.tensor([1.0, 2.0])
    experts = {"a": torch.tensor([2.0, 2.0]), "b": torch.tensor([1.0, 4.0])}
    m = TaskVectorMerge(Identity(), Sum(), Fixed(0.5, [1.0, 2.0]))
    out = drive(m, {"t": base}, {e: {"t": v} for e, v in experts.items()})["t"]
    # τa = [1, 0], τb = [0, 2]: 1 + 0.5·(1·1 + 2·0), 2 + 0.5·(1·0 + 2·2)
    assert torch.equal(out, torch.tensor([1.5, 4.0]))


def test_per_tensor_trim_and_disjoint_mean_by_hand():
    base = torch.zeros(4)
    experts = {"a": torch.tensor([3.0, -1.0, 0.5, 2.0]), "b": torch.tensor([-4.0, 1.0, 0.1, 1.0])}
    m = TaskVectorMerge(MagnitudeTrim(0.5, "per_tensor"), DisjointMean(), Fixed())
    out = drive(m, {"t": base}, {e: {"t": v} for e, v in experts.items()})["t"]
    # trimmed a = [3, 0, 0, 2], b = [-4, 1, 0, 1]; signs: sum [-1, 1, 0, 3] → [-, +, 0, +]
    # agreeing: entry 0 only b (−4), entry 1 only b (1), entry 2 none, entry 3 both (1.5)
    assert torch.equal(out, torch.tensor([-4.0, 1.0, 0.0, 1.5]))
    assert m.report()["kept_fraction"] == {"a": 0.5, "b": 0.75}


def test_random_drop_l1_rescale_by_hand():
    tau = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0])
    drop = RandomDrop(0.5, rescale="l1")
    drop.setup(["a"], seed=4)
    out = drop.apply("w", {"a": tau})["a"]
    keep = dare_keep_mask(tau.shape, 0.5, mask_seed(4, "a", "w"))
    assert 0 < int(keep.sum()) < 6  # the check below needs a real drop
    kept = torch.where(keep, tau, torch.zeros_like(tau))
    assert torch.equal(out, kept * (torch.tensor(21.0) / kept.abs().sum()))  # ‖τ‖₁ = 21
    inverse = RandomDrop(0.5)
    inverse.setup(["a"], seed=4)
    assert torch.equal(inverse.apply("w", {"a": tau})["a"], kept * 2.0)
    with pytest.raises(ValueError, match="method.transform.rescale must be one of"):
        RandomDrop(0.5, rescale="l2")


def test_passes_run_side_by_side():
    """MetaGPT's norm pass shares the global trim's first read: 2 passes, not 3."""
    seen: list[tuple[str, int]] = []

    class Spy(MetaGPTCoefficients):
        def observe(self, pass_idx, name, taus):
            seen.append(("norms", pass_idx))
            super().observe(pass_idx, name, taus)

    class SpyTrim(MagnitudeTrim):
        def observe(self, pass_idx, name, taus):
            seen.append(("trim", pass_idx))
            super().observe(pass_idx, name, taus)

    m = TaskVectorMerge(SpyTrim(0.3), DisjointMean(), Spy())
    assert m.stat_passes == 2 and Passes(Fixed()).count == 0
    base, experts = _pool()
    drive(m, base, experts)
    per_tensor = len(base)
    assert seen.count(("norms", 0)) == per_tensor and ("norms", 1) not in seen
    assert seen.count(("trim", 0)) == seen.count(("trim", 1)) == per_tensor
    with pytest.raises(ValueError, match="2 statistics passes are declared, got pass 2"):
        m.observe(2, "x", base["model.norm.weight"], {"math": base["model.norm.weight"]})


def test_kept_counter():
    c = KeptCounter(["a", "b"])
    c.add("a", torch.tensor([1.0, 0.0, 2.0, 0.0]))
    c.add("a", torch.tensor([True, True]))
    assert c.fractions() == {"a": 4 / 6, "b": None}


def test_a_piece_must_be_a_piece():
    with pytest.raises(ValueError, match="method.transform must be a core.pieces.Transform"):
        TaskVectorMerge("trim", Sum(), Fixed())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="method.coefficients must be a core.pieces.Coeff"):
        TaskVectorMerge(Identity(), Sum(), {"scaling": 1.0})  # type: ignore[arg-type]
    trim = MagnitudeTrim(0.3)
    TaskVectorMerge(trim, Sum(), Fixed())
    with pytest.raises(ValueError, match="already belongs to another merge"):
        TaskVectorMerge(trim, Sum(), Fixed())


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["method.transform.trim_scope=layer"], "method.transform.trim_scope must be one of"),
        (["method.transform.density=0"], r"method.transform.density must be in \(0, 1\]"),
        (["method.combine.sign_vote=x"], "method.combine.sign_vote must be one of"),
        (["method.coefficients.scaling=.inf"], "method.coefficients.scaling"),
        (["method/transform=drop", "method.transform.drop_rate=1"], "method.transform.drop_rate"),
    ],
)
def test_composed_options_are_named_by_their_config_path(overrides, match):
    with pytest.raises(Exception, match=match):
        instantiate_overrides(["method=task_vector", *overrides])


def test_weights_errors_name_the_piece_option():
    m = instantiate_overrides(["method=task_vector", "method.coefficients.weights={nobody: 1}"])
    with pytest.raises(ValueError, match="method.coefficients.weights names unknown experts"):
        m.setup(["math", "code"], 0)
    ties = instantiate_overrides(["method=ties", "method.weights={nobody: 1}"])
    with pytest.raises(ValueError, match="^method.weights names unknown experts"):
        ties.setup(["math", "code"], 0)


def test_colliding_report_keys_are_kept_per_piece():
    base, experts = _pool()
    m = instantiate_overrides(
        ["method=task_vector", "method/transform=drop", "method/combine=consensus"]
    )
    drive(m, base, experts, seed=1)
    rep = m.report()
    assert "kept_fraction" not in rep
    assert set(rep["transform.kept_fraction"]) == set(experts)
    assert isinstance(rep["combine.kept_fraction"], float)
    assert set(instantiate_overrides(["method=ties"]).report()) >= {"weights", "kept_fraction"}


COMPOSED = [
    (
        ["method=consensus_ta"],
        [
            "method=task_vector",
            "method/transform=none",
            "method/combine=consensus",
            "method.coefficients.scaling=0.3",
        ],
    ),
    (["method=ties"], ["method=task_vector"]),
    (
        ["method=ties", "method.trim_scope=per_tensor", "method.keep_count=floor"],
        [
            "method=task_vector",
            "method.transform.trim_scope=per_tensor",
            "method.transform.keep_count=floor",
        ],
    ),
    (["method=dare_ties"], ["method=task_vector", "method/transform=drop"]),
    (
        ["method=dare_linear", "method.rescale=l1"],
        [
            "method=task_vector",
            "method/transform=drop",
            "method/combine=sum",
            "method.transform.rescale=l1",
        ],
    ),
    (
        ["method=metagpt_ties"],
        ["method=task_vector", "method/coefficients=metagpt", "method.transform.density=0.55"],
    ),
    (
        ["method=metagpt_dare"],
        [
            "method=task_vector",
            "method/transform=drop",
            "method/combine=sum",
            "method/coefficients=metagpt",
            "method.transform.drop_rate=0.45",
        ],
    ),
    (
        ["method=task_arithmetic"],
        [
            "method=task_vector",
            "method/transform=none",
            "method/combine=sum",
            "method.coefficients.scaling=0.3",
        ],
    ),
    (
        ["method=breadcrumbs_ties"],
        ["method=task_vector", "method/transform=breadcrumbs"],
    ),
    (
        ["method=della_linear"],
        [
            "method=task_vector",
            "method/transform=magprune",
            "method/combine=sum",
            "method.coefficients.scaling=0.3",
        ],
    ),
]


@pytest.mark.parametrize(("named", "composed"), COMPOSED, ids=lambda o: " ".join(o))
def test_composition_equals_the_named_method(named, composed):
    base, experts = _pool()
    a, b = instantiate_overrides(named), instantiate_overrides(composed)
    assert a.stat_passes == b.stat_passes
    ra, rb = drive(a, base, experts, seed=5), drive(b, base, experts, seed=5)
    for n in base:
        assert torch.equal(ra[n], rb[n]), n


def test_new_composition_metagpt_over_dare_with_election_by_hand():
    """A composition no named method offers: MetaGPT's λ over DARE drops, TIES' election."""
    base, experts = _pool()
    m = instantiate_overrides(
        ["method=task_vector", "method/transform=drop", "method/coefficients=metagpt"]
    )
    out = drive(m, base, experts, seed=2)
    sq = {
        e: sum(float((t[n] - base[n]).double().square().sum()) for n in base)
        for e, t in experts.items()
    }
    lam = [sq[e] / sum(sq.values()) for e in experts]
    assert m.report()["coefficients"] == pytest.approx(dict(zip(experts, lam, strict=True)))
    for n, b in base.items():
        vs = []
        for e, t in experts.items():
            keep = dare_keep_mask(b.shape, 0.5, mask_seed(2, e, n))
            vs.append(torch.where(keep, (t[n] - b) / 0.5, torch.zeros_like(b)))
        sign = torch.sign(sum(vs))
        num = sum(
            w * v * ((torch.sign(v) == sign) & (v != 0)) for w, v in zip(lam, vs, strict=True)
        )
        den = sum(
            w * ((torch.sign(v) == sign) & (v != 0)).float() for w, v in zip(lam, vs, strict=True)
        )
        want = b + torch.where(den > 0, num / den.clamp_min(1e-38), 0.0)
        torch.testing.assert_close(out[n], want, rtol=1e-6, atol=1e-7)


def test_method_params_flatten_pieces():
    cfg = {
        "_target_": "methods.task_vector.TaskVectorMerge",
        "transform": {"_target_": "core.pieces.RandomDrop", "drop_rate": 0.3, "rescale": "l1"},
        "combine": {"_target_": "core.pieces.Sum"},
        "coefficients": {"_target_": "methods.metagpt.MetaGPTCoefficients"},
    }
    assert method_params(cfg) == {
        "transform": "RandomDrop",
        "transform.drop_rate": 0.3,
        "transform.rescale": "l1",
        "combine": "Sum",
        "coefficients": "MetaGPTCoefficients",
    }
    assert method_params({"_target_": "methods.ties.TIES", "density": 0.2}) == {"density": 0.2}


def _record(tmp_path, report: dict) -> str:
    path = tmp_path / "result.json"
    path.write_text(json.dumps({"status": "complete", "method": {"report": report}}))
    return str(path)


def test_learned_coefficients_task_wise_equal_fixed_weights(tmp_path):
    base, experts = _pool()
    w = {"math": 0.25, "code": 0.5, "chat": 0.75}
    learned = LearnedCoefficients(_record(tmp_path, {"coefficients": w}), scaling=0.8)
    a = drive(TaskVectorMerge(MagnitudeTrim(0.3), DisjointMean(), learned), base, experts)
    b = drive(TaskVectorMerge(MagnitudeTrim(0.3), DisjointMean(), Fixed(0.8, w)), base, experts)
    assert all(torch.equal(a[n], b[n]) for n in base)
    assert learned.report()["weights_kind"] == "per_expert"


def test_learned_coefficients_per_tensor_and_per_layer_group_by_hand(tmp_path):
    base = torch.zeros(2)
    experts = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([0.0, 1.0])}
    pool = {
        e: {"model.layers.3.mlp.up_proj.weight": t, "model.norm.weight": t}
        for e, t in experts.items()
    }
    zeros = {n: base for n in pool["a"]}
    per_tensor = {
        "model.layers.3.mlp.up_proj.weight": {"a": 0.5, "b": 0.25},
        "model.norm.weight": {"a": 1.0, "b": 2.0},
    }
    out = drive(
        TaskVectorMerge(
            Identity(), Sum(), LearnedCoefficients(_record(tmp_path, {"coefficients": per_tensor}))
        ),
        zeros,
        pool,
    )
    assert torch.equal(out["model.layers.3.mlp.up_proj.weight"], torch.tensor([0.5, 0.25]))
    assert torch.equal(out["model.norm.weight"], torch.tensor([1.0, 2.0]))
    sens = {"scale": {"layers.3": {"a": 1.5, "b": 0.5}, "other": {"a": 1.0, "b": 1.0}}}
    coef = LearnedCoefficients(_record(tmp_path, sens), scaling=0.5)
    out = drive(TaskVectorMerge(Identity(), Sum(), coef), zeros, pool)
    assert torch.equal(out["model.layers.3.mlp.up_proj.weight"], torch.tensor([0.75, 0.25]))
    assert torch.equal(out["model.norm.weight"], torch.tensor([0.5, 0.5]))
    assert coef.report()["weights_kind"] == "per_layer_group"
    digest = hashlib.sha256(Path(coef.path).read_bytes()).hexdigest()
    assert coef.report()["weights_sha256"] == digest


def test_learned_coefficients_errors_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="method.coefficients.path .* cannot read"):
        LearnedCoefficients(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="holds neither 'coefficients'"):
        LearnedCoefficients(_record(tmp_path, {"weights": {"a": 1.0}}))
    coef = LearnedCoefficients(_record(tmp_path, {"coefficients": {"math": 1.0}}))
    with pytest.raises(ValueError, match=r"no weight for experts \['code'\]"):
        coef.setup(["math", "code"], 0)


def test_adamerging_coefficients_reused_by_a_composition(tmp_path):
    """AdaMerging's task-wise λ from a report, merged by AdaMerging itself and by
    ``none × sum × learned``: equal up to the rounding of its one ``tensordot``."""
    base, experts = _pool()
    path = _record(
        tmp_path,
        {
            "granularity": "task",
            "pp": False,
            "coefficients": {"math": 0.2, "code": 0.6, "chat": 0.35},
        },
    )
    ada = AdaMerging(coefficients_path=path)
    composed = TaskVectorMerge(Identity(), Sum(), LearnedCoefficients(path))
    a, b = drive(ada, base, experts), drive(composed, base, experts)
    for n in base:
        torch.testing.assert_close(a[n], b[n], rtol=0, atol=4 * torch.finfo(torch.float32).eps)


def test_variance_select_and_consensus_pieces_by_hand():
    from methods.consensus import ConsensusMask
    from methods.sce import VarianceSelect

    taus = {"a": torch.tensor([1.0, 0.0, 3.0, 2.0]), "b": torch.tensor([1.0, 4.0, -3.0, 2.0])}
    # variances over the 2 experts: [0, 4, 9, 0]; 2 non-zero, select_topk 0.5 keeps 1 (9)
    out = VarianceSelect(0.5).apply("t", taus)
    assert torch.equal(out["a"], torch.tensor([0.0, 0.0, 3.0, 0.0]))
    assert torch.equal(out["b"], torch.tensor([0.0, 0.0, -3.0, 0.0]))
    combine = ConsensusMask(mask_lambda=0.5, min_agreement=2)
    combine.setup(["a", "b"], 0)
    # Σ = [2, 4, 0, 4]; m_a = |a| ≥ 0.5|b| → [1, 0, 1, 1]; m_b = |b| ≥ 0.5|a| → [1, 1, 1, 1]
    merged = combine(torch.zeros(4), list(taus.values()), 0.5, [1.0, 1.0])
    assert torch.equal(merged, torch.tensor([1.0, 0.0, 0.0, 2.0]))
    assert combine.report()["kept_fraction"] == 0.75
    with pytest.raises(ValueError, match="min_agreement=2 exceeds the pool's 1 experts"):
        combine.setup(["a"], 0)
