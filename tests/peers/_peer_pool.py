"""Tiny float32 checkpoints at LLaMA tensor shapes for the peer-oracle tests."""

from __future__ import annotations

import torch

# The shapes of one LLaMA decoder layer at hidden 64, intermediate 172, vocab 128.
LLAMA_SHAPES: dict[str, tuple[int, ...]] = {
    "model.embed_tokens.weight": (128, 64),
    "model.layers.0.self_attn.q_proj.weight": (64, 64),
    "model.layers.0.self_attn.k_proj.weight": (64, 64),
    "model.layers.0.self_attn.v_proj.weight": (64, 64),
    "model.layers.0.self_attn.o_proj.weight": (64, 64),
    "model.layers.0.mlp.gate_proj.weight": (172, 64),
    "model.layers.0.mlp.up_proj.weight": (172, 64),
    "model.layers.0.mlp.down_proj.weight": (64, 172),
    "model.layers.0.input_layernorm.weight": (64,),
    "model.layers.0.post_attention_layernorm.weight": (64,),
    "model.norm.weight": (64,),
    "lm_head.weight": (128, 64),
}


def make_pool(
    seed: int, n_experts: int
) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Float32 base and experts at LLaMA shapes: θ0 ~ N(0, 0.02²) (norms ~ 1 + N(0, 0.02²));
    θk = θ0 + 0.002·(shared + own) so that the experts' task vectors partly agree in sign."""
    g = torch.Generator().manual_seed(seed)
    base, shared = {}, {}
    for name, shape in LLAMA_SHAPES.items():
        w = torch.randn(shape, generator=g) * 0.02
        base[name] = w + 1.0 if len(shape) == 1 else w
        shared[name] = torch.randn(shape, generator=g)
    experts = [
        {
            n: base[n] + 0.002 * (shared[n] + torch.randn(s, generator=g))
            for n, s in LLAMA_SHAPES.items()
        }
        for _ in range(n_experts)
    ]
    return base, experts
