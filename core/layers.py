"""Transformer-layer grouping of state-dict tensor names, shared by the per-layer methods.

A transformer block's tensor (``layers.<i>.``, also ``h.<i>.`` / ``blocks.<i>.``) is group
``layers.<i>``; embeddings (``embed``, ``wte``, ``wpe``, ``word_embeddings``) are ``embed``;
the output head (``lm_head``, ``embed_out``) is ``head``; everything else (e.g. the final
norm) is ``other``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_HEAD = re.compile(r"(?:^|\.)(?:lm_head|embed_out)(?:\.|$)")
_EMBED = re.compile(r"embed|(?:^|\.)(?:wte|wpe|word_embeddings)(?:\.|$)")


def block_index(name: str) -> int | None:
    """The 0-based transformer-block index of tensor ``name``, or ``None`` outside blocks."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def layer_group(name: str) -> str:
    """``layers.<i>`` for a transformer block's tensor, ``head``, ``embed`` or ``other``."""
    i = block_index(name)
    if i is not None:
        return f"layers.{i}"
    if _HEAD.search(name):
        return "head"
    if _EMBED.search(name):
        return "embed"
    return "other"


def group_tensors(names: Sequence[str]) -> dict[str, list[str]]:
    """Group → its tensor names, groups in order of first appearance."""
    out: dict[str, list[str]] = {}
    for n in names:
        out.setdefault(layer_group(n), []).append(n)
    return out
