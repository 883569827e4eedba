"""Causal-LM helpers shared by data-dependent methods and training workflows: prompt
encoding, right padding, last-position lookup and entropy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def encode_prompts(tokenizer: Any, prompts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each prompt (with special tokens), keeping its last ``max_length``
    tokens; empty encodings are dropped."""
    out = []
    for p in prompts:
        ids = list(tokenizer(p, add_special_tokens=True)["input_ids"])
        if ids:
            out.append(ids[-max_length:])
    return out


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is masked out anyway)."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


def right_pad(
    seqs: Sequence[Sequence[int]], pad_id: int, device: str | torch.device = "cpu"
) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)`` of right-padded sequences."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def last_positions(attention_mask: Tensor) -> Tensor:
    """Index of each row's last real token (works for left or right padding)."""
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (pos + 1)).argmax(dim=1)


def entropy(logits: Tensor) -> Tensor:
    """Shannon entropy (nats) of softmax(logits) over the last dimension, in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def last_token_entropy(logits: Tensor, attention_mask: Tensor) -> Tensor:
    """Per-sample entropy of the next-token distribution at the last real position."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return entropy(logits[rows, last_positions(attention_mask)])
