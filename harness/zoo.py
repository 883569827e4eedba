"""The built-in model zoo: a tokenizer, a base LLaMA and one expert per suite category.

Recipe (``RECIPES``; see ../shared/specs/zoo.md for why): a byte-level BPE tokenizer
trained on the suite; a base pretrained on the general corpus with a light share of
every category (so it knows each format but has little skill); then per category one
fully fine-tuned expert and one PEFT LoRA expert, both started from the base, trained on
mostly their own category plus some of the pretraining mix at a small learning rate, so
task vectors stay small and nearly orthogonal. Everything is seeded; the directory name
carries a hash of the recipe and the suite version, so a changed recipe builds anew and
an unchanged one is reused. Built into ``<cache>/zoo/<size>-seed<seed>-<hash>/``:
``tokenizer/``, ``base/``, ``experts/<category>/``, ``lora/<category>/`` and
``manifest.json`` (parameter counts, seeds, losses, build time, task-vector geometry and
every model's scores).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from evals.suite.build import (
    SUITE_VERSION,
    TASKS,
    build_suite,
    default_suite_dir,
    general_texts,
    training_texts,
)
from harness.train import finetune, finetune_lora

ZOO_CODE_VERSION = "1"  # bump when the build procedure changes in a way the recipe misses
CATEGORIES = tuple(TASKS)


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the zoo's weights."""

    vocab_size: int = 2048
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 384
    max_length: int = 64
    pretrain_steps: int = 800
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 64
    category_share: float = 0.03  # of each category in pretraining (rest: general text)
    expert_steps: int = 400
    expert_lr: float = 5e-4
    expert_batch: int = 32
    own_share: float = 0.8  # expert data: own category; the rest is the pretraining mix
    lora_r: int = 8
    lora_alpha: int = 16
    lora_steps: int = 300
    lora_lr: float = 2e-3
    eval_limit: int | None = None


RECIPES: dict[str, Recipe] = {
    "xs": Recipe(),
    "s": Recipe(
        vocab_size=4096,
        hidden=512,
        layers=8,
        heads=8,
        kv_heads=8,
        intermediate=1408,
        max_length=96,
        pretrain_steps=6000,
        pretrain_lr=1e-3,
        pretrain_batch=64,
        expert_steps=1500,
        expert_lr=1e-4,
        expert_batch=64,
        lora_r=16,
        lora_alpha=32,
        lora_steps=1500,
        lora_lr=1e-3,
    ),
}


def cache_root() -> Path:
    return Path(os.environ.get("MERGELAB_CACHE", Path.home() / ".cache" / "mergelab"))


def zoo_dir(size: str = "xs", seed: int = 0, recipe: Recipe | None = None) -> Path:
    """Where the zoo of this size, seed and recipe lives (built or not)."""
    recipe = recipe or _recipe(size)
    key = json.dumps([asdict(recipe), SUITE_VERSION, ZOO_CODE_VERSION, seed], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return cache_root() / "zoo" / f"{size}-seed{seed}-{digest}"


def _recipe(size: str) -> Recipe:
    if size not in RECIPES:
        raise ValueError(f"zoo size {size!r} is unknown; use one of {sorted(RECIPES)}")
    return RECIPES[size]


def build_zoo(
    size: str = "xs",
    seed: int = 0,
    *,
    device: str = "cpu",
    progress: bool = True,
    recipe: Recipe | None = None,
) -> Path:
    """Build (or reuse) the zoo and return its directory."""
    recipe = recipe or _recipe(size)
    out = zoo_dir(size, seed, recipe)
    if (out / "manifest.json").is_file():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    suite = build_suite(default_suite_dir(seed), seed=seed)
    texts = {c: [_eol(t) for t in training_texts(suite, c)] for c in CATEGORIES}
    general = [_eol(t) for t in general_texts(suite)]
    tokenizer = train_tokenizer(general + sum(texts.values(), []), recipe, tmp / "tokenizer")
    manifest: dict[str, Any] = {
        "size": size,
        "seed": seed,
        "recipe": asdict(recipe),
        "suite_version": SUITE_VERSION,
        "suite_dir": str(suite),
        "zoo_code_version": ZOO_CODE_VERSION,
        "models": {},
    }

    model = _new_model(recipe, len(tokenizer), seed)
    mix = _pretrain_mix(general, texts, recipe, seed)
    stats = finetune(
        model,
        tokenizer,
        mix,
        steps=recipe.pretrain_steps,
        lr=recipe.pretrain_lr,
        batch_size=recipe.pretrain_batch,
        max_length=recipe.max_length,
        seed=seed,
        device=device,
        progress=progress,
        desc="zoo: pretrain base",
    )
    _save(model, tokenizer, tmp / "base")
    manifest["models"]["base"] = _entry(model, stats, seed)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    for i, cat in enumerate(CATEGORIES):
        data = _expert_mix(texts[cat], mix, recipe, seed + 1 + i)
        model.load_state_dict(base_state)
        stats = finetune(
            model,
            tokenizer,
            data,
            steps=recipe.expert_steps,
            lr=recipe.expert_lr,
            batch_size=recipe.expert_batch,
            max_length=recipe.max_length,
            seed=seed + 1 + i,
            device=device,
            progress=progress,
            desc=f"zoo: expert {cat}",
        )
        _save(model, tokenizer, tmp / "experts" / cat)
        manifest["models"][cat] = _entry(model, stats, seed + 1 + i)

        model.load_state_dict(base_state)
        lora, stats = finetune_lora(
            model,
            tokenizer,
            data,
            r=recipe.lora_r,
            alpha=recipe.lora_alpha,
            steps=recipe.lora_steps,
            lr=recipe.lora_lr,
            batch_size=recipe.expert_batch,
            max_length=recipe.max_length,
            seed=seed + 11 + i,
            device=device,
            progress=progress,
            desc=f"zoo: lora {cat}",
        )
        lora.save_pretrained(tmp / "lora" / cat)
        manifest["models"][f"lora_{cat}"] = _entry(lora, stats, seed + 11 + i, trainable=True)
        model = lora.unload()  # peft wraps in place: take the plain base model back
        model.requires_grad_(True)  # get_peft_model froze the base weights

    manifest["build_seconds"] = round(time.perf_counter() - start, 1)
    manifest["geometry"] = task_vector_geometry(tmp)
    manifest["scores"] = score_zoo(tmp, suite, recipe, device=device)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def _eol(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def train_tokenizer(texts: list[str], recipe: Recipe, out: Path):
    """A byte-level BPE tokenizer trained on ``texts`` (numbers split into single digits,
    as LLaMA's tokenizer does, so arithmetic is learnable), saved to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [  # digits one by one, as LLaMA's tokenizer
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(texts, trainer)
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=recipe.max_length * 8,
    )
    tok.save_pretrained(out)
    return tok


def _new_model(recipe: Recipe, vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=recipe.hidden,
        intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.kv_heads,
        max_position_embeddings=recipe.max_length * 8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def _pretrain_mix(
    general: list[str], texts: dict[str, list[str]], recipe: Recipe, seed: int
) -> list[str]:
    """General text plus ``category_share`` of each category (a light taste of formats)."""
    rng = random.Random(seed)
    n_cat = int(len(general) * recipe.category_share / (1 - recipe.category_share * len(texts)))
    mix = list(general)
    for cat_texts in texts.values():
        mix += rng.sample(cat_texts, min(n_cat, len(cat_texts)))
    rng.shuffle(mix)
    return mix


def _expert_mix(own: list[str], mix: list[str], recipe: Recipe, seed: int) -> list[str]:
    rng = random.Random(seed)
    n_mix = int(len(own) * (1 - recipe.own_share) / recipe.own_share)
    return own + rng.sample(mix, min(n_mix, len(mix)))


def _save(model, tokenizer, out: Path) -> None:
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _entry(model, stats, seed: int, trainable: bool = False) -> dict[str, Any]:
    params = model.parameters()
    n = sum(p.numel() for p in params if p.requires_grad or not trainable)
    tail = stats.losses[-20:]
    return {
        "parameters": n,
        "seed": seed,
        "steps": stats.steps,
        "tokens": stats.tokens,
        "seconds": round(stats.seconds, 1),
        "loss_first": round(stats.losses[0], 4),
        "loss_last20": round(sum(tail) / len(tail), 4),
    }


def task_vector_geometry(root: Path) -> dict[str, Any]:
    """Pairwise cosine of the full experts' task vectors and ‖τk‖/‖θ0‖."""
    from safetensors.torch import load_file

    base = load_file(root / "base" / "model.safetensors")
    flat0 = torch.cat([v.flatten().double() for v in base.values()])
    taus = {}
    for cat in CATEGORIES:
        exp = load_file(root / "experts" / cat / "model.safetensors")
        taus[cat] = torch.cat([(exp[k].double() - base[k].double()).flatten() for k in base])
    cos = {
        f"{a}|{b}": round(float(torch.nn.functional.cosine_similarity(taus[a], taus[b], dim=0)), 4)
        for i, a in enumerate(CATEGORIES)
        for b in CATEGORIES[i + 1 :]
    }
    rel = {c: round(float(t.norm() / flat0.norm()), 4) for c, t in taus.items()}
    return {"cosine": cos, "relative_norm": rel}


def score_zoo(
    root: Path, suite: Path, recipe: Recipe, *, device: str = "cpu", ta_scaling: float = 0.3
) -> dict[str, Any]:
    """Every zoo model's primary score on every suite task, and a task-arithmetic merge's.

    ``normalised`` divides the TA merge's score on a category's tasks by that category's
    expert's score, the shape a mergeable zoo should show (spec: ~70-100% on real LLMs).
    """
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evals.lm_eval import evaluate, validate_tasks
    from methods.task_arithmetic import task_arithmetic

    tasks = [t for ts in TASKS.values() for t in ts]
    include = str(suite / "tasks")
    manager = validate_tasks(tasks, include)
    tok = AutoTokenizer.from_pretrained(root / "tokenizer")

    def score(model) -> dict[str, float]:
        res = evaluate(
            model.to(device).eval(),
            tok,
            tasks,
            task_manager=manager,
            batch_size=32,
            limit=recipe.eval_limit,
            log_samples=False,
        )
        return {t: round(res.primary(t)[1], 4) for t in tasks}

    def load(path: Path):
        return AutoModelForCausalLM.from_pretrained(path)

    out: dict[str, Any] = {"base": score(load(root / "base"))}
    for cat in CATEGORIES:
        out[cat] = score(load(root / "experts" / cat))
        out[f"lora_{cat}"] = score(
            PeftModel.from_pretrained(load(root / "base"), root / "lora" / cat)
        )
    model = load(root / "base")
    base = load_file(root / "base" / "model.safetensors")
    experts = [load_file(root / "experts" / c / "model.safetensors") for c in CATEGORIES]
    model.load_state_dict(
        {
            k: task_arithmetic(v, [e[k] for e in experts], scaling=ta_scaling)
            for k, v in base.items()
        }
    )
    out[f"task_arithmetic_{ta_scaling}"] = ta = score(model)
    out["normalised"] = {
        t: round(ta[t] / out[cat][t], 4) if out[cat][t] else None
        for cat, ts in TASKS.items()
        for t in ts
    }
    return out


def with_overrides(size: str, **kw: Any) -> Recipe:
    """The named recipe with some fields changed (for experiments and tests)."""
    return replace(_recipe(size), **kw)
