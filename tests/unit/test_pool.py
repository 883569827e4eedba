"""Model pool: lazy tensor access, LoRA experts, and compatibility errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.pool import ModelPool, NonFiniteMemberError, PoolError, resolve_checkpoint
from tests.helpers.tiny_pool import reshard


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
    with pytest.raises(PoolError, match="has no weights"):
        ModelPool.from_config(pool_cfg(tiny_pool, bad={"path": str(bad)})).open()


def test_exclude_and_non_float_kept_from_base(tiny_pool):
    pool = ModelPool.from_config({**pool_cfg(tiny_pool), "exclude": [r"embed_tokens"]}).open()
    assert not pool.is_merged("model.embed_tokens.weight")
    assert pool.is_merged("lm_head.weight")


# --------------------------------------------------------------------------- broken files


def _header_end(path: Path) -> int:
    """Offset where a safetensors file's payload starts (8-byte length + JSON header)."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def _open_bad(tiny_pool, bad: Path) -> ModelPool:
    return ModelPool.from_config(pool_cfg(tiny_pool, bad={"path": str(bad)})).open()


def test_truncated_checkpoint_names_member_file_and_fix(tiny_pool, tmp_path):
    bad = _copy_expert(tiny_pool, tmp_path)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # an interrupted download
    with pytest.raises(PoolError) as info:
        _open_bad(tiny_pool, bad)
    msg = str(info.value)
    assert f"pool member 'bad' ({bad})" in msg and f"cannot read {weights}" in msg
    assert "SafetensorError" in msg and "incomplete metadata" in msg and "re-download" in msg


def test_corrupted_header_names_member_and_file(tiny_pool, tmp_path):
    bad = _copy_expert(tiny_pool, tmp_path)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON header
    weights.write_bytes(bytes(data))
    with pytest.raises(PoolError, match=r"pool member 'bad' .*cannot read .*header"):
        _open_bad(tiny_pool, bad)


def test_nan_payload_is_caught_when_read(tiny_pool, tmp_path):
    """Payload bytes overwritten with 0xFF (float32 NaN), header intact: the file opens, and
    the first read of a tensor fails naming member, tensor and file."""
    bad = _copy_expert(tiny_pool, tmp_path)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    start = _header_end(weights)
    weights.write_bytes(data[:start] + b"\xff" * (len(data) - start))
    pool = _open_bad(tiny_pool, bad)
    first = pool.tensor_names()[0]
    with pytest.raises(NonFiniteMemberError) as info:
        pool.tensors(first)
    msg = str(info.value)
    assert f"pool member 'bad' holds NaN/inf in tensor '{first}'" in msg
    assert str(weights) in msg and "re-download or rebuild" in msg


def _shard(src: Path, dst: Path) -> Path:
    """``src``'s checkpoint re-saved at ``dst`` as two shards and an index."""
    shutil.copytree(src, dst)
    reshard(dst)
    return dst


def test_sharded_checkpoint_reads_and_broken_index_or_shard_is_named(tiny_pool, tmp_path):
    sharded = _shard(tiny_pool["add"], tmp_path / "sharded")
    name = "model.layers.0.mlp.up_proj.weight"
    pool = _open_bad(tiny_pool, sharded)
    assert torch.equal(
        pool.tensor("bad", name), load_file(tiny_pool["add"] / "model.safetensors")[name]
    )

    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    other = {"a.safetensors": "b.safetensors", "b.safetensors": "a.safetensors"}
    index["weight_map"][name] = other[index["weight_map"][name]]
    index_path.write_text(json.dumps(index))  # the index names the wrong shard
    with pytest.raises(PoolError, match=rf"pool member 'bad' .*maps \[{name}\] .*does not hold"):
        _open_bad(tiny_pool, sharded)

    index_path.write_text('{"weight_map": {')  # a torn index
    with pytest.raises(PoolError, match=r"pool member 'bad' .*cannot read .*index\.json.*JSON"):
        _open_bad(tiny_pool, sharded)


def test_truncated_bin_checkpoint_is_named(tiny_pool, tmp_path):
    bad = _copy_expert(tiny_pool, tmp_path)
    state = load_file(bad / "model.safetensors")
    (bad / "model.safetensors").unlink()
    torch.save(state, bad / "pytorch_model.bin")
    pool = _open_bad(tiny_pool, bad)
    assert pool.sources["bad"].file(next(iter(state))) == bad / "pytorch_model.bin"
    data = (bad / "pytorch_model.bin").read_bytes()
    (bad / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(PoolError, match=r"pool member 'bad' .*cannot read .*pytorch_model\.bin"):
        _open_bad(tiny_pool, bad)


def _lora_copy(tiny_pool, tmp_path: Path) -> Path:
    dst = tmp_path / "lora"
    shutil.copytree(tiny_pool["lora_color"], dst)
    return dst


def _open_lora(tiny_pool, adapter: Path) -> ModelPool:
    return ModelPool.from_config(pool_cfg(tiny_pool, lora={"adapter": str(adapter)})).open()


def test_lora_adapter_nan_and_truncation_are_named(tiny_pool, tmp_path):
    adapter = _lora_copy(tiny_pool, tmp_path)
    weights = adapter / "adapter_model.safetensors"
    raw = load_file(weights)
    for key in raw:
        if ".lora_A." in key:
            raw[key][0, 0] = float("inf")
    save_file(raw, weights)
    pool = _open_lora(tiny_pool, adapter)
    target = pool.sources["lora"].file  # W0 + s·B·A is read from the adapter for targets
    name = next(n for n in pool.tensor_names() if target(n) == weights)
    with pytest.raises(NonFiniteMemberError) as info:
        pool.tensors(name)
    msg = str(info.value)
    assert f"pool member 'lora' holds NaN/inf in tensor '{name}' (materialised as W0" in msg
    assert str(weights) in msg

    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(PoolError, match=r"pool member 'lora' .*cannot read .*adapter_model"):
        _open_lora(tiny_pool, adapter)
