"""``mergelab-merge --mergekit`` against mergekit 0.1.5's own merge of the same YAML.

Each case writes a mergekit YAML over tiny LLaMA checkpoints (``_peer_pool.make_pool``'s
one-layer shapes, saved as HF checkpoints), merges it with ``mergekit.merge.run_merge``
(CPU, ``random_seed``) and with ``mergelab-merge --mergekit`` (its ``main``, in process),
and compares every tensor. Two pools: continuous float32 weights, and bfloat16 weights
(``dtype: float32`` in the YAML), whose task vectors take few distinct values, so that
equal magnitudes at the trim threshold and exactly zero vote sums occur: there
``tie_break`` and ``zero_sign`` decide.

- Every task-arithmetic family method (``task_arithmetic``, ``ties``, ``dare_ties``,
  ``dare_linear``, ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``),
  ``linear`` and ``model_stock``: ``torch.equal`` on every tensor, with unequal
  non-power-of-two weights (so the rounding order of w·τ matters) and mergekit's
  defaults as well as ``normalize``/``rescale`` flipped; DARE and DELLA masks included
  (``mask_rng: mergekit`` replays mergekit's global-RNG stream).
- ``test_each_mergekit_option_is_needed``: dropping any one of the selected conventions
  (mergelab's own masks, ``tie_break``, ``zero_sign``, ``weight_product``) breaks
  bit-identity, so each is load-bearing.
- ``slerp``, ``karcher`` (with and without a base model, which mergekit then averages
  in), ``multislerp`` (with and without a base) and ``sce``: not bit-identical (mergekit
  keeps angles, norms and η as float32 tensors, mergelab float64 scalars); asserted
  max|Δ| ≤ 8·ε32·max|θ| per tensor (measured ≤ 2.3 ε32), and the translation says so
  (``exact: false`` and a note).
- Round trips: the ``mergekit_config.yml`` that ``mergelab-merge`` writes (its
  :func:`harness.mergekit_config.mergekit_yaml`, the model card's YAML) merges with
  mergekit to the same tensors, and read back with ``--mergekit`` to the same
  ``weights_sha256``; mergelab-native configs emit YAML exactly where mergekit has the
  same merge.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from _peer_pool import LLAMA_SHAPES, make_pool
from safetensors.torch import load_file, save_file

from harness.merge_cli import MERGEKIT_FILE, RECORD, main, merge
from harness.mergekit_config import from_mergekit, mergekit_yaml

pytestmark = [pytest.mark.peers, pytest.mark.usefixtures("one_torch_thread")]

EPS32 = torch.finfo(torch.float32).eps
SEED = 3
W = [0.7, 1.3, 0.45]  # unequal, not powers of two: w·τ rounds differently when fused


def _save(root: Path, state: dict[str, torch.Tensor], dtype: torch.dtype) -> Path:
    from transformers import LlamaConfig

    root.mkdir(parents=True)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=172,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        dtype=str(dtype).removeprefix("torch."),
        architectures=["LlamaForCausalLM"],
    )
    cfg.save_pretrained(root)
    tensors = {k: v.to(dtype).contiguous() for k, v in state.items()}
    save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})
    return root


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def pool(request, tmp_path_factory) -> dict[str, Any]:
    """Base and three experts as HF checkpoints (float32, or bfloat16 with few distinct
    task-vector values); ``dtype`` names which."""
    dtype = getattr(torch, request.param)
    root = tmp_path_factory.mktemp(f"llama_{request.param}")
    base, experts = make_pool(21, 3)
    dirs: dict[str, Any] = {"dtype": request.param, "base": _save(root / "base", base, dtype)}
    for i, e in enumerate(experts):
        dirs[f"e{i}"] = _save(root / f"e{i}", e, dtype)
    return dirs


def run_mergekit(conf: dict[str, Any], out: Path, seed: int = SEED) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(random_seed=seed, copy_tokenizer=False, quiet=True)
    run_merge(MergeConfiguration.model_validate(conf), str(out), options)
    return load_file(out / "model.safetensors")


def run_mergelab(conf: dict[str, Any], tmp: Path, name: str, seed: int = SEED):
    """``mergelab-merge --mergekit`` in process: (tensors, record, output dir)."""
    path = tmp / f"{name}.yml"
    path.write_text(yaml.safe_dump(conf, sort_keys=False))
    out = tmp / f"{name}.mergelab"
    main(["--mergekit", str(path), str(out), f"seed={seed}"])
    record = json.loads((out / RECORD).read_text())
    return load_file(out / "model.safetensors"), record, out


def conf(pool, method, params=None, per_model=None, base=True, n=3, weights=W) -> dict[str, Any]:
    c: dict[str, Any] = {"merge_method": method, "dtype": "float32"}
    if base:
        c["base_model"] = str(pool["base"])
    c["models"] = [
        {"model": str(pool[f"e{i}"]), "parameters": {"weight": weights[i], **(per_model or {})}}
        for i in range(n)
    ]
    if params:
        c["parameters"] = params
    return c


EXACT = {
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.6}, None),
    "task_arithmetic_normalize": ("task_arithmetic", {"normalize": True}, None),
    "ties": ("ties", {"lambda": 0.9}, {"density": 0.3}),
    "ties_sum_l1": ("ties", {"normalize": False, "rescale": True}, {"density": 0.3}),
    "dare_ties": ("dare_ties", None, {"density": 0.4}),
    "dare_ties_mean": ("dare_ties", {"normalize": True, "rescale": False}, {"density": 0.4}),
    "dare_linear": ("dare_linear", {"lambda": 0.8}, {"density": 0.4}),
    "dare_linear_normalize": ("dare_linear", {"normalize": True}, {"density": 0.6}),
    "breadcrumbs": ("breadcrumbs", None, {"density": 0.7, "gamma": 0.05}),
    "breadcrumbs_l1": ("breadcrumbs", {"rescale": True}, {"density": 0.7, "gamma": 0.05}),
    "breadcrumbs_ties": ("breadcrumbs_ties", None, {"density": 0.7, "gamma": 0.05}),
    "della": ("della", None, {"density": 0.6, "epsilon": 0.1}),
    "della_norescale": ("della", {"rescale": False}, {"density": 0.6, "epsilon": 0.1}),
    "della_linear": ("della_linear", {"lambda": 0.5}, {"density": 0.6, "epsilon": 0.1}),
}  # fmt: skip


def exact_conf(pool, case: str) -> dict[str, Any]:
    if case == "linear":
        return conf(pool, "linear", base=False)
    if case == "linear_unnormalized":
        return conf(pool, "linear", {"normalize": False}, base=False)
    if case == "ties_unit_weights":  # equal weights: exactly zero vote sums on bfloat16
        return conf(pool, "ties", None, {"density": 0.3}, weights=[1.0, 1.0, 1.0])
    if case == "model_stock":
        c = conf(pool, "model_stock")
        for m in c["models"]:
            m.pop("parameters")
        return c
    method, params, per_model = EXACT[case]
    return conf(pool, method, params, per_model)


def assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert set(a) == set(b) == set(LLAMA_SHAPES), what
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{what}: {len(bad)} tensors differ, e.g. {bad[:3]}"


EXTRA = ["ties_unit_weights", "linear", "linear_unnormalized", "model_stock"]


@pytest.mark.parametrize("case", [*EXACT, *EXTRA])
def test_mergekit_yaml_merges_bit_identically(mergekit, pool, tmp_path, case):
    c = exact_conf(pool, case)
    peer = run_mergekit(c, tmp_path / "mergekit")
    ours, record, out = run_mergelab(c, tmp_path, case)
    assert_equal(peer, ours, case)
    assert record["mergekit"]["exact"] is True
    assert record["mergekit"]["merge_method"] == c["merge_method"]
    assert record["config"]["model"]["dtype"] == "float32"

    # the YAML mergelab-merge writes (its model card's) is the same merge in mergekit...
    emitted = out / MERGEKIT_FILE
    text = emitted.read_text()
    assert "bit-identical weights expected" in text.splitlines()[1]
    assert_equal(run_mergekit(yaml.safe_load(text), tmp_path / "again"), ours, f"{case} emitted")
    # ...and read back, the same mergelab merge
    _, again, _ = run_mergelab(yaml.safe_load(text), tmp_path, f"{case}.again")
    assert again["weights_sha256"] == record["weights_sha256"]


def _merge_translated(c, tmp_path: Path, name: str, **method_options: Any) -> dict:
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(c))
    method_cfg, model_cfg, _ = from_mergekit(path)
    method_cfg.update(method_options)
    out = tmp_path / name
    merge(
        {
            "method": method_cfg,
            "model": model_cfg,
            "out": str(out),
            "seed": SEED,
            "device": "cpu",
            "threads": 1,
            "max_shard_size": "1GB",
            "force": False,
        }
    )
    return load_file(out / "model.safetensors")


@pytest.mark.parametrize(
    ("case", "option", "value", "pools"),
    [
        ("dare_ties", "mask_rng", "mergelab", ("float32",)),
        ("della_linear", "mask_rng", "mergelab", ("float32",)),
        ("task_arithmetic", "weight_product", "fused", ("float32",)),
        ("ties", "weight_product", "fused", ("float32",)),
        ("ties", "tie_break", "keep_all", ("bfloat16",)),
        ("ties_unit_weights", "zero_sign", "zero", ("bfloat16",)),
        ("ties", "sign_vote", "unweighted", ("float32", "bfloat16")),
        ("ties", "keep_count", "ceil", ("float32", "bfloat16")),
        ("dare_ties", "normalize", True, ("float32", "bfloat16")),
        ("breadcrumbs_ties", "normalize", True, ("float32", "bfloat16")),
        ("linear", "normalize", "before", ("float32",)),
    ],
)
def test_each_mergekit_option_is_needed(mergekit, pool, tmp_path, case, option, value, pools):
    """With one selected convention set back to mergelab's default, the merge is no longer
    mergekit's (on the pool where that convention shows)."""
    if pool["dtype"] not in pools:
        pytest.skip(f"{option} shows on the {' and '.join(pools)} pool")
    c = exact_conf(pool, case)
    peer = run_mergekit(c, tmp_path / "mergekit")
    ours = _merge_translated(c, tmp_path, "changed", **{option: value})
    assert any(not torch.equal(peer[k], ours[k]) for k in peer), (case, option)


ROUNDING = {
    "slerp": lambda p: {
        "merge_method": "slerp",
        "base_model": str(p["base"]),
        "dtype": "float32",
        "parameters": {"t": 0.3},
        "models": [{"model": str(p["base"])}, {"model": str(p["e0"])}],
    },
    "karcher": lambda p: {
        "merge_method": "karcher",
        "dtype": "float32",
        "models": [{"model": str(p[f"e{i}"])} for i in range(3)],
    },
    "karcher_with_base": lambda p: {
        "merge_method": "karcher",
        "base_model": str(p["base"]),
        "dtype": "float32",
        "models": [{"model": str(p[f"e{i}"])} for i in range(2)],
    },
    "multislerp": lambda p: conf(p, "multislerp"),
    "multislerp_without_base": lambda p: conf(p, "multislerp", base=False),
    "sce": lambda p: {
        "merge_method": "sce",
        "base_model": str(p["base"]),
        "dtype": "float32",
        "parameters": {"select_topk": 0.5},
        "models": [{"model": str(p[f"e{i}"])} for i in range(3)],
    },
}


@pytest.mark.parametrize("case", list(ROUNDING))
def test_mergekit_yaml_rounding_only_methods(mergekit, pool, tmp_path, case):
    if case == "sce" and pool["dtype"] == "bfloat16":
        pytest.skip("equal variances at SCE's selection cut: mergekit's topk picks its own")
    c = ROUNDING[case](pool)
    peer = run_mergekit(c, tmp_path / "mergekit")
    ours, record, out = run_mergelab(c, tmp_path, case)
    assert record["mergekit"]["exact"] is False
    assert any("not bit-identical" in n for n in record["mergekit"]["notes"])
    for k in peer:
        bound = 8 * EPS32 * float(peer[k].abs().max())
        assert float((peer[k] - ours[k]).abs().max()) <= bound, (case, k)
    text = (out / MERGEKIT_FILE).read_text()
    assert "not bit-identical" in text.splitlines()[1]
    _, again, _ = run_mergelab(yaml.safe_load(text), tmp_path, f"{case}.again")
    assert again["weights_sha256"] == record["weights_sha256"]


def _native(pool, method_cfg: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    model_cfg = {
        "name": "native",
        "base": {"path": str(pool["base"])},
        "experts": {f"e{i}": {"path": str(pool[f"e{i}"])} for i in range(3)},
        "dtype": "float32",
        "exclude": [],
        "trust_remote_code": False,
    }
    return method_cfg, model_cfg


NATIVE_NONE = {
    "ties_global": {"_target_": "methods.ties.TIES", "density": 0.3},
    "ties_per_tensor_ceil": {
        "_target_": "methods.ties.TIES",
        "density": 0.3,
        "trim_scope": "per_tensor",
        "sign_vote": "weighted",
    },
    "ties_unweighted_vote_unequal_weights": {
        "_target_": "methods.ties.TIES",
        "trim_scope": "per_tensor",
        "keep_count": "floor",
        "weights": W,
    },
    "dare_own_masks": {"_target_": "methods.dare.DARETies", "rescale": "l1"},
    "dare_inverse_p": {"_target_": "methods.dare.DARELinear", "mask_rng": "mergekit"},
    "della_own_masks": {"_target_": "methods.della.DELLA", "rescale": "l1"},
    "sce_paper_eta": {"_target_": "methods.sce.SCE"},
    "karcher_weighted": {"_target_": "methods.karcher.KarcherMerge", "weights": W},
    "metagpt": {"_target_": "methods.metagpt.MetaGPT", "base_method": "none"},
    "consensus": {"_target_": "methods.consensus.ConsensusTA"},
}


@pytest.mark.parametrize("case", list(NATIVE_NONE))
def test_no_mergekit_yaml_without_the_same_merge(pool, case):
    assert mergekit_yaml(*_native(pool, NATIVE_NONE[case])) is None


TIES_FLOOR = {
    "_target_": "methods.ties.TIES",
    "density": 0.3,
    "trim_scope": "per_tensor",
    "keep_count": "floor",
}


@pytest.mark.parametrize(
    ("method_cfg", "level"),
    [
        ({"_target_": "methods.model_stock.ModelStock"}, "bit-identical"),
        ({"_target_": "methods.task_arithmetic.TaskArithmetic", "weights": W}, "rounding"),
        ({"_target_": "methods.task_arithmetic.TaskArithmetic"}, "bit-identical"),
        ({"_target_": "methods.weight_average.WeightAverage", "weights": W}, "rounding"),
        (TIES_FLOOR, "ties"),
    ],
    ids=["model_stock", "ta_weights", "ta", "weight_average", "ties_floor"],
)
def test_native_config_emits_mergekit_yaml(mergekit, pool, tmp_path, method_cfg, level):
    """mergelab-native configs (mergelab's own conventions) emit the mergekit YAML of the
    same merge, its first comment saying how close: bit-identical where the conventions
    coincide, else the reasons (fused products round apart; ties kept at the threshold
    and zero vote sums, which only the bfloat16 pool has, change single entries)."""
    method_cfg, model_cfg = _native(pool, method_cfg)
    text = mergekit_yaml(method_cfg, model_cfg, seed=SEED)
    assert text is not None
    head = text.splitlines()[1]
    assert ("bit-identical weights" in head) == (level == "bit-identical")
    assert level == "bit-identical" or f"({level})" in head
    if level == "ties" and pool["dtype"] == "bfloat16":
        pytest.skip("ties at the trim threshold: mergekit keeps k of them, mergelab all")
    peer = run_mergekit(yaml.safe_load(text), tmp_path / "mergekit")
    out = tmp_path / "ours"
    c = {"method": method_cfg, "model": model_cfg, "out": str(out), "seed": SEED}
    merge({**c, "device": "cpu", "threads": 1, "max_shard_size": "1GB", "force": False})
    ours = load_file(out / "model.safetensors")
    if level == "bit-identical":
        assert_equal(peer, ours, str(method_cfg))
    else:
        for k in peer:
            bound = 4 * EPS32 * float(peer[k].abs().max())
            assert float((peer[k] - ours[k]).abs().max()) <= bound, k
