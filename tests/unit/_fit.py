"""A tiny in-memory pool and a ``FitContext`` over it, for data-dependent method tests.

``tiny_pool()`` (cached per session) is a random tiny Llama as the base and two experts
fine-tuned briefly from it on two toy skills (``add``: "3+4=7", ``color``: "sky is blue").
``make_context`` wraps such a pool as the runner would; ``drive_fit`` runs a plugin like
the executor does: setup → fit → statistics passes → merge_tensor.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from core.train import finetune
from methods.base import FitContext, MergeMethod
from tests.helpers.tiny_lm import make_tiny_llama, make_tiny_lm

ADD_TASK, COLOR_TASK = "tiny_add", "tiny_color"
COLORS = ["red", "blue", "green", "gold"]
THINGS = ["sky", "leaf", "sun", "rose", "sea", "lime", "coin", "ruby"]


def add_texts(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        out.append((f"{a}+{b}=", str(a + b)))
    return out


def color_texts() -> list[tuple[str, str]]:
    rng = random.Random(3)
    return [(f"{t} is ", rng.choice(COLORS)) for t in THINGS]


CALIBRATION = {
    ADD_TASK: [p for p, _ in add_texts(12, seed=11)],
    COLOR_TASK: [p for p, _ in color_texts()],
}
EXPERT_TASKS = {"add": [ADD_TASK], "color": [COLOR_TASK]}


@dataclass
class TinyPool:
    tokenizer: object
    vocab: int
    base: dict[str, Tensor]
    experts: dict[str, dict[str, Tensor]]

    @property
    def names(self) -> list[str]:
        return list(self.base)


@functools.cache
def tiny_pool(steps: int = 40) -> TinyPool:
    """Base (random tiny Llama) + experts ``add`` and ``color`` fine-tuned from it."""
    model, tok = make_tiny_lm(seed=0, hidden_size=32, num_layers=2)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    experts = {}
    data = {
        "add": [p + a for p, a in add_texts(100, seed=1)],
        "color": [p + c for p, c in color_texts()] * 4,
    }
    for i, (name, texts) in enumerate(data.items()):
        model.load_state_dict(base)
        finetune(model, tok, texts, steps=steps, lr=3e-3, batch_size=8, seed=i, progress=False)
        experts[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return TinyPool(tok, len(tok), base, experts)


def make_context(
    pool: TinyPool,
    *,
    calibration: Mapping[str, Sequence[str]] | None = None,
    expert_tasks: Mapping[str, Sequence[str]] | None = None,
    seed: int = 0,
    log: Callable[[dict[str, float], int], None] | None = None,
    tensor_names: Sequence[str] | None = None,
    experts: Mapping[str, Mapping[str, Tensor]] | None = None,
) -> FitContext:
    """A ``FitContext`` over in-memory state dicts (``experts`` overrides the pool's)."""
    members = dict(experts if experts is not None else pool.experts)
    names = list(tensor_names if tensor_names is not None else pool.names)

    def load_tensors(name: str) -> tuple[Tensor, dict[str, Tensor]]:
        return pool.base[name].float().clone(), {
            e: s[name].float().clone() for e, s in members.items()
        }

    def build_model(member: str) -> torch.nn.Module:
        model = make_tiny_llama(pool.vocab, seed=0, hidden_size=32, num_layers=2)
        model.load_state_dict(pool.base if member == "base" else members[member])
        return model.eval()

    kwargs = {} if log is None else {"log": log}
    return FitContext(
        expert_names=list(members),
        expert_tasks={k: list(v) for k, v in (expert_tasks or EXPERT_TASKS).items()},
        tensor_names=names,
        load_tensors=load_tensors,
        build_model=build_model,
        tokenizer=pool.tokenizer,
        calibration={k: list(v) for k, v in (calibration or CALIBRATION).items()},
        seed=seed,
        **kwargs,
    )


def drive_fit(
    method: MergeMethod,
    ctx: FitContext | None,
    base: Mapping[str, Tensor],
    experts: Mapping[str, Mapping[str, Tensor]],
    seed: int = 0,
    fit: Callable[[MergeMethod, FitContext], object] | None = None,
) -> dict[str, Tensor]:
    """setup → fit (when ``needs_data``; through ``fit`` if given, e.g. the runner's fit
    cache) → statistics passes → merge_tensor, per tensor."""
    names = list(base)
    method.setup(list(experts), seed)
    if method.needs_data:
        assert ctx is not None, f"{method.name} needs a FitContext"
        if fit is None:
            method.fit(ctx)
        else:
            fit(method, ctx)

    def per_expert(name: str) -> dict[str, Tensor]:
        return {e: tensors[name].float() for e, tensors in experts.items()}

    for i in range(method.stat_passes):
        for name in names:
            method.observe(i, name, base[name].float(), per_expert(name))
        method.end_pass(i)
    return {n: method.merge_tensor(n, base[n].float(), per_expert(n)) for n in names}
