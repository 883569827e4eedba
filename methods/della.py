"""DELLA-Merging (Deep, Bhardwaj & Poria 2024, arXiv 2406.11617): MAGPRUNE drop and
rescale, then TIES' sign election and disjoint mean (``della``) or a weighted sum
(``della_linear``).

**Drop (MAGPRUNE)**, per tensor and expert, with τ = θk − θ0 split into rows (a 2-D or
higher tensor: one row per output unit, ``τ.reshape(shape[0], -1)``; a 1-D tensor: one
row): the n entries of a row are ranked by |τ| ascending, r = 0 … n − 1, and entry i
is kept with probability

    p_i = (d − ε) + 2ε · r_i / (n − 1)

so the smallest magnitude gets d − ε, the largest d + ε, linearly in between, and the
row's mean keep-probability is exactly d (``density``). A row of one entry gets p = d.
Survivors are rescaled by 1/p_i (``rescale: inverse_p``), so E[τ̃_i] = τ_i. With ε = 0
this is DARE with drop rate 1 − d on the same seeded uniforms (bit for bit where 1 − d is
a float32 number, e.g. d = 0.5: DARE compares in float32, this module in float64).

**Elect + fuse**: ``della`` hands the τ̃_k to :func:`core.combine.ties_combine`
(γ = sign(Σ_k τ̃_k) unweighted, mean of the agreeing entries weighted by ``weights``,
θ0 + λ·merged); ``della_linear`` to :func:`core.combine.sum_combine`
(θ0 + λ Σ_k w_k τ̃_k).

Reproducible masks: entry i is kept iff u_i ≥ 1 − p_i, with the uniforms u drawn for the
whole tensor shape on CPU from a ``torch.Generator`` seeded by
:func:`core.dropout.mask_seed` (run seed, expert, tensor name), exactly as DARE draws
them, then moved to the tensor's device. Masks never depend on order, device or the
global RNG. The comparison is in float64 (p is computed in float64).

Sources and the choices made here:
- The paper's own text could not be read here; "the paper" below means its abstract
  (rescale by 1/(1 − p) with p the drop probability, i.e. by 1 / keep-probability) and the
  authors' released code (declare-lab/della, ``rank_magnitude`` in its mergekit fork),
  whose conventions the list below follows. The authors' ``window_size`` is the full
  width of the probability window; their code passes ε = window_size / 2, which is this
  module's ``epsilon`` (a half-width, as in mergekit). Their README's three-expert
  command (drop rate 0.3, window 0.14, λ 1.1) gives the defaults: density 0.7,
  ε 0.07, λ = ``scaling`` 1.1.
- Ranks normalised by (r − r_min)/(r_max − r_min) = r/(n − 1), as the authors' code and
  mergekit 0.1.5 do. Equal magnitudes are ranked by a stable sort (lower index ranks
  lower); both references use an unstable ``argsort``.
- Bounds: d ∈ (0, 1]; for d < 1 we need ε ≥ 0, d − ε > 0 and d + ε ≤ 1 (so every p is a
  probability; nothing is clamped). d = 1 keeps everything and ignores ε (mergekit).
- ``della_linear`` is mergekit's variant (the paper has no linear DELLA); its λ defaults
  to 0.3, task arithmetic's, as for ``breadcrumbs``.

mergekit 0.1.5 (``mergekit/sparsify.py`` ``della_magprune``, registered in
``merge_methods/registry.py`` as ``della`` / ``della_linear``) differs:
- **Rescale**: not by 1/p. ``rescale: true`` (its default for both) multiplies the whole
  masked tensor by ‖τ‖₁ / ‖τ ⊙ m‖₁ (one factor per tensor, skipped when either norm is
  below 1e-7). Offered here as ``rescale: l1``; ``rescale: none`` keeps survivors as they
  are (the authors' ``--rescale 0``).
- Same probabilities: p from d − ε to d + ε over the rank normalised by its row's min
  and max (rows along dim 1; 1-D tensors unsqueezed to one row); it raises unless
  d ± ε is strictly inside (0, 1); a row of one entry gives 0/0 (NaN) there.
- Masks from ``torch.bernoulli`` on the global RNG (reproducible only under
  ``--random-seed``, and never the same bits as here).
- Election: the weights multiply the τ̃_k *before* the sign vote (a weighted vote), and
  a zero sum elects +1; here the vote is unweighted and a zero sum merges to 0 (as in
  :mod:`methods.ties`). ``della`` divides by Σ w_k over the agreeing experts
  (``normalize: true``, as here); ``della_linear`` does not divide (as here).
- Defaults: density 1.0 (no pruning), ε 0.15, λ 1.0.

Options selecting mergekit's conventions (defaults: the paper's, as above):
``mask_rng: mergekit`` draws the masks as mergekit does, bit for bit:
``torch.bernoulli`` of its float32 probabilities (:func:`mergekit_keep_probabilities`:
its ``argsort`` ranks along dim 1, its float32 arithmetic) from its global-RNG stream as
``--random-seed`` seeds it (:class:`core.dropout.MergekitMaskStream`; one extra
statistics pass; exact only with every tensor merged and the experts in mergekit's
order). The combine takes ``normalize``, ``weight_product``, ``sign_vote`` and
``zero_sign`` (:mod:`methods.ties`; ``della_linear`` with ``normalize: true`` divides by
Σ w_k), which with ``rescale: l1`` give mergekit's ``della`` / ``della_linear``.

The drop is the transform piece :class:`Magprune` (``method/transform=magprune`` composes
it with any combine and coefficients).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from core.combine import sum_combine, ties_combine
from core.dropout import DROP_RESCALES, keep_masked, mask_seed, seeded_uniforms
from core.options import check_bool, check_choice, check_finite, check_unit_interval
from core.pieces import Fixed, SeededDrop, election_combine
from methods.task_vector import TaskVectorMerge


def _rows(t: Tensor) -> Tensor:
    """``t`` as a 2-D view of rows: (shape[0], rest) for ≥ 2-D, one row otherwise."""
    return t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(1, -1)


def magprune_keep_probabilities(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """Keep-probability of every entry (float64, ``tau``'s shape): per row, rising
    linearly with the |τ| rank from d − ε (smallest) to d + ε (largest); d for a row of
    one entry. Equal magnitudes are ranked by a stable sort (lower index lower)."""
    rows = _rows(tau)
    n = rows.shape[1]
    if n <= 1 or epsilon == 0:
        return torch.full(tau.shape, float(density), dtype=torch.float64, device=tau.device)
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    positions = torch.arange(n, device=tau.device, dtype=torch.float64).expand_as(order)
    rank = torch.empty(rows.shape, dtype=torch.float64, device=tau.device)
    rank.scatter_(1, order, positions)
    del order
    # p = (d − ε) + 2ε · r / (n − 1), in place (one float64 buffer)
    prob = rank.div_(n - 1).mul_(2.0 * epsilon).add_(density - epsilon)
    return prob.reshape(tau.shape)


def mergekit_keep_probabilities(tau: Tensor, density: float, epsilon: float) -> Tensor:
    """mergekit 0.1.5's ``della_magprune`` probabilities, op for op (float32, ``tau``'s
    shape): ranks from ``argsort(argsort(|τ|))`` along dim 1 (a 1-D tensor as one row;
    equal magnitudes in ``argsort``'s own order), normalised by their row's min and max,
    p = (d − ε) + r·2·ε."""
    rows = tau.float()
    if rows.dim() < 2:
        rows = rows.unsqueeze(0)
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).float() + 1
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(tau.shape)


def magprune_uniforms(shape: Sequence[int] | torch.Size, generator_seed: int) -> Tensor:
    """The uniforms of one (expert, tensor): ``torch.rand`` on CPU from a private generator
    (the same draws as :func:`core.dropout.dare_keep_mask` makes)."""
    return seeded_uniforms(shape, generator_seed)


def magprune(
    tau: Tensor, keep_prob: Tensor, uniforms: Tensor, rescale: str = "inverse_p"
) -> tuple[Tensor, Tensor]:
    """(τ̃, keep): keep_i = [u_i ≥ 1 − p_i]; survivors rescaled by 1/p_i (``inverse_p``),
    by the tensor's L1 ratio ‖τ‖₁/‖τ ⊙ keep‖₁ (``l1``, mergekit), or not at all."""
    check_choice(rescale, "rescale", DROP_RESCALES)
    u = uniforms.to(device=tau.device, dtype=torch.float64)
    keep = u >= 1.0 - keep_prob
    return magprune_rescale(tau, keep, keep_prob, rescale), keep


def magprune_rescale(tau: Tensor, keep: Tensor, keep_prob: Tensor, rescale: str) -> Tensor:
    """τ ⊙ keep with the survivors rescaled by 1/p_i (``inverse_p``; ``keep_prob`` is moved
    to ``tau``'s dtype and device), by the L1 ratio (``l1``) or not at all (``none``)."""
    if rescale == "inverse_p":
        return torch.where(keep, tau / keep_prob.to(tau), torch.zeros_like(tau))
    return keep_masked(tau, keep, l1=rescale == "l1")


def della_merge(
    base: Tensor,
    experts: Sequence[Tensor],
    uniforms: Sequence[Tensor],
    *,
    density: float,
    epsilon: float,
    scaling: float,
    weights: Sequence[float] | None = None,
    sign_election: bool = True,
    rescale: str = "inverse_p",
) -> tuple[Tensor, list[Tensor]]:
    """θ0 + λ · (TIES' disjoint mean, or Σ w_k ·) of the MAGPRUNE'd τ_k, and the keep
    masks; ``uniforms[k]`` are expert k's uniforms (``base``'s shape)."""
    pruned, masks = [], []
    for e, u in zip(experts, uniforms, strict=True):
        tau = e - base
        if density >= 1:
            pruned.append(tau)
            masks.append(torch.ones_like(tau, dtype=torch.bool))
            continue
        t, keep = magprune(tau, magprune_keep_probabilities(tau, density, epsilon), u, rescale)
        pruned.append(t)
        masks.append(keep)
    combine = ties_combine if sign_election else sum_combine
    return combine(base, pruned, scaling, weights), masks


class Magprune(SeededDrop):
    """The transform piece: MAGPRUNE each τ_k (uniforms seeded per run seed, expert and
    tensor; ``mask_rng: mergekit``: mergekit's draws, see the module docstring); density 1
    keeps τ as it is. ``report()``: the masks' ``kept_fraction``."""

    what = "MAGPRUNE"

    def __init__(
        self,
        density: float = 0.7,
        epsilon: float = 0.07,
        rescale: str = "inverse_p",
        mask_rng: str = "mergelab",
        *,
        where: str = "method.transform",
    ) -> None:
        self.density = check_unit_interval(density, f"{where}.density", open_low=True)
        self.epsilon = check_finite(epsilon, f"{where}.epsilon")
        if self.epsilon < 0:
            raise ValueError(f"{where}.epsilon must be >= 0, got {epsilon!r}")
        if self.density < 1 and not (
            self.density - self.epsilon > 0 and self.density + self.epsilon <= 1
        ):
            raise ValueError(
                f"{where}.epsilon must keep density ± epsilon within (0, 1], got density "
                f"{self.density} and epsilon {self.epsilon} (keep-probabilities "
                f"{self.density - self.epsilon:g} to {self.density + self.epsilon:g})"
            )
        self.rescale = check_choice(rescale, f"{where}.rescale", DROP_RESCALES)
        super().__init__(mask_rng, self.density < 1, where=where)

    def mergekit_keep_probabilities(self, tau: Tensor) -> Tensor:
        return mergekit_keep_probabilities(tau.cpu(), self.density, self.epsilon)

    def rescaled(self, tau: Tensor, keep: Tensor, keep_prob: Tensor) -> Tensor:
        return magprune_rescale(tau, keep, keep_prob, self.rescale)

    def one(self, name: str, expert: str, tau: Tensor) -> tuple[Tensor, Tensor]:
        if self.density >= 1:
            return tau, torch.ones_like(tau, dtype=torch.bool)
        u = magprune_uniforms(tau.shape, mask_seed(self.seed, expert, name))
        probs = magprune_keep_probabilities(tau, self.density, self.epsilon)
        return magprune(tau, probs, u, self.rescale)


class DELLA(TaskVectorMerge):
    """Plugin for :func:`della_merge` (see the module docstring). Options: ``density`` d
    (mean keep-probability, (0, 1]), ``epsilon`` ε (half-width of the keep-probability
    window, d − ε > 0 and d + ε ≤ 1), ``scaling`` λ, ``weights`` (null, a list in pool
    order or a mapping by expert), ``sign_election`` (true: ``della``, TIES' election;
    false: ``della_linear``, a weighted sum), ``rescale`` (``inverse_p``, the paper's;
    ``l1``, mergekit 0.1.5's; ``none``), ``mask_rng`` (``mergelab``; ``mergekit``) and the
    combine's ``normalize`` (null: true with sign election, false without),
    ``weight_product``, ``sign_vote`` and ``zero_sign`` (module docstring)."""

    name = "della"

    def __init__(
        self,
        density: float = 0.7,
        epsilon: float = 0.07,
        scaling: float = 1.1,
        weights: Mapping[str, float] | Sequence[float] | None = None,
        sign_election: bool = True,
        rescale: str = "inverse_p",
        mask_rng: str = "mergelab",
        normalize: bool | None = None,
        weight_product: str = "fused",
        sign_vote: str = "unweighted",
        zero_sign: str = "zero",
    ) -> None:
        self.sign_election = check_bool(sign_election, "method.sign_election")
        transform = Magprune(density, epsilon, rescale, mask_rng, where="method")
        combine = election_combine(sign_election, normalize, weight_product, sign_vote, zero_sign)
        super().__init__(transform, combine, Fixed(scaling, weights, where="method"))

    def report(self) -> dict[str, Any]:
        return {
            **self.coefficients.report(),
            "sign_election": self.sign_election,
            "rescale": self.transform.rescale,
            **self.transform.report(),
        }
