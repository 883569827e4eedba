"""Seeded random drops (DARE, DELLA): reproducible uniforms and the two rescalings.

The generator seed of one (run seed, expert, tensor) is the first 8 bytes of
sha256(json.dumps([seed, expert, tensor])) shifted to 63 bits; the uniforms are drawn for
the whole tensor shape on CPU from a private ``torch.Generator`` and then moved to the
tensor's device. A mask therefore never depends on execution order, device, parallelism
or the global RNG.

:class:`MergekitMaskStream` is the opt-in alternative (``mask_rng: mergekit``) that
replays mergekit 0.1.5's draws instead, so that its DARE and DELLA masks come out bit for
bit. mergekit draws every mask with ``torch.bernoulli`` from torch's *global* generator,
seeded by ``--random-seed`` (``transformers.set_seed``; without it its masks cannot be
reproduced at all), one call per (tensor, model) in its executor's order: tensors by
their checkpoint names in lexicographic order (its schedule is a lexicographic
topological sort keyed by tensor name), models in config order, base excluded; a model
whose density is ≥ 1 draws nothing. CPU ``bernoulli`` consumes one 32-bit draw per entry
whatever the probabilities, so the generator's position at each tensor depends only on
the shapes before it. Replaying needs every merged tensor's name and shape first (a
statistics pass), then the stream is run once to record the generator state at each
tensor (drawing and discarding what precedes it, as mergekit does) and each tensor's
masks are drawn again from its recorded state when it is merged, in whatever order
mergelab merges. It reproduces mergekit only when mergelab merges exactly the tensors
mergekit merges (no ``model.exclude``) with the same seed, density and experts in the
same order, and only mergekit's CPU merges (with ``--cuda`` its masks come from the CUDA
generator; mergelab draws them on the CPU whatever its ``device``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch
from torch import Tensor

DROP_RESCALES = ("inverse_p", "l1", "none")
MASK_RNGS = ("mergelab", "mergekit")
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


def keep_masked(tau: Tensor, keep: Tensor, *, l1: bool) -> Tensor:
    """τ ⊙ keep, rescaled by :func:`l1_rescale` when ``l1`` (``rescale: l1``; else
    ``none``)."""
    masked = torch.where(keep, tau, torch.zeros_like(tau))
    return l1_rescale(tau, masked) if l1 else masked


class MergekitMaskStream:
    """mergekit 0.1.5's global-RNG mask stream, replayed per tensor (module docstring).

    ``record(name, shape, draws)`` during a statistics pass (``draws``: the models that
    draw a mask for this tensor), ``finish(seed)`` at its end, then ``generator(name)``
    gives a generator positioned at that tensor's first draw."""

    def __init__(self) -> None:
        self._pending: dict[str, tuple[tuple[int, ...], int]] = {}
        self._states: dict[str, Tensor] = {}

    def reset(self) -> None:
        self._pending, self._states = {}, {}

    def record(self, name: str, shape: Sequence[int] | torch.Size, draws: int) -> None:
        self._pending[name] = (tuple(shape), int(draws))

    def finish(self, seed: int) -> None:
        """Walk the stream in mergekit's order, keeping the state before each tensor."""
        g = torch.Generator(device="cpu").manual_seed(int(seed))
        for name in sorted(self._pending):
            shape, draws = self._pending[name]
            self._states[name] = g.get_state()
            if draws:
                probs = torch.full(shape, 0.5)  # the draws depend on the shape only
                for _ in range(draws):
                    torch.bernoulli(probs, generator=g)
        self._pending = {}

    def generator(self, name: str) -> torch.Generator:
        if name not in self._states:
            raise RuntimeError(
                f"mask_rng=mergekit: tensor {name!r} was not seen in the statistics pass "
                "(the pass must run over every merged tensor first)"
            )
        g = torch.Generator(device="cpu")
        g.set_state(self._states[name])
        return g
