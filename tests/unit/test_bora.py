"""BoRA (methods/bora.py) on hand-built tensors and a tiny Llama, plus the suite's
per-category perplexity tasks it is scored on (evals/suite/build.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from harness.data import load_texts
from methods import bora as bora_mod
from methods.base import FitContext
from methods.bora import (
    SHARED,
    BoRA,
    BoraFit,
    find_target_modules,
    global_mean,
    lora_merge,
    penalty,
    prior_prox,
    sq_distance,
    train_bora,
)
from tests.helpers.tiny_lm import make_tiny_llama, make_tiny_tokenizer

TARGETS = ["q_proj", "v_proj", "down_proj"]
TEXTS = {
    "small": ["ab cd", "ab ce", "ab cf"],
    "mid": ["x=1;", "x=2;", "y=3;", "z=4;", "x=5;"],
    "big": ["Q: hi? A: yo"] * 2 + ["Q: ok? A: no"] * 6,
}
KW = dict(r=2, alpha=4, steps=6, lr=1e-2, batch_size=2, max_length=16, seed=0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    tok = make_tiny_tokenizer()
    model = make_tiny_llama(len(tok), seed=0)
    return model, tok, {k: v.detach().clone() for k, v in model.state_dict().items()}


def fresh(tiny):
    model, tok, state = tiny
    m = make_tiny_llama(len(tok), seed=0)
    m.load_state_dict(state)
    return m.eval()


def train(tiny, texts, tau, **kw):
    model = fresh(tiny)
    modules = find_target_modules(model, TARGETS)
    return train_bora(model, tiny[1], texts, tau=tau, modules=modules, **{**KW, **kw})


def write_specs(tmp_path: Path, texts=TEXTS) -> dict[str, dict]:
    specs = {}
    for name, items in texts.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in items))
        specs[name] = {"jsonl": str(path)}
    return specs


def context(tiny, cache_dir: Path | None) -> FitContext:
    model, tok, state = tiny

    def load_tensors(name):
        return state[name].float().clone(), {"x": state[name].float().clone()}

    return FitContext(
        expert_names=["x"],
        expert_tasks={"x": []},
        tensor_names=list(state),
        load_tensors=load_tensors,
        build_model=lambda member: fresh(tiny),
        tokenizer=tok,
        calibration={},
        load_texts=load_texts,
        cache_dir=cache_dir,
    )


def merged(method: BoRA, tiny) -> dict[str, torch.Tensor]:
    state = tiny[2]
    return {n: method.merge_tensor(n, t.float(), {"x": t.float()}) for n, t in state.items()}


# ------------------------------------------------------------------ pure functions


def test_penalty_and_global_mean_on_hand_built_tensors():
    thetas = {
        "a": {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([[0.0]])},
        "b": {"x": torch.tensor([3.0, 4.0]), "y": torch.tensor([[2.0]])},
    }
    theta_global = global_mean(thetas)
    assert torch.equal(theta_global["x"], torch.tensor([2.0, 3.0]))
    assert torch.equal(theta_global["y"], torch.tensor([[1.0]]))
    # ‖a − Θ‖² = 1 + 1 + 1 = 3, ‖b − Θ‖² = 3  →  (τ/2)·6 = 3τ
    assert float(sq_distance(thetas["a"], theta_global)) == 3.0
    assert float(penalty(thetas, theta_global, tau=2.5)) == pytest.approx(7.5)
    assert float(penalty(thetas, theta_global, tau=0.0)) == 0.0
    # the mean minimises the penalty over Θ
    shifted = {k: v + 0.1 for k, v in theta_global.items()}
    assert float(penalty(thetas, shifted, 1.0)) > float(penalty(thetas, theta_global, 1.0))


def test_prior_prox_closed_form():
    ys = {"a": {"x": torch.tensor([0.0, 1.0])}, "b": {"x": torch.tensor([4.0, 1.0])}}
    metric = {"a": {"x": torch.tensor([1.0, 1.0])}, "b": {"x": torch.tensor([1.0, 3.0])}}
    sizes = {"a": 1, "b": 2}
    thetas, theta_global = prior_prox(ys, metric, tau=2.0, sizes=sizes)
    # element 0: c_a = 1·2/1 = 2, c_b = 1·2/2 = 1; Θ = (0/3 + 4/2) / (1/3 + 1/2) = 2.4
    assert float(theta_global["x"][0]) == pytest.approx(2.4)
    assert float(thetas["a"]["x"][0]) == pytest.approx((0 + 2 * 2.4) / 3)
    assert float(thetas["b"]["x"][0]) == pytest.approx((4 + 1 * 2.4) / 2)
    # Θ is the mean of the θ_d (flat-prior MAP), and equal inputs stay put
    assert torch.allclose(global_mean(thetas)["x"], theta_global["x"])
    assert torch.allclose(thetas["a"]["x"][1], torch.tensor(1.0))
    # τ = 0 changes nothing; τ → ∞ ties everything to one value
    same, _ = prior_prox(ys, metric, tau=0.0, sizes=sizes)
    assert all(torch.equal(same[d]["x"], ys[d]["x"]) for d in ys)
    tied, g = prior_prox(ys, metric, tau=1e12, sizes=sizes)
    assert all(torch.allclose(tied[d]["x"], g["x"], atol=1e-5) for d in ys)


def test_lora_merge_on_hand_computed_tensors():
    base = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    lora_a = torch.tensor([[1.0, 0.0, 2.0]])  # r = 1, in = 3
    lora_b = torch.tensor([[1.0], [-2.0]])  # out = 2
    expected = torch.tensor([[1.0 + 3, 0.0, 6.0], [-6.0, 1.0, -12.0]])  # base + 3·B A
    assert torch.equal(lora_merge(base, lora_a, lora_b, scaling=3.0), expected)


def test_merge_tensor_emits_the_chosen_tasks_adapter():
    a1, b1 = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [0.0]])
    a2, b2 = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [1.0]])
    fit = BoraFit(
        adapters={
            "t1": {"m.lora_A": a1, "m.lora_B": b1},
            "t2": {"m.lora_A": a2, "m.lora_B": b2},
        },
        theta_global={"m.lora_A": (a1 + a2) / 2, "m.lora_B": (b1 + b2) / 2},
        meta={"modules": ["m"]},
    )
    base = torch.zeros(2, 2)
    other = torch.ones(3)
    tasks = {"t1": {"jsonl": "x"}, "t2": {"jsonl": "y"}}
    for task, expected in (("t1", [[2.0, 4.0], [0.0, 0.0]]), ("t2", [[0.0, 0.0], [0.0, 2.0]])):
        method = BoRA(tau=1.0, tasks=tasks, task=task, r=1, alpha=2)
        method.use_fit(fit)
        assert torch.equal(method.merge_tensor("m.weight", base, {}), torch.tensor(expected))
        assert method.merge_tensor("other", other, {}) is other  # untouched: the base's


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tau": -1.0},
        {"tau": float("nan")},
        {"tau": "infinite"},
        {"tau": True},
        {"tasks": {}},
        {"tasks": {"a": {"csv": "x"}}},
        {"tasks": {"a": {"jsonl": "x", "suite": "math"}}},
        {"tasks": {"global": {"jsonl": "x"}}},
        {"tasks": ["a"]},
        {"task": "nope"},
        {"r": 0},
        {"alpha": 0},
        {"target_modules": []},
        {"steps": 0},
        {"lr": 0.0},
        {"batch_size": 0},
        {"max_length": 1},
        {"seed": -1},
        {"prior_update": "adam"},
        {"checkpoint_every": -1},
    ],
)
def test_bad_options_raise(kwargs):
    with pytest.raises(ValueError):
        BoRA(**kwargs)


def test_defaults_and_shared_option():
    method = BoRA()
    assert method.task == "knowledge" and method.tau == 100.0
    assert {d: s["n"] for d, s in method.tasks.items()} == {
        "knowledge": 100,
        "math": 300,
        "code": 1000,
        "safety": 2000,
    }
    assert BoRA(tau="shared").tau == SHARED
    assert BoRA(tau=0).tau == 0.0


def test_target_modules_must_match_linear_layers(tiny):
    with pytest.raises(ValueError, match="match no linear layer"):
        find_target_modules(fresh(tiny), ["nonexistent_proj"])
    with pytest.raises(ValueError, match="Linear"):
        find_target_modules(fresh(tiny), ["self_attn"])
    assert len(find_target_modules(fresh(tiny), ["q_proj"])) == 2  # one per layer


# ------------------------------------------------------------------------ training


def test_tau_zero_trains_each_task_independently(tiny):
    joint = train(tiny, TEXTS, tau=0.0)
    for d, texts in TEXTS.items():
        alone = train(tiny, {d: texts}, tau=0.0)
        for k, v in alone.adapters[d].items():
            torch.testing.assert_close(joint.adapters[d][k], v, rtol=1e-5, atol=1e-6)
        assert joint.meta["loss_first"][d] == pytest.approx(alone.meta["loss_first"][d])
    # and a positive τ does couple them
    coupled = train(tiny, TEXTS, tau=10.0)
    key = next(iter(joint.adapters["small"]))
    assert not torch.allclose(coupled.adapters["small"][key], joint.adapters["small"][key])
    # per-task distances to Θ shrink under the prior
    assert all(coupled.meta["distance"][d] < joint.meta["distance"][d] for d in TEXTS)


def test_large_tau_ties_every_task_to_the_global(tiny):
    free = train(tiny, TEXTS, tau=0.0, steps=12)
    base_dist = min(free.meta["distance"].values())
    assert base_dist > 0.5
    # exact proximal prior: the adapters coincide with Θ
    prox = train(tiny, TEXTS, tau=1e9, steps=12, prior_update="prox")
    assert max(prox.meta["distance"].values()) < 1e-6 * base_dist
    for d in TEXTS:
        for k, v in prox.adapters[d].items():
            torch.testing.assert_close(v, prox.theta_global[k], rtol=0, atol=1e-6)
    # prior in the loss (default): Adam keeps an O(lr) oscillation around Θ
    grad = train(tiny, TEXTS, tau=1e9, steps=12)
    assert max(grad.meta["distance"].values()) < 0.05 * base_dist


def test_shared_trains_one_adapter_for_all_tasks(tiny):
    fit = train(tiny, TEXTS, tau=SHARED)
    assert list(fit.adapters) == [SHARED]
    assert fit.meta["distance"] == {d: 0.0 for d in TEXTS}
    for k, v in fit.adapters[SHARED].items():
        assert torch.equal(v, fit.theta_global[k])


def test_interrupted_training_resumes_to_the_same_result(tiny, tmp_path):
    full = train(tiny, TEXTS, tau=10.0)

    def stop(metrics, step):
        if step == 5:
            raise KeyboardInterrupt  # not swallowed like a logging error

    with pytest.raises(KeyboardInterrupt):
        train(tiny, TEXTS, tau=10.0, checkpoint_dir=tmp_path, checkpoint_every=2, log=stop)
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".safetensors"}  # no pickle
    resumed = train(tiny, TEXTS, tau=10.0, checkpoint_dir=tmp_path, checkpoint_every=2)
    assert resumed.meta["resumed_from"] == 4
    for d in TEXTS:  # bit for bit
        for k, v in full.adapters[d].items():
            assert torch.equal(resumed.adapters[d][k], v), (d, k)
    assert all(torch.equal(resumed.theta_global[k], v) for k, v in full.theta_global.items())
    assert resumed.meta["loss_final"] == full.meta["loss_final"]


# -------------------------------------------------------------------------- plugin


def test_fit_caches_the_joint_training_and_reports(tiny, tmp_path, monkeypatch):
    specs = write_specs(tmp_path)
    opts = dict(tau=10.0, tasks=specs, target_modules=TARGETS, **KW)
    calls = []
    real = bora_mod.train_bora
    monkeypatch.setattr(bora_mod, "train_bora", lambda *a, **k: calls.append(1) or real(*a, **k))

    first = BoRA(task="small", **opts)
    first.fit(context(tiny, tmp_path / "cache"))
    assert len(calls) == 1 and first.report()["cache"]["hit"] is False
    # same options, another task: no training, that task's adapter
    second = BoRA(task="big", **opts)
    second.fit(context(tiny, tmp_path / "cache"))
    assert len(calls) == 1 and second.report()["cache"]["hit"] is True
    again = BoRA(task="small", **opts)
    again.fit(context(tiny, tmp_path / "cache"))
    assert len(calls) == 1
    m_first, m_again, m_second = merged(first, tiny), merged(again, tiny), merged(second, tiny)
    assert all(torch.equal(m_first[n], m_again[n]) for n in m_first)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(m_first[q], m_second[q])
    assert torch.equal(m_first["model.embed_tokens.weight"], tiny[2]["model.embed_tokens.weight"])
    # another τ trains anew
    BoRA(task="small", **{**opts, "tau": 0.0}).fit(context(tiny, tmp_path / "cache"))
    assert len(calls) == 2

    rep = first.report()
    json.dumps(rep)
    assert rep["tau"] == 10.0 and rep["task"] == "small" and rep["objective"] == "squared"
    assert {d: t["n_train"] for d, t in rep["tasks"].items()} == {"small": 3, "mid": 5, "big": 8}
    assert all(t["distance"] > 0 and math.isfinite(t["loss_final"]) for t in rep["tasks"].values())
    assert rep["steps"] == KW["steps"] and rep["tokens"] > 0 and rep["seconds"] > 0
    assert rep["target_modules"] == find_target_modules(fresh(tiny), TARGETS)


def test_fit_without_cache_dir_trains_and_merges_lora(tiny, tmp_path):
    method = BoRA(tau=0.0, tasks=write_specs(tmp_path), task="mid", target_modules=TARGETS, **KW)
    method.fit(context(tiny, None))
    out = merged(method, tiny)
    fit = method._fit
    assert fit is not None and method.report()["cache"]["hit"] is False
    name = "model.layers.1.mlp.down_proj"
    a, b = fit.adapters["mid"][f"{name}.lora_A"], fit.adapters["mid"][f"{name}.lora_B"]
    expected = tiny[2][f"{name}.weight"] + (KW["alpha"] / KW["r"]) * b @ a
    torch.testing.assert_close(out[f"{name}.weight"], expected)


# ------------------------------------------------------------ suite perplexity tasks

SMALL_SUITE = {
    "general": {"train": 3},
    "knowledge": {"test": 3, "calibration": 2},
    "math": {"test": 3, "calibration": 2, "train": 3},
    "code": {"test": 3, "calibration": 2, "train": 3},
    "safety": {"test": 3, "calibration": 2, "train": 3},
}


def test_ppl_tasks_leave_the_data_files_unchanged(tmp_path):
    from evals.suite import build

    out = build.build_suite(tmp_path / "suite", seed=0, sizes=SMALL_SUITE)
    manifest = json.loads((out / "manifest.json").read_text())
    data = build._generate(0, build.resolve_sizes(SMALL_SUITE))  # the generator functions
    data_files = {k for k in manifest["files"] if k.endswith(".jsonl")}
    assert data_files == {f"{n}/{s}.jsonl" for n, splits in data.items() for s in splits}
    for name, splits in data.items():
        for split, records in splits.items():
            assert build.load_split(out, name, split) == records
            blob = (out / name / f"{split}.jsonl").read_bytes()
            assert blob == build._jsonl(records)
            assert manifest["files"][f"{name}/{split}.jsonl"] == build._sha256(
                out / name / f"{split}.jsonl"
            )


def test_ppl_task_yamls(tmp_path):
    from evals.suite import build

    out = build.build_suite(tmp_path / "suite", seed=0, sizes=SMALL_SUITE)
    for category, task in build.PPL_TASKS.items():
        assert task == f"mergelab_{category}_ppl"
        spec = yaml.safe_load((out / "tasks" / f"{task}.yaml").read_text())
        assert spec["task"] == task and spec["output_type"] == "loglikelihood_rolling"
        assert spec["doc_to_target"] == "text" and spec["test_split"] == "test"
        assert [m["metric"] for m in spec["metric_list"]] == [
            "word_perplexity",
            "byte_perplexity",
            "bits_per_byte",
        ]
        files = spec["dataset_kwargs"]["data_files"]["test"]
        files = [files] if isinstance(files, str) else files
        assert files == [str(out / t / "test.jsonl") for t in build.TASKS[category]]
    conf = yaml.safe_load(Path("conf/task/suite_ppl.yaml").read_text())
    assert conf["tasks"] == list(build.PPL_TASKS.values())
    assert conf["include_path"] == "${suite_dir:0}"


def test_suite_without_ppl_yamls_is_rebuilt(tmp_path):
    from evals.suite import build

    out = build.build_suite(tmp_path / "suite", seed=0, sizes=SMALL_SUITE)
    manifest = json.loads((out / "manifest.json").read_text())
    for task in build.PPL_TASKS.values():  # what a build from before the ppl tasks looks like
        (out / "tasks" / f"{task}.yaml").unlink()
        del manifest["files"][f"tasks/{task}.yaml"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    build.build_suite(tmp_path / "suite", seed=0, sizes=SMALL_SUITE)
    assert all((out / "tasks" / f"{t}.yaml").is_file() for t in build.PPL_TASKS.values())


# ------------------------------------------------------------------- pool members


def test_trained_adapters_are_pool_members(tiny, tmp_path):
    """Each task's adapter is written as a PEFT directory that a pool lists as an expert:
    the pool's LoRA source gives this cell's weights bit for bit, and peft loads it."""
    from peft import PeftModel

    from harness.pool import ModelPool

    base_dir = tmp_path / "base"
    fresh(tiny).save_pretrained(base_dir)
    method = BoRA(tau=1.0, tasks=write_specs(tmp_path), task="mid", target_modules=TARGETS, **KW)
    assert method.uses_experts is False
    method.fit(context(tiny, tmp_path / "cache"))
    members = method.report()["members"]
    assert set(members) == {"small", "mid", "big"}
    assert Path(members["mid"]).parent.parent == Path(method.report()["cache"]["dir"])
    experts = {"mid": {"adapter": members["mid"]}}
    cfg = {"name": "t", "base": {"path": str(base_dir)}, "experts": experts}
    pool = ModelPool.from_config(cfg).open()
    ours = merged(method, tiny)
    for n in tiny[2]:
        assert torch.equal(pool.tensor("mid", n), ours[n]), n
    merged_peft = PeftModel.from_pretrained(fresh(tiny), members["mid"]).merge_and_unload()
    for n, t in merged_peft.state_dict().items():
        torch.testing.assert_close(t, ours[n], rtol=1e-5, atol=1e-6)
    # a second cell reusing the training keeps the members as they are
    again = BoRA(tau=1.0, tasks=write_specs(tmp_path), task="big", target_modules=TARGETS, **KW)
    mtime = (Path(members["mid"]) / "adapter_model.safetensors").stat().st_mtime_ns
    again.fit(context(tiny, tmp_path / "cache"))
    assert again.report()["members"] == members
    assert (Path(members["mid"]) / "adapter_model.safetensors").stat().st_mtime_ns == mtime


def test_a_pool_without_experts_only_for_methods_that_train_their_own(tiny, tmp_path):
    from harness.pool import ModelPool, PoolError

    base_dir = tmp_path / "base"
    fresh(tiny).save_pretrained(base_dir)
    cfg = {"name": "t", "base": {"path": str(base_dir)}, "experts": {}}
    with pytest.raises(PoolError, match="this method merges experts"):
        ModelPool.from_config(cfg)
    pool = ModelPool.from_config(cfg, require_experts=False).open()
    pool.check_compatible()
    assert pool.expert_names == []
