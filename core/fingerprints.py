"""sha256 fingerprints of what decides a cached training or fit: weights, tokenizer, texts."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every state-dict tensor's name, dtype, shape and bytes (sorted by name)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's class, vocabulary and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = getattr(tokenizer, "special_tokens_map", {})
    payload = repr((type(tokenizer).__name__, vocab, sorted(special.items())))
    return hashlib.sha256(payload.encode()).hexdigest()


def texts_fingerprint(texts: Sequence[str]) -> str:
    """sha256 of the texts, in order, each terminated by a NUL byte."""
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()
