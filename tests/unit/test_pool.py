"""Model pool: lazy tensor access, LoRA experts, and compatibility errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.pool import ModelPool, PoolError, resolve_checkpoint


def pool_cfg(dirs: dict[str, Path], **experts) -> dict:
    experts = experts or {"add": {"path": str(dirs["add"])}, "color": {"path": str(dirs["color"])}}
    return {"name": "t", "base": {"path": str(dirs["base"])}, "experts": experts}


def test_checkpoint_tensors_match_saved_state(tiny_pool):
    pool = ModelPool.from_config(pool_cfg(tiny_pool)).open()
    saved = load_file(tiny_pool["add"] / "model.safetensors")
    assert set(pool.tensor_names()) == set(saved)
    name = "model.layers.0.mlp.up_proj.weight"
    base, experts = pool.tensors(name)
    assert torch.equal(experts["add"], saved[name])
    assert not torch.equal(experts["add"], base)  # fine-tuning moved it
    assert pool.sources["add"].shape(name) == tuple(saved[name].shape)
    pool.check_compatible()


def test_lora_expert_equals_peft_merge(tiny_pool):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pool = ModelPool.from_config(
        pool_cfg(tiny_pool, lora={"adapter": str(tiny_pool["lora_color"])})
    ).open()
    pool.check_compatible()
    merged = (
        PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_pool["base"]), tiny_pool["lora_color"]
        )
        .merge_and_unload()
        .state_dict()
    )
    changed = 0
    for name in pool.tensor_names():
        base, experts = pool.tensors(name)
        torch.testing.assert_close(experts["lora"], merged[name], rtol=1e-5, atol=1e-6)
        changed += not torch.equal(experts["lora"], base)
    assert changed == 4  # q_proj and v_proj in 2 layers


def _copy_expert(tiny_pool, tmp_path: Path) -> Path:
    dst = tmp_path / "bad"
    shutil.copytree(tiny_pool["add"], dst)
    return dst


def test_architecture_mismatch_names_both(tiny_pool, tmp_path):
    bad = _copy_expert(tiny_pool, tmp_path)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (bad / "config.json").write_text(json.dumps(cfg))
    pool = ModelPool.from_config(pool_cfg(tiny_pool, bad={"path": str(bad)})).open()
    with pytest.raises(PoolError, match=r"'bad' has model_type='mistral' but the base has 'llama'"):
        pool.check_compatible()


def test_missing_tensor_is_named(tiny_pool, tmp_path):
    bad = _copy_expert(tiny_pool, tmp_path)
    state = load_file(bad / "model.safetensors")
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    pool = ModelPool.from_config(pool_cfg(tiny_pool, bad={"path": str(bad)})).open()
    with pytest.raises(PoolError, match=r"missing \[model\.layers\.1\.mlp\.down_proj\.weight\]"):
        pool.check_compatible()


def test_vocab_mismatch_suggests_backbone_merge(tiny_pool, tmp_path):
    bad = _copy_expert(tiny_pool, tmp_path)
    state = load_file(bad / "model.safetensors")
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        state[k] = torch.cat([state[k], state[k][:3]])
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vocab_size"] += 3
    (bad / "config.json").write_text(json.dumps(cfg))
    pool = ModelPool.from_config(pool_cfg(tiny_pool, bad={"path": str(bad)})).open()
    with pytest.raises(PoolError, match=r"vocab_size 101 vs 104.*embed_tokens.*exclude"):
        pool.check_compatible()
    # the suggested fix: merge the backbone only, keep embeddings and head from the base
    cfg = pool_cfg(tiny_pool, bad={"path": str(bad)})
    pool = ModelPool.from_config({**cfg, "exclude": ["embed_tokens", "lm_head"]}).open()
    pool.check_compatible()
    assert not pool.is_merged("lm_head.weight")


def test_tokenizer_vocab_mismatch(tiny_pool, tmp_path):
    bad = _copy_expert(tiny_pool, tmp_path)
    tok = json.loads((bad / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["zz"] = vocab.pop("z")
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    pool = ModelPool.from_config(pool_cfg(tiny_pool, bad={"path": str(bad)})).open()
    with pytest.raises(PoolError, match=r"different tokenizer vocabulary.*\[z, zz\]"):
        pool.check_compatible()


def test_missing_files_and_bad_config():
    with pytest.raises(PoolError, match="not a directory"):
        resolve_checkpoint("/nonexistent/model/dir")
    with pytest.raises(PoolError, match="model.base.path is required"):
        ModelPool.from_config({"experts": {"a": {"path": "x"}}})
    with pytest.raises(PoolError, match="model.experts is empty"):
        ModelPool.from_config({"base": {"path": "x"}, "experts": {}})
    with pytest.raises(PoolError, match="exactly one of 'path'"):
        ModelPool.from_config({"base": {"path": "x"}, "experts": {"a": {}}})
    with pytest.raises(PoolError, match="model.dtype='fp8'"):
        ModelPool.from_config(
            {"base": {"path": "x"}, "experts": {"a": {"path": "y"}}, "dtype": "fp8"}
        )


def test_missing_shard_is_named(tiny_pool, tmp_path):
    bad = _copy_expert(tiny_pool, tmp_path)
    (bad / "model.safetensors").unlink()
    with pytest.raises(PoolError, match="no weights in"):
        ModelPool.from_config(pool_cfg(tiny_pool, bad={"path": str(bad)})).open()


def test_exclude_and_non_float_kept_from_base(tiny_pool):
    pool = ModelPool.from_config({**pool_cfg(tiny_pool), "exclude": [r"embed_tokens"]}).open()
    assert not pool.is_merged("model.embed_tokens.weight")
    assert pool.is_merged("lm_head.weight")
