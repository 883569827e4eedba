"""LoRA experts beyond the plain case: ``lora_bias`` applied as peft merges it, deltas
added in float32 and rounded once, and adapter features the pool does not implement
refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from harness.pool import ModelPool, PoolError

BIASED = ["up_proj", "down_proj"]  # Llama with mlp_bias: the MLP projections have biases


def _base(path: Path, dtype: torch.dtype, *, mlp_bias: bool = True) -> Path:
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mlp_bias=mlp_bias,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(path)
    return path


def _adapter(base: Path, path: Path, *, lora_bias: bool, targets: list[str] = BIASED) -> Path:
    from peft import LoraConfig, get_peft_model

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, lora_bias=lora_bias, init_lora_weights=False
    )
    peft_model = get_peft_model(model, cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # init_lora_weights=False leaves lora_B's bias at 0
                p.normal_(0.0, 0.05)
    peft_model.save_pretrained(path)
    return path


def _pool(base: Path, adapter: Path) -> ModelPool:
    cfg = {"name": "t", "base": {"path": str(base)}, "experts": {"lora": {"adapter": str(adapter)}}}
    return ModelPool.from_config(cfg).open()


def _peft_merge(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    model = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()


def test_lora_bias_moves_the_base_bias_as_peft_merges_it(tmp_path):
    base = _base(tmp_path / "base", torch.float32)
    adapter = _adapter(base, tmp_path / "lora", lora_bias=True)
    assert any(k.endswith("lora_B.bias") for k in load_file(adapter / "adapter_model.safetensors"))
    pool = _pool(base, adapter)
    merged = _peft_merge(base, adapter)
    moved = []
    for name in pool.tensor_names():
        base_t, experts = pool.tensors(name)
        torch.testing.assert_close(experts["lora"], merged[name], rtol=0, atol=1e-6)
        if name.endswith(".bias") and not torch.equal(experts["lora"], base_t):
            moved.append(name)
    assert sorted(moved) == sorted(
        f"model.layers.{i}.mlp.{m}.bias" for i in range(2) for m in BIASED
    )


def test_a_lora_bias_for_a_layer_without_bias_is_refused(tmp_path):
    base = _base(tmp_path / "base", torch.float32)
    adapter = _adapter(base, tmp_path / "lora", lora_bias=False, targets=["q_proj"])
    weights = adapter / "adapter_model.safetensors"
    raw = load_file(weights)
    key = next(k for k in raw if "q_proj.lora_B.weight" in k)  # q_proj has no bias
    raw[key.replace(".weight", ".bias")] = torch.ones(raw[key].shape[0])
    save_file(raw, weights)
    with pytest.raises(PoolError, match=r"pool member 'lora'.*q_proj\.bias.*lora_bias=True"):
        _pool(base, adapter)


def test_bf16_base_plus_lora_is_rounded_once(tmp_path):
    """W0 (bf16) + s·B·A is formed in float32: a float32 pool equals peft's float32 merge
    of the same bf16 weights, and a bf16 pool is that sum rounded once."""
    base = _base(tmp_path / "base", torch.bfloat16, mlp_bias=False)
    adapter = _adapter(base, tmp_path / "lora", lora_bias=False)
    merged = _peft_merge(base, adapter)  # bf16 weights upcast exactly, merged in float32
    name = "model.layers.0.mlp.up_proj.weight"
    f32 = _pool(base, adapter).tensors(name)[1]["lora"]
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32, merged[name], rtol=0, atol=1e-6)
    # the old path (round to the base's bf16 first) is measurably further from peft's merge
    rounded_first = f32.to(torch.bfloat16).float()
    assert (rounded_first - merged[name]).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("target_parameters", ["mlp.experts.gate_up_proj"]),
        ("use_dora", True),
        ("modules_to_save", ["lm_head"]),
        ("trainable_token_indices", [1, 2]),
        ("some_future_feature", {"on": True}),
        ("bias", "all"),
    ],
)
def test_unimplemented_adapter_features_are_refused_by_name(tmp_path, key, value):
    base = _base(tmp_path / "base", torch.float32)
    adapter = _adapter(base, tmp_path / "lora", lora_bias=False)
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg[key] = value
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(PoolError, match=rf"pool member 'lora'.*{key}.*merge_and_unload"):
        _pool(base, adapter)


def test_an_unknown_adapter_tensor_is_refused_by_name(tmp_path):
    base = _base(tmp_path / "base", torch.float32)
    adapter = _adapter(base, tmp_path / "lora", lora_bias=False)
    weights = adapter / "adapter_model.safetensors"
    raw = load_file(weights)
    raw["base_model.model.model.layers.0.mlp.up_proj.bias"] = torch.zeros(64)
    save_file(raw, weights)
    with pytest.raises(PoolError, match=r"pool member 'lora'.*mlp\.up_proj\.bias.*not a LoRA"):
        _pool(base, adapter)
