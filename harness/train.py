"""Causal-LM fine-tuning shared by the zoo builder, test pools and training methods.

A deliberately small loop (AdamW, linear warm-up then constant, fixed seed, CPU or GPU):
deterministic for a given seed and data, with a tqdm bar and the loss curve returned.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm


@dataclass
class TrainStats:
    """What a training run cost and how its loss went."""

    steps: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)


def finetune(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    steps: int,
    lr: float = 1e-3,
    batch_size: int = 16,
    max_length: int = 64,
    warmup: float = 0.03,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
    desc: str = "train",
) -> TrainStats:
    """Train ``model`` in place on ``texts`` (sampled with replacement) for ``steps`` steps.

    Loss is next-token cross-entropy over non-padding tokens. Batches are drawn from a
    generator seeded with ``seed``, so the same inputs give the same weights.
    """
    if not texts:
        raise ValueError("finetune got no training texts")
    model.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, int(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    losses: list[float] = []
    tokens = 0
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        idx = torch.randint(len(texts), (batch_size,), generator=gen).tolist()
        batch = tokenizer(
            [texts[i] for i in idx],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        ).to(device)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out = model(**batch, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        tokens += int(batch["attention_mask"].sum())
    model.eval()
    return TrainStats(
        steps=steps, tokens=tokens, seconds=time.perf_counter() - start, losses=losses
    )
