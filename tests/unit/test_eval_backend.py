"""eval.backend (hf | vllm) and the in-memory path's model built once.

* The vllm backend's lm-eval model name and arguments, built from the composed config by a
  pure function (no vllm needed), and checked against lm-eval's own ``VLLM`` signature.
* Cell ids: every hf cell keeps its id (the quick-start cell and all of results/cells.json);
  a vllm cell gets its own.
* Bad eval options and a missing vllm fail before anything is merged (simulated absence,
  and the real one on a machine without vllm).
* ``eval.batch_size=auto`` on the in-process HFLM.
* The vllm path through ``run_cell`` with a stand-in for lm-eval's ``VLLM`` (HFLM loading the
  directory it is given): the checkpoint it is handed, and scores and samples identical to
  the hf backend's.
* ``build_merged_model`` gives the model ``from_pretrained(base) + load_state_dict`` gave:
  state dict, buffers, tied weights, configs and logits equal, with the base's weights gone.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from evals import backends
from evals.lm_eval import evaluate, validate_tasks
from harness import records, run
from harness.pool import ModelPool
from harness.stream import execute
from methods.task_arithmetic import TaskArithmetic
from tests.helpers.hydra_conf import compose
from tests.helpers.tiny_lm import make_tiny_llama, make_tiny_tokenizer

CELLS = Path(__file__).resolve().parents[2] / "results" / "cells.json"
VLLM_INSTALLED = importlib.util.find_spec("vllm") is not None


def resolved(*overrides: str) -> dict[str, Any]:
    return OmegaConf.to_container(compose(*overrides), resolve=True)  # type: ignore[return-value]


# --------------------------------------------------------------------------- config plumbing


def test_vllm_model_args_from_the_config():
    c = resolved(
        "eval.backend=vllm",
        "device=cuda",
        "seed=3",
        "eval.batch_size=auto",
        "eval.vllm.tensor_parallel_size=2",
        "eval.vllm.data_parallel_size=4",
        "eval.vllm.gpu_memory_utilization=0.75",
        "eval.vllm.max_model_len=1024",
        "eval.vllm.extra={enforce_eager: true, max_num_seqs: 64}",
    )
    backends.check_eval_options(c)
    args = backends.vllm_model_args("/ckpt/merged.partial-x", c["eval"], dtype="float32", seed=3)
    assert args == {
        "pretrained": "/ckpt/merged.partial-x",
        "dtype": "float32",
        "seed": 3,
        "trust_remote_code": False,
        "tensor_parallel_size": 2,
        "data_parallel_size": 4,
        "gpu_memory_utilization": 0.75,
        "max_model_len": 1024,
        "max_length": None,
        "batch_size": "auto",
        "enforce_eager": True,
        "max_num_seqs": 64,
    }
    # eval.vllm.dtype overrides the hf dtype; eval.max_length is the context otherwise
    c = resolved("eval.backend=vllm", "eval.vllm.dtype=bfloat16", "eval.max_length=512")
    args = backends.vllm_model_args("/d", c["eval"], dtype="float32", seed=0)
    assert (args["dtype"], args["max_length"], args["max_model_len"]) == ("bfloat16", 512, None)
    assert args["batch_size"] == 256 and args["tensor_parallel_size"] == 1


def _vllm_init_parameters() -> tuple[set[str], bool]:
    """Named parameters of lm-eval's ``VLLM.__init__`` (and whether it takes ``**kwargs``),
    read from its source: importing it needs vllm."""
    spec = importlib.util.find_spec("lm_eval.models")
    assert spec is not None and spec.submodule_search_locations
    source = Path(spec.submodule_search_locations[0], "vllm_causallms.py").read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == "VLLM":
            registered = [
                d.args[0].value
                for d in node.decorator_list
                if isinstance(d, ast.Call) and getattr(d.func, "id", "") == "register_model"
            ]
            assert registered == ["vllm"], "lm-eval's VLLM is no longer model 'vllm'"
            init = next(n for n in node.body if getattr(n, "name", "") == "__init__")
            names = {a.arg for a in init.args.args + init.args.kwonlyargs} - {"self"}
            return names, init.args.kwarg is not None
    raise AssertionError("lm-eval has no VLLM class")


def test_vllm_model_args_match_lm_evals_vllm_signature():
    params, takes_kwargs = _vllm_init_parameters()
    args = backends.vllm_model_args(
        "/d", resolved("eval.backend=vllm")["eval"], dtype="auto", seed=0
    )
    # gpu_memory_utilization goes through VLLM's **kwargs to vllm.LLM, as extra's keys do
    assert set(args) - params == {"gpu_memory_utilization"} and takes_kwargs
    assert {"tensor_parallel_size", "data_parallel_size", "max_model_len", "seed"} <= params
    assert backends.RESERVED - {"device", "gpu_memory_utilization"} <= params


def test_hf_cell_ids_do_not_change():
    """The quick-start cell and every cell of results/cells.json keep their ids (the hf
    backend leaves eval.backend and eval.vllm out); vllm options do not touch an hf id."""
    assert records.cell_id(resolved()) == "3ec3b8d246fb"
    assert records.cell_id(resolved("eval.vllm.tensor_parallel_size=8")) == "3ec3b8d246fb"
    for entry in json.loads(CELLS.read_text())["cells"]:
        cid = records.cell_id(resolved(*entry["overrides"]))
        assert cid == entry["cell_id"], entry["overrides"]


def test_a_vllm_cell_has_its_own_id():
    vllm = records.cell_id(resolved("eval.backend=vllm", "device=cuda"))
    assert vllm != records.cell_id(resolved("device=cuda"))
    tp2 = records.cell_id(
        resolved("eval.backend=vllm", "device=cuda", "eval.vllm.tensor_parallel_size=2")
    )
    assert tp2 != vllm  # parallelism changes batching and kernels: another cell


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["eval.backend=tgi"], "eval.backend='tgi' is not a backend: eval.backend=hf"),
        (["eval.batch_size=big"], "eval.batch_size='big' must be a positive integer, 'auto'"),
        (["eval.batch_size=0"], "eval.batch_size=0 must be"),
        (["eval.backend=vllm"], "eval.backend=vllm runs on CUDA GPUs, not device='cpu'"),
        (
            ["eval.backend=vllm", "device=cuda", "save_merged=false"],
            "stream=false save_merged=false saves none: set save_merged=true",
        ),
        (["eval.backend=vllm", "device=cuda", "+eval.vllm.tp=2"], "eval.vllm.tp is not an option"),
        (
            ["eval.backend=vllm", "device=cuda", "eval.vllm.extra={seed: 1}"],
            "eval.vllm.extra.seed is set by mergelab (from seed)",
        ),
        (
            ["eval.backend=vllm", "device=cuda", "eval.vllm.gpu_memory_utilization=1.5"],
            "eval.vllm.gpu_memory_utilization=1.5 must be a fraction in (0, 1]",
        ),
        (
            ["eval.backend=vllm", "device=cuda", "eval.vllm.data_parallel_size=0"],
            "eval.vllm.data_parallel_size=0 must be a positive integer",
        ),
        (
            [
                "eval.backend=vllm",
                "device=cuda",
                "eval.max_length=512",
                "eval.vllm.max_model_len=9",
            ],
            "both set the context length: set one of them",
        ),
    ],
)
def test_bad_eval_options_are_named(overrides, says):
    with pytest.raises(ValueError) as err:
        backends.check_eval_options(resolved(*overrides))
    assert says in str(err.value)


@pytest.mark.parametrize("batch_size", ["8", "auto", "auto:4"])
def test_batch_sizes_accepted(batch_size):
    backends.check_eval_options(resolved(f"eval.batch_size={batch_size}"))
    backends.check_eval_options(
        resolved(
            f"eval.batch_size={batch_size}", "eval.backend=vllm", "stream=true", "device=cuda:1"
        )
    )


# --------------------------------------------------------------------------- fails at once


def _tiny_cfg(tiny_pool, tmp_path: Path, *overrides: str):
    cfg = compose(
        "logger.mode=disabled",
        f"runs_dir={tmp_path / 'runs'}",
        "task.tasks=[tiny_add]",
        f"task.include_path={tiny_pool['tasks']}",
        *overrides,
    )
    experts = {n: {"path": str(tiny_pool[n])} for n in ("add", "color")}
    cfg.model = OmegaConf.create(
        {
            "name": "t",
            "base": {"path": str(tiny_pool["base"])},
            "experts": experts,
            "dtype": None,
            "exclude": [],
        }
    )
    return cfg


def _no_merging(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("reached the pool or the merge")

    monkeypatch.setattr(run.ModelPool, "from_config", refuse)
    monkeypatch.setattr(run, "execute", refuse)


def _absent_pool_dirs(tmp_path: Path) -> dict[str, Path]:
    """Pool paths that do not exist: a cell that got as far as reading them would fail."""
    return {
        "base": tmp_path / "b",
        "add": tmp_path / "a",
        "color": tmp_path / "c",
        "tasks": tmp_path,
    }


def _assert_vllm_cell_fails_untouched(pool_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A vllm cell without vllm raises an ImportError naming the fixes, touching no cell."""
    cfg = _tiny_cfg(pool_dirs, tmp_path, "eval.backend=vllm", "device=cuda")
    with pytest.raises(ImportError) as err:
        run.run_cell(cfg)
    msg = str(err.value)
    assert "eval.backend=vllm" in msg and "pip install 'mergelab[vllm]'" in msg, msg
    assert "pip install vllm" in msg and "eval.backend=hf" in msg, msg
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(p.name != ".hydra" for p in runs.iterdir()), (
        "a cell was touched"
    )


def test_missing_vllm_fails_before_any_merge(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    monkeypatch.delitem(sys.modules, "lm_eval.models.vllm_causallms", raising=False)
    _no_merging(monkeypatch)
    _assert_vllm_cell_fails_untouched(_absent_pool_dirs(tmp_path), tmp_path)


@pytest.mark.skipif(VLLM_INSTALLED, reason="vllm is installed here")
def test_vllm_really_absent_here_fails_before_any_merge(monkeypatch, tmp_path):
    _no_merging(monkeypatch)
    pool_dirs = _absent_pool_dirs(tmp_path)
    _assert_vllm_cell_fails_untouched(pool_dirs, tmp_path)
    # a dry run scores nothing, so it does not need vllm
    cfg = _tiny_cfg(pool_dirs, tmp_path, "eval.backend=vllm", "device=cuda", "dry_run=true")
    assert run.run_cell(cfg) is None


# --------------------------------------------------------------------------- hf: batch_size=auto


def test_batch_size_auto_on_the_in_process_hflm(tiny_pool):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_pool["base"]).eval()
    tok = (
        ModelPool.from_config({"base": {"path": str(tiny_pool["base"])}}, False).open().tokenizer()
    )
    tm = validate_tasks(["tiny_add"], tiny_pool["tasks"])
    fixed = evaluate(model, tok, ["tiny_add"], task_manager=tm, batch_size=4, limit=6)
    auto = evaluate(model, tok, ["tiny_add"], task_manager=tm, batch_size="auto", limit=6)
    assert auto.scores == fixed.scores
    # another batch (64 detected here, not 4) pads and reduces differently: equal up to
    # float rounding, not bit for bit (which is why eval.batch_size is part of the cell id)
    lls = [
        torch.tensor([[r[0][0] for r in s["resps"]] for s in res.samples["tiny_add"]])
        for res in (auto, fixed)
    ]
    torch.testing.assert_close(lls[0], lls[1], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- vllm path, stand-in


class _StandInVLLM:
    """Takes lm-eval's VLLM arguments and scores the directory it is given with HFLM (the
    real VLLM needs vllm and a GPU); records what it was handed."""

    seen: list[dict[str, Any]] = []

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: Any = None) -> Any:
        from lm_eval.models.huggingface import HFLM

        params, _ = _vllm_init_parameters()
        unknown = set(arg_dict) - params - {"gpu_memory_utilization"}
        assert not unknown, f"VLLM does not take {unknown}"
        files = sorted(p.name for p in Path(arg_dict["pretrained"]).iterdir())
        cls.seen.append({**arg_dict, "files": files})
        return HFLM(
            pretrained=arg_dict["pretrained"],
            dtype=arg_dict["dtype"],
            batch_size=arg_dict["batch_size"],
            max_length=arg_dict["max_model_len"] or arg_dict["max_length"],
            softmax_dtype=torch.float32,
            device="cpu",
        )


def test_vllm_path_scores_the_saved_checkpoint_like_hf(tiny_pool, tmp_path, monkeypatch):
    import lm_eval.api.registry

    common = ("eval.limit=6", "eval.batch_size=4", "stream=false", "save_merged=true")
    hf = run.run_cell(_tiny_cfg(tiny_pool, tmp_path, *common))
    assert hf["eval_backend"]["name"] == "hf" and "load" in hf["timings"]

    real_check = backends.check_eval_options
    # device=cuda is what eval.backend=vllm requires; this stand-in scores on the CPU
    monkeypatch.setattr(
        backends, "check_eval_options", lambda c: real_check({**c, "device": "cuda"})
    )
    monkeypatch.setattr(backends, "require_backend", lambda ev: None)
    monkeypatch.setattr(
        backends, "describe", lambda b, a=None: {"name": b, "model_args": dict(a or {})}
    )
    monkeypatch.setattr(
        lm_eval.api.registry, "get_model", lambda name: {"vllm": _StandInVLLM}[name]
    )
    _StandInVLLM.seen.clear()
    vl = run.run_cell(_tiny_cfg(tiny_pool, tmp_path, *common, "eval.backend=vllm"))

    (seen,) = _StandInVLLM.seen
    cell = tmp_path / "runs" / vl["cell_id"]
    assert Path(seen["pretrained"]).parent == cell and ".partial-" in seen["pretrained"]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(seen["files"])
    assert (cell / "merged" / "model.safetensors").is_file() and not Path(
        seen["pretrained"]
    ).exists()
    assert (seen["dtype"], seen["seed"], seen["batch_size"]) == ("float32", 0, 4)
    assert vl["eval_backend"]["model_args"]["tensor_parallel_size"] == 1
    assert "load" not in vl["timings"]  # no HF model is built for vllm

    assert vl["cell_id"] != hf["cell_id"] and vl["weights_sha256"] == hf["weights_sha256"]
    for key in ("metrics", "scores", "stderr", "n_samples", "n_shot", "intervals"):
        assert vl[key] == hf[key], key
    samples = [
        (tmp_path / "runs" / r["cell_id"] / "samples.jsonl").read_text().splitlines()
        for r in (hf, vl)
    ]
    assert samples[0] == samples[1]


# --------------------------------------------------------------------------- build once


def _old_model(pool: ModelPool, merged: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The in-memory path before: the base read from disk, then overwritten."""
    from transformers import AutoModelForCausalLM

    from core.sources import parse_dtype

    model = AutoModelForCausalLM.from_pretrained(
        pool.base_dir, dtype=parse_dtype(pool.dtype) or "auto", trust_remote_code=False
    )
    run.load_state_dict_checked(model, merged)
    return model.eval()


def _tied_pool(root: Path) -> dict[str, Path]:
    """Base and two experts of a tiny Llama whose lm_head is tied to the embeddings (the
    checkpoints hold no lm_head.weight)."""
    from transformers import LlamaForCausalLM

    tok = make_tiny_tokenizer()
    config = make_tiny_llama(len(tok)).config
    config.tie_word_embeddings = True
    dirs = {}
    for name, seed in (("base", 0), ("add", 1), ("color", 2)):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config).eval()
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    return dirs


@pytest.mark.parametrize(
    ("tied", "dtype", "config_dtype"),
    [
        (False, None, None),
        (True, None, None),
        (False, "bfloat16", None),
        (True, "float16", None),
        (False, None, "bfloat16"),  # config.json's dtype differs from the stored weights'
    ],
)
def test_build_once_equals_load_then_overwrite(tiny_pool, tmp_path, tied, dtype, config_dtype):
    src = (
        _tied_pool(tmp_path / "src")
        if tied
        else {k: tiny_pool[k] for k in ("base", "add", "color")}
    )
    dirs = {k: Path(shutil.copytree(v, tmp_path / k)) for k, v in src.items()}
    if config_dtype:
        cfg_path = dirs["base"] / "config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "dtype": config_dtype}))
    experts = {n: {"path": str(dirs[n])} for n in ("add", "color")}
    pool = ModelPool.from_config(
        {"base": {"path": str(dirs["base"])}, "experts": experts, "dtype": dtype}
    ).open()
    merged: dict[str, torch.Tensor] = {}
    execute(pool, TaskArithmetic(scaling=0.7), merged.__setitem__, seed=0, progress=False)
    old = _old_model(pool, merged)
    for weights in dirs["base"].glob("*.safetensors"):
        weights.unlink()  # the new path must not need the base's weights
    new = run.build_merged_model(pool, merged).eval()

    a, b = old.state_dict(), new.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert (
            a[k].dtype == b[k].dtype and a[k].device == b[k].device and torch.equal(a[k], b[k])
        ), k
    bufs_a, bufs_b = dict(old.named_buffers()), dict(new.named_buffers())
    assert list(bufs_a) == list(bufs_b) and any("inv_freq" in k for k in bufs_a)
    for k in bufs_a:  # non-persistent (rotary inv_freq): real, initialised, on the device
        assert bufs_b[k].device.type == "cpu" and bufs_a[k].dtype == bufs_b[k].dtype, k
        assert torch.equal(bufs_a[k], bufs_b[k]), k
    head, emb = new.get_output_embeddings().weight, new.get_input_embeddings().weight
    assert (
        (head is emb)
        == tied
        == (old.get_output_embeddings().weight is old.get_input_embeddings().weight)
    )
    assert old.config.to_dict() == new.config.to_dict()
    assert old.generation_config.to_dict() == new.generation_config.to_dict()
    assert (old.name_or_path, old.training) == (new.name_or_path, new.training)
    ids = torch.randint(
        4, len(make_tiny_tokenizer()), (3, 17), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        assert torch.equal(old(ids).logits, new(ids).logits)


def test_build_once_refuses_an_incomplete_merge(tiny_pool):
    pool = ModelPool.from_config({"base": {"path": str(tiny_pool["base"])}}, False).open()
    merged = {n: pool.tensor("base", n) for n in pool.tensor_names()}
    merged.pop("model.norm.weight")
    with pytest.raises(
        ValueError, match=r"merged state lacks model tensors \['model.norm.weight'\]"
    ):
        run.build_merged_model(pool, merged)
    merged = {n: pool.tensor("base", n) for n in pool.tensor_names()} | {
        "extra.weight": torch.ones(2)
    }
    with pytest.raises(
        ValueError, match=r"merged tensors the model does not have: \['extra.weight'\]"
    ):
        run.build_merged_model(pool, merged)
