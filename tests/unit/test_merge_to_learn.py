"""Merge to Learn: the combinations on hand-computed tensors, ω, option checks, the
cached training of every component on a tiny Llama, cost attribution, and the configs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from harness.data import load_texts
from methods.base import FitContext
from methods.merge_to_learn import (
    MergeToLearn,
    heuristic_omega,
    linear_merge,
    ptm_merge,
    resolve_omegas,
    wise_ft_merge,
)
from tests.helpers.hydra_conf import compose
from tests.helpers.tiny_lm import make_tiny_llama, make_tiny_lm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- pure functions


def test_combinations_by_hand():
    pre, g = torch.tensor([1.0, 2.0]), torch.tensor([2.0, 0.0])
    d1, d2, cft = torch.tensor([3.0, 3.0]), torch.tensor([1.0, 6.0]), torch.tensor([0.0, 4.0])
    # θG + ω1 (θD1 − θpre) + ω2 (θD2 − θpre) = [2, 0] + 0.5·[2, 1] + 0.25·[0, 4]
    assert torch.equal(ptm_merge(g, pre, [d1, d2], [0.5, 0.25]), torch.tensor([3.0, 1.5]))
    assert torch.equal(ptm_merge(g, pre, [d1], [0.0]), g)
    # (1 − 0.75)·[2, 0] + 0.5·[3, 3] + 0.25·[1, 6]
    assert torch.equal(linear_merge(g, [d1, d2], [0.5, 0.25]), torch.tensor([2.25, 3.0]))
    assert torch.equal(linear_merge(g, [d1], [1.0]), d1)
    # 0.75·[2, 0] + 0.25·[0, 4]
    assert torch.equal(wise_ft_merge(g, cft, 0.25), torch.tensor([1.5, 1.0]))
    assert torch.equal(wise_ft_merge(g, cft, 0.0), g) and torch.equal(wise_ft_merge(g, cft, 1), cft)
    assert torch.equal(g, torch.tensor([2.0, 0.0]))  # inputs untouched


def test_heuristic_omega():
    assert heuristic_omega(2000, 5832) == pytest.approx(0.3429, abs=1e-4)
    assert resolve_omegas("heuristic", {"a": 10, "b": 30}, 100) == {"a": 0.1, "b": 0.3}
    assert resolve_omegas(0.4, {"a": 10, "b": 30}, 100) == {"a": 0.4, "b": 0.4}
    assert resolve_omegas({"a": 0.7, "b": "heuristic"}, {"a": 10, "b": 30}, 100) == {
        "a": 0.7,
        "b": 0.3,
    }
    with pytest.raises(ValueError, match=r"\|G\|"):
        heuristic_omega(3, 0)


@pytest.mark.parametrize(
    "kwargs,option",
    [
        ({"procedure": "merge"}, "method.procedure"),
        ({"omega": -0.1}, "method.omega"),
        ({"omega": "auto"}, "method.omega"),
        ({"omega": float("nan")}, "method.omega"),
        ({"omega": {"code": 0.5}}, "method.omega"),
        ({"omega": {"safety": "x"}}, "method.omega.safety"),
        (
            {
                "procedure": "wise_ft",
                "skills": {"a": {"suite": "code"}, "b": {"suite": "math"}},
                "omega": {"a": 0.2, "b": 0.4},
            },
            "method.omega",
        ),
        ({"skills": {}}, "method.skills"),
        ({"skills": {"x": {"suite": "math", "jsonl": "a.jsonl"}}}, "method.skills.x"),
        ({"skills": {"x": "safety"}}, "method.skills.x"),
        ({"general_data": []}, "method.general_data"),
        ({"general_data": [{"file": "x"}]}, r"method.general_data\[0\]"),
        ({"epochs": 0}, "method.epochs"),
        ({"lr": -1}, "method.lr"),
        ({"warmup": 1.5}, "method.warmup"),
        ({"schedule": "cosine"}, "method.schedule"),
        ({"batch_size": 0}, "method.batch_size"),
        ({"batch_size": 2.5}, "method.batch_size"),
        ({"max_length": 0}, "method.max_length"),
        ({"seed": 1.5}, "method.seed"),
        ({"seed": "x"}, "method.seed"),
        ({"max_length": "long"}, "method.max_length"),
        ({"text_suffix": 3}, "method.text_suffix"),
        ({"general_from": 3}, "method.general_from"),
        ({"checkpoint_every": -1}, "method.checkpoint_every"),
    ],
)
def test_bad_options_name_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        MergeToLearn(**kwargs)


def test_null_source_keys_are_dropped():
    m = MergeToLearn(skills={"s": {"suite": None, "jsonl": "d.jsonl"}})
    assert m.skills == {"s": {"jsonl": "d.jsonl"}}


# --------------------------------------------------------------------------- fit on a tiny Llama

H = {"hidden_size": 16, "num_layers": 1}
TRAIN = {"epochs": 1, "batch_size": 4, "max_length": 16, "lr": 3e-3, "progress": False}
GENERAL = [f"{a}+{b}={a + b}" for a in range(4) for b in range(5)]  # 20
SKILL_A = [f"no {w}" for w in ("hit", "rob", "cut", "lie", "spy", "vex")]  # 6
SKILL_B = [f"ab{c}" for c in "xyzuvwqr"]  # 8


class Setup:
    def __init__(self, root: Path):
        model, self.tok = make_tiny_lm(seed=0, **H)
        self.pre = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.expert = {k: v + 0.01 for k, v in self.pre.items()}  # a pool expert (θG stand-in)
        self.specs = {}
        for name, texts in (("general", GENERAL), ("a", SKILL_A), ("b", SKILL_B)):
            path = root / f"{name}.jsonl"
            path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
            self.specs[name] = {"jsonl": str(path)}
        self.cache = root / "cache"
        self.logged: list[tuple[int, dict]] = []

    def build(self, member: str) -> torch.nn.Module:
        model = make_tiny_llama(len(self.tok), seed=0, **H)
        model.load_state_dict(self.pre if member == "base" else self.expert)
        return model.eval()

    def ctx(self, cache: Path | None = None) -> FitContext:
        return FitContext(
            expert_names=["expert"],
            expert_tasks={"expert": []},
            tensor_names=list(self.pre),
            load_tensors=lambda name: (self.pre[name], {"expert": self.expert[name]}),
            build_model=self.build,
            tokenizer=self.tok,
            calibration={},
            seed=0,
            log=lambda metrics, step: self.logged.append((step, metrics)),
            load_texts=load_texts,
            cache_dir=cache or self.cache,
        )

    def method(self, procedure: str, skills=("a",), **kw) -> MergeToLearn:
        return MergeToLearn(
            procedure=procedure,
            general_data=[self.specs["general"]],
            skills={k: self.specs[k] for k in skills},
            **{**TRAIN, **kw},
        )

    def run(self, method: MergeToLearn, ctx: FitContext | None = None) -> dict:
        method.setup(["expert"], 0)
        method.fit(ctx or self.ctx())
        return {
            n: method.merge_tensor(n, self.pre[n].float(), {"expert": self.expert[n].float()})
            for n in self.pre
        }


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return Setup(tmp_path_factory.mktemp("m2l"))


def trained(method: MergeToLearn, component: str) -> dict[str, torch.Tensor]:
    return load_file(Path(method.report()["components"][component]["path"]) / "model.safetensors")


def close(a: dict, b: dict) -> bool:
    return all(torch.allclose(a[k], b[k].float(), atol=1e-6) for k in a)


def test_procedures_combine_the_cached_models(setup):
    g = setup.method("general")
    out = setup.run(g)
    theta_g = trained(g, "general")
    assert close(out, theta_g) and not close(out, setup.pre)
    keys_after_general = set(setup.cache.iterdir())

    ptm = setup.method("ptm", omega=0.5)
    out = setup.run(ptm)
    rep = ptm.report()
    assert rep["components"]["general"]["reused"] is True  # θG trained once, shared
    assert rep["components"]["general"]["key"] == g.report()["components"]["general"]["key"]
    theta_d = trained(ptm, "skill/a")
    assert close(out, {k: theta_g[k] + 0.5 * (theta_d[k] - setup.pre[k]) for k in theta_g})
    assert rep["omega"] == {"a": 0.5} and rep["omega_option"] == 0.5

    lin = setup.method("linear", omega=0.25)
    out = setup.run(lin)
    assert lin.report()["components"]["skill/a"]["reused"] is True
    assert close(out, {k: 0.75 * theta_g[k] + 0.25 * theta_d[k] for k in theta_g})

    cft = setup.method("cft")
    out_cft = setup.run(cft)
    theta_cft = trained(cft, "cft")
    assert close(out_cft, theta_cft) and cft.report()["omega"] is None
    wise = setup.method("wise_ft", omega=0.5)
    out = setup.run(wise)
    assert wise.report()["components"]["cft"]["reused"] is True
    assert close(out, {k: 0.5 * theta_g[k] + 0.5 * theta_cft[k] for k in theta_g})

    rt = setup.method("rt")
    out = setup.run(rt)
    assert close(out, trained(rt, "rt")) and set(rt.report()["components"]) == {"rt"}
    # θG, θD(a), θCFT, θRT: four trained models in all (plus the lock folder)
    models = [p for p in setup.cache.iterdir() if not p.name.startswith(".")]
    assert len(models) == 4 and len(keys_after_general) == 2


def test_cost_attribution(setup):
    reports = {}
    for p in ("general", "cft", "rt", "ptm"):
        m = setup.method(p)
        setup.run(m)
        reports[p] = m.report()
    steps = {p: r["cost"]["steps"] for p, r in reports.items()}
    # 1 epoch at batch 4: |G| = 20 → 5 steps, |D| = 6 → 2, |G ∪ D| = 26 → 7
    assert steps == {"general": 0, "cft": 2, "rt": 7, "ptm": 2}
    assert reports["ptm"]["cost"]["components"] == ["skill/a"]
    assert reports["rt"]["cost"]["components"] == ["rt"]
    assert reports["ptm"]["general_cost"]["steps"] == 5 and reports["rt"]["general_cost"] is None
    for r in reports.values():
        c = r["cost"]
        assert c["examples"] == 4 * c["steps"] and (c["tokens"] > 0) == (c["steps"] > 0)
    assert reports["ptm"]["examples"] == {"general": 20, "skills": {"a": 6}}


def test_multi_skill_ptm_and_heuristic_omega(setup):
    m = setup.method("ptm", skills=("a", "b"))
    out = setup.run(m)
    rep = m.report()
    assert rep["omega"] == {"a": 6 / 20, "b": 8 / 20} and rep["omega_option"] == "heuristic"
    g, da, db = trained(m, "general"), trained(m, "skill/a"), trained(m, "skill/b")
    pre = setup.pre
    want = {k: g[k] + 0.3 * (da[k] - pre[k]) + 0.4 * (db[k] - pre[k]) for k in g}
    assert close(out, want)
    assert rep["cost"]["steps"] == 2 + 2 and rep["cost"]["components"] == ["skill/a", "skill/b"]
    wise = setup.method("wise_ft", skills=("a", "b"))
    setup.run(wise)
    assert wise.report()["omega"] == {"a": 14 / 20, "b": 14 / 20}  # |D1 ∪ D2| / |G|
    assert wise.report()["components"]["cft"]["steps"] == math.ceil(14 / 4)


def test_general_from_a_pool_expert(setup, tmp_path):
    m = setup.method("ptm", omega=1.0, general_from="expert")
    out = setup.run(m, setup.ctx(tmp_path / "cache"))
    rep = m.report()
    assert rep["components"]["general"]["pool_expert"] == "expert"
    assert rep["general_cost"]["steps"] == 0
    d = trained(m, "skill/a")
    assert close(out, {k: setup.expert[k] + d[k] - setup.pre[k] for k in d})
    bad = setup.method("ptm", general_from="nobody")
    with pytest.raises(ValueError, match="method.general_from"):
        setup.run(bad)


def test_training_is_logged_with_increasing_steps(setup, tmp_path):
    setup.logged.clear()
    setup.run(setup.method("ptm"), setup.ctx(tmp_path / "fresh"))
    keys = [next(iter(m)) for _, m in setup.logged]
    assert keys[0] == "train/general/loss" and keys[-1] == "train/skill/a/loss"
    steps = [s for s, _ in setup.logged]
    assert steps == sorted(steps) and len(set(steps)) == len(steps) == 5 + 2


def test_fit_errors_name_the_problem(setup, tmp_path):
    ctx = setup.ctx()
    ctx.cache_dir = None
    with pytest.raises(ValueError, match="cache_dir"):
        setup.run(setup.method("ptm"), ctx)
    m = MergeToLearn(skills={"x": {"jsonl": str(tmp_path / "missing.jsonl")}}, **TRAIN)
    with pytest.raises(ValueError, match="method.skills.x"):
        setup.run(m)


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("proc", ["general", "cft", "rt", "ptm", "linear", "wise_ft"])
def test_method_configs_instantiate(proc):
    from hydra.utils import instantiate

    m = instantiate(compose(f"method=m2l_{proc}").method)
    assert isinstance(m, MergeToLearn) and m.procedure == proc
    assert m.omega == "heuristic" and m.skills == {"safety": {"suite": "safety"}}
    assert m.lr == 1e-3 and m.epochs == 2 and m.warmup == 0.03 and m.text_suffix == "\n"
    assert [s["suite"] for s in m.general_data] == ["knowledge", "math", "general"]


def test_experiment_configs_sweep_the_intended_grid():
    from hydra.utils import instantiate

    params = {
        name: compose(f"+experiment={name}", hydra=True).hydra.sweeper.params
        for name in ("merge_to_learn_zoo", "merge_to_learn_zoo_omega", "merge_to_learn_multi_zoo")
    }
    procs = "m2l_general,m2l_cft,m2l_rt,m2l_ptm,m2l_linear,m2l_wise_ft"
    assert dict(params["merge_to_learn_zoo"]) == {"method": procs}
    assert dict(params["merge_to_learn_zoo_omega"]) == {
        "method": "m2l_ptm,m2l_linear,m2l_wise_ft",
        "method.omega": "0.2,0.4,0.6,0.8,1.0,heuristic",
    }
    assert dict(params["merge_to_learn_multi_zoo"]) == {"method": procs}
    # heuristic-ω cells of the two single-skill files are the same cell (same config)
    for proc in ("ptm", "linear", "wise_ft"):
        a = compose("+experiment=merge_to_learn_zoo", f"method=m2l_{proc}")
        b = compose(
            "+experiment=merge_to_learn_zoo_omega", f"method=m2l_{proc}", "method.omega=heuristic"
        )
        assert a.method == b.method and a.model == b.model and a.task == b.task
    multi = compose("+experiment=merge_to_learn_multi_zoo", "method=m2l_ptm", "method.omega=0.4")
    m = instantiate(multi.method)
    assert set(m.skills) == {"safety", "code"} and m.omega == 0.4
    assert multi.model.name == "zoo-xs" and "mergelab_safety_harmful" in multi.task.tasks
    tulu = compose("+experiment=merge_to_learn_tulu")
    t = instantiate(tulu.method)
    assert t.general_from == "tulu2" and set(tulu.model.experts) == {"tulu2"}
    assert t.skills == {"safety": {"jsonl": "~/data/merge_to_learn/safety.jsonl"}}
    assert t.lr == 2e-5 and t.batch_size == 128 and t.text_suffix is None


def test_trained_models_are_pool_members(setup, tmp_path):
    """``report()["members"]`` names each trained model's directory, a full HF checkpoint a
    pool lists as an expert: the pool reads the trained weights unchanged."""
    from harness.pool import ModelPool

    ptm = setup.method("ptm", omega=0.5)
    setup.run(ptm)
    members = ptm.report()["members"]
    assert set(members) == {"general", "skill/a"} and ptm.uses_experts is False
    base_dir = tmp_path / "base"
    setup.build("base").save_pretrained(base_dir)
    setup.tok.save_pretrained(base_dir)
    experts = {"general": {"path": members["general"]}, "a": {"path": members["skill/a"]}}
    pool = ModelPool.from_config(
        {"name": "m2l", "base": {"path": str(base_dir)}, "experts": experts}
    )
    pool = pool.open()
    pool.check_compatible()
    for member, component in (("general", "general"), ("a", "skill/a")):
        weights = trained(ptm, component)
        for n, t in weights.items():
            assert torch.equal(pool.tensor(member, n), t.float()), (member, n)
