"""Causal-LM fine-tuning shared by the zoo builder, test pools and training methods.

A deliberately small loop (AdamW, linear warm-up then constant or linear decay, fixed
seed, CPU or GPU): deterministic for a given seed and data, with a tqdm bar and the loss
curve returned.

- :func:`finetune` trains a model in place (full fine-tuning, or whatever parameters are
  trainable, e.g. a PEFT model's adapter). Optional: ``log(metrics, step)`` for loss
  curves (the runner passes ``FitContext.log`` → W&B), and ``checkpoint_dir`` +
  ``checkpoint_every``: the trainable weights, optimizer, scheduler, step, losses and every
  RNG state (the batch sampler's and torch's) are saved atomically as safetensors plus a
  JSON record (:mod:`core.checkpoint`: never unpickled; a legacy ``checkpoint.pt`` is
  refused), and a later call with the same directory resumes from it, ending
  bit-identical to an uninterrupted run.
- :func:`finetune_lora` wraps the model in a PEFT LoRA adapter (``target_modules``
  configurable), trains only the adapter and returns the ``PeftModel``
  (``save_pretrained`` writes the adapter alone).
- :func:`cached_training` keeps a trained model at ``cache_dir/<sha256(recipe)[:12]>/``
  with ``recipe.json`` and ``stats.json`` (the training cost), built in a ``.partial``
  directory that also holds the checkpoints (a rerun resumes) and renamed when complete,
  so a sweep over merge options trains once.

Cost (``TrainStats``): optimizer steps, non-padding tokens seen, examples seen
(steps × batch size) and wall seconds of training (summed over resumed sessions).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from core.checkpoint import read_checkpoint, write_checkpoint

CHECKPOINT_FILE = "checkpoint.json"  # the record; see core.checkpoint
SCHEDULES = ("constant", "linear")
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainStats:
    """What a training run cost and how its loss went."""

    steps: int
    tokens: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    examples: int = 0  # steps × batch size
    resumed_from: int = 0  # step the last session started at (0: from scratch)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def steps_for(epochs: float, n_examples: int, batch_size: int) -> int:
    """Optimizer steps for ``epochs`` passes over ``n_examples``: ceil(epochs·n / batch)."""
    return max(1, math.ceil(epochs * n_examples / batch_size))


def lr_lambda(steps: int, warmup: float, schedule: str = "constant") -> Callable[[int], float]:
    """LR multiplier per step: linear warm-up over ``max(1, int(warmup·steps))`` steps, then
    constant (``constant``) or linear decay towards 0 at ``steps`` (``linear``, the
    Hugging Face / open-instruct schedule)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    warm = max(1, int(warmup * steps))
    if schedule == "constant":
        return lambda s: min(1.0, (s + 1) / warm)
    return lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm))


class BatchSampler:
    """Indices of each batch from a seeded generator: with replacement (``shuffle=False``,
    the original behaviour) or in shuffled passes over the data (``shuffle=True``: every
    example once per epoch; a batch may straddle two epochs). ``state()`` / ``load()``
    capture everything needed to continue the exact sequence."""

    def __init__(self, n: int, batch_size: int, seed: int, shuffle: bool = False):
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = torch.empty(0, dtype=torch.long)
        self.pos = 0

    def next(self) -> list[int]:
        if not self.shuffle:
            return torch.randint(self.n, (self.batch_size,), generator=self.gen).tolist()
        out: list[int] = []
        while len(out) < self.batch_size:
            if self.pos >= len(self.perm):
                self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
            take = self.perm[self.pos : self.pos + self.batch_size - len(out)]
            out += take.tolist()
            self.pos += len(take)
        return out

    def state(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "perm": self.perm.clone(), "pos": self.pos}

    def load(self, state: Mapping[str, Any]) -> None:
        self.gen.set_state(state["gen"])
        self.perm, self.pos = state["perm"].clone(), int(state["pos"])


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
    schedule: str = "constant",
    shuffle: bool = False,
    log: Callable[[dict[str, float], int], None] | None = None,
    log_every: int = 1,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    pack: bool = False,
) -> TrainStats:
    """Train ``model``'s trainable parameters in place on ``texts`` for ``steps`` steps.

    Loss is next-token cross-entropy over non-padding tokens. Batches are drawn from a
    generator seeded with ``seed`` (with replacement, or shuffled epochs with
    ``shuffle=True``), so the same inputs give the same weights. ``log(metrics, step)``
    gets ``loss``, ``lr`` and ``tokens`` every ``log_every`` steps (``step`` counts
    finished steps, from 1). With ``checkpoint_dir`` and ``checkpoint_every > 0`` the full
    training state is saved every ``checkpoint_every`` steps, and an existing checkpoint
    there is resumed from (it must come from the same run: steps, data size, batch size,
    lr, seed and schedule are checked). With ``pack=True`` the texts (each tokenised with the
    tokenizer's special tokens and ended with its eos token) are concatenated into one
    stream cut into ``max_length``-token blocks, and batches draw blocks instead of
    texts: no padding, so every position of a batch is a training token (pretraining
    style; a block may start inside a text).
    """
    if not texts:
        raise ValueError("finetune got no training texts")
    if steps < 0 or batch_size < 1:
        raise ValueError(
            f"finetune needs steps >= 0 and batch_size >= 1, got {steps}, {batch_size}"
        )
    model.to(device).train()
    blocks = _packed_blocks(tokenizer, texts, max_length) if pack else None
    n_items = len(texts) if blocks is None else len(blocks)
    sampler = BatchSampler(n_items, batch_size, seed, shuffle)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, warmup, schedule))
    meta = {
        "steps": steps,
        "n_texts": len(texts),
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "seed": seed,
        "schedule": schedule,
        "shuffle": shuffle,
        **({"pack": max_length} if pack else {}),
    }
    ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    losses: list[float] = []
    tokens = 0
    start_step, prior_seconds = 0, 0.0
    state = _load_checkpoint(ckpt, model, opt, sched, sampler, meta, device) if ckpt else None
    if state is not None:
        start_step, losses, tokens = state["step"], list(state["losses"]), state["tokens"]
        prior_seconds = state["seconds"]
    start = time.perf_counter()
    quiet = {} if progress else {"disable": True}  # progress: tqdm's default (TQDM_DISABLE)
    bar = tqdm(
        range(start_step, steps), initial=start_step, total=steps, desc=desc, leave=False, **quiet
    )
    for step in bar:
        idx = sampler.next()
        if blocks is not None:
            ids = blocks[idx].to(device)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        else:
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
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        current_lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
        tokens += int(batch["attention_mask"].sum())
        done = step + 1
        if log is not None and (done % max(1, log_every) == 0 or done == steps):
            _safe_log(log, {"loss": losses[-1], "lr": current_lr, "tokens": tokens}, done)
        if ckpt is not None and checkpoint_every > 0 and done % checkpoint_every == 0:
            seconds = prior_seconds + time.perf_counter() - start
            _save_checkpoint(ckpt, model, opt, sched, sampler, meta, done, losses, tokens, seconds)
    model.eval()
    return TrainStats(
        steps=steps,
        tokens=tokens,
        seconds=prior_seconds + time.perf_counter() - start,
        losses=losses,
        examples=steps * batch_size,
        resumed_from=start_step,
    )


def _packed_blocks(tokenizer, texts: Sequence[str], max_length: int) -> torch.Tensor:
    """The texts as one token stream (each text + eos) cut into ``max_length`` blocks
    (the incomplete last block is padded with eos when it is the only one, else dropped)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("pack=True needs a tokenizer with an eos token between texts")
    stream: list[int] = []
    for ids in tokenizer(list(texts))["input_ids"]:
        stream += [*ids, eos]
    n = max(1, len(stream) // max_length)
    stream += [eos] * max(0, n * max_length - len(stream))
    return torch.tensor(stream[: n * max_length]).view(n, max_length)


def _safe_log(log: Callable[[dict[str, float], int], None], metrics: dict, step: int) -> None:
    try:
        log(metrics, step)
    except Exception as exc:  # a logging failure must never stop training
        warnings.warn(f"training log callback failed at step {step}: {exc!r}", stacklevel=3)


def _trainable_state(model: torch.nn.Module, names_only: bool = False):
    """Every tensor of the state dict when all parameters train (full fine-tuning), else
    only the trainable parameters (e.g. a LoRA adapter)."""
    named = dict(model.named_parameters())
    if all(p.requires_grad for p in named.values()):
        items = model.state_dict().items()
    else:
        items = ((k, p) for k, p in named.items() if p.requires_grad)
    if names_only:
        return {k for k, _ in items}
    return {k: v.detach().cpu().clone() for k, v in items}


def _save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    sampler: BatchSampler,
    meta: dict[str, Any],
    step: int,
    losses: list[float],
    tokens: int,
    seconds: float,
) -> None:
    state = {
        "meta": meta,
        "step": step,
        "model": _trainable_state(model),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "sampler": sampler.state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "losses": list(losses),
        "tokens": tokens,
        "seconds": seconds,
    }
    write_checkpoint(path, state)  # atomic: a reader sees the old checkpoint or the new one


def _load_checkpoint(
    path: Path,
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    sampler: BatchSampler,
    meta: dict[str, Any],
    device: str,
) -> dict[str, Any] | None:
    """Restore the training state saved at ``path`` into the live objects and return it
    (None when there is no checkpoint yet)."""
    state = read_checkpoint(path)
    if state is None:
        return None
    if state["meta"] != meta:
        raise ValueError(
            f"checkpoint {path} was written by another training run ({state['meta']} vs "
            f"{meta}); delete it to start over"
        )
    result = model.load_state_dict(state["model"], strict=False)
    if result.unexpected_keys or _trainable_state(model, names_only=True) - set(state["model"]):
        raise ValueError(f"checkpoint {path} does not match the model's trainable tensors")
    model.to(device)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    sampler.load(state["sampler"])
    torch.set_rng_state(state["torch_rng"])
    if state.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state


def finetune_lora(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    target_modules: Sequence[str] = DEFAULT_LORA_TARGETS,
    r: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
    seed: int = 0,
    **kwargs: Any,
):
    """Wrap ``model`` in a LoRA adapter on ``target_modules`` and train only the adapter.

    Returns ``(peft_model, stats)``; ``peft_model.save_pretrained(dir)`` writes the adapter
    alone. The adapter's initialisation is seeded with ``seed`` (the caller's global RNG is
    left untouched), so a resumed run rebuilds the same adapter before loading its
    checkpoint. ``kwargs`` go to :func:`finetune`. Note that PEFT wraps ``model`` in place
    (``peft_model.unload()`` gives the plain model back).
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    stats = finetune(peft_model, tokenizer, texts, seed=seed, **kwargs)
    return peft_model, stats


# --------------------------------------------------------------------------- cache


def recipe_key(recipe: Mapping[str, Any]) -> str:
    """sha256 of the recipe's canonical JSON, first 12 hex digits."""
    canonical = json.dumps(recipe, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def cached_path(cache_dir: str | os.PathLike, recipe: Mapping[str, Any]) -> Path:
    """Where :func:`cached_training` keeps the model of ``recipe`` (complete or not)."""
    return Path(cache_dir) / recipe_key(recipe)


def is_cached(cache_dir: str | os.PathLike, recipe: Mapping[str, Any]) -> bool:
    """True when the model of ``recipe`` is complete in ``cache_dir``."""
    return (cached_path(cache_dir, recipe) / "stats.json").is_file()


def cached_training(
    cache_dir: str | os.PathLike,
    recipe: Mapping[str, Any],
    train_fn: Callable[[Path, Path], TrainStats | Mapping[str, Any]],
) -> Path:
    """The directory of the model trained by ``recipe``, training it only if needed.

    ``recipe`` (JSON-serialisable) must hold everything that decides the weights; the
    model lives at ``cache_dir/<recipe_key(recipe)>/`` with ``recipe.json`` and
    ``stats.json``. When that is incomplete, ``train_fn(out_dir, checkpoint_dir)`` runs
    with ``out_dir = <key>.partial`` (save the model there) and ``checkpoint_dir =
    <key>.partial/checkpoints`` (pass it to :func:`finetune`; an interrupted run resumes
    from it), and returns its ``TrainStats`` (or a mapping). The checkpoints are then
    deleted, ``stats.json`` written and the directory renamed into place. A file lock
    keeps two processes from training the same recipe at once.
    """
    cache_dir = Path(cache_dir)
    out = cached_path(cache_dir, recipe)
    if (out / "stats.json").is_file():
        return out
    (cache_dir / ".locks").mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".locks" / f"{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "stats.json").is_file():  # another process finished it meanwhile
            return out
        partial = out.with_name(out.name + ".partial")
        partial.mkdir(parents=True, exist_ok=True)
        recipe_json = json.dumps(recipe, indent=2, sort_keys=True, default=str)
        (partial / "recipe.json").write_text(recipe_json)
        stats = train_fn(partial, partial / "checkpoints")
        stats = stats.to_dict() if isinstance(stats, TrainStats) else dict(stats)
        shutil.rmtree(partial / "checkpoints", ignore_errors=True)
        tmp = partial / "stats.json.tmp"
        tmp.write_text(json.dumps(stats, indent=2))
        os.replace(tmp, partial / "stats.json")
        shutil.rmtree(out, ignore_errors=True)  # never complete here (checked above)
        os.replace(partial, out)
    return out


def read_stats(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``stats.json`` of a :func:`cached_training` directory."""
    return json.loads((Path(model_dir) / "stats.json").read_text())
