"""Seeded random drops (DARE, DELLA): reproducible uniforms and the two rescalings.

The generator seed of one (run seed, expert, tensor) is the first 8 bytes of
sha256(json.dumps([seed, expert, tensor])) shifted to 63 bits; the uniforms are drawn for
the whole tensor shape on CPU from a private ``torch.Generator`` and then moved to the
tensor's device. A mask therefore never depends on execution order, device, parallelism
or the global RNG.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch
from torch import Tensor

DROP_RESCALES = ("inverse_p", "l1")
L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor: no rescale when either L1 norm is below


def mask_seed(seed: int, expert: str, tensor: str) -> int:
    """63-bit generator seed from (run seed, expert name, tensor name) via sha256."""
    digest = hashlib.sha256(json.dumps([int(seed), expert, tensor]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def seeded_uniforms(shape: Sequence[int] | torch.Size, generator_seed: int) -> Tensor:
    """``torch.rand(shape)`` on CPU from a private generator seeded with ``generator_seed``."""
    g = torch.Generator(device="cpu").manual_seed(generator_seed)
    return torch.rand(tuple(shape), generator=g)


def dare_keep_mask(
    shape: Sequence[int] | torch.Size,
    drop_rate: float,
    generator_seed: int,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Boolean keep-mask: entry kept when its uniform u ≥ ``drop_rate`` (probability
    1 − p; p = 0 keeps everything), moved to ``device``."""
    if drop_rate <= 0:
        return torch.ones(tuple(shape), dtype=torch.bool, device=device)
    return (seeded_uniforms(shape, generator_seed) >= drop_rate).to(device)


def dare_rescale(tau: Tensor, keep: Tensor, drop_rate: float) -> Tensor:
    """τ ⊙ keep / (1 − p): dropped entries become 0, survivors are scaled by 1/(1 − p)."""
    return torch.where(keep, tau / (1.0 - drop_rate), torch.zeros_like(tau))


def l1_rescale(tau: Tensor, masked: Tensor) -> Tensor:
    """``masked`` · ‖τ‖₁ / ‖masked‖₁, one factor per tensor (mergekit 0.1.5's ``rescale``);
    unchanged when either norm is below 1e-7."""
    before, after = tau.abs().sum(), masked.abs().sum()
    if before >= L1_EPS and after >= L1_EPS:
        return masked * (before / after)
    return masked
