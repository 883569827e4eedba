"""core/train.py: the fine-tuning loop (backward compatible), schedules, shuffled
epochs, resumable checkpoints, LoRA training, logging and the recipe-keyed cache."""

from __future__ import annotations

import json

import pytest
import torch

from core.checkpoint import read_checkpoint
from core.train import (
    CHECKPOINT_FILE,
    BatchSampler,
    TrainStats,
    cached_path,
    cached_training,
    finetune,
    finetune_lora,
    is_cached,
    lr_lambda,
    read_stats,
    recipe_key,
    steps_for,
)
from tests.helpers.tiny_lm import make_tiny_lm

TEXTS = [f"{a}+{b}={a + b}" for a in range(6) for b in range(6)]
FAST = {"lr": 3e-3, "batch_size": 4, "max_length": 16, "progress": False}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny():
    return make_tiny_lm(seed=0, hidden_size=16, num_layers=1)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def reference_finetune(model, tokenizer, texts, *, steps, lr, batch_size, max_length, seed):
    """The loop as it was before this extension (pins backward compatibility)."""
    model.train()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, int(0.03 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(texts), (batch_size,), generator=gen).tolist()
        batch = tokenizer(
            [texts[i] for i in idx],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
        )
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        out = model(**batch, labels=labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.loss.detach()))
    model.eval()
    return losses


def test_defaults_reproduce_the_original_loop():
    (m1, tok), (m2, _) = tiny(), tiny()
    stats = finetune(m1, tok, TEXTS, steps=6, seed=3, **FAST)
    losses = reference_finetune(
        m2, tok, TEXTS, steps=6, lr=3e-3, batch_size=4, max_length=16, seed=3
    )
    assert same(state(m1), state(m2)) and stats.losses == losses
    assert stats.steps == 6 and stats.examples == 24 and stats.tokens > 0 and stats.seconds > 0
    assert stats.resumed_from == 0 and not m1.training


def test_lr_schedules_by_hand():
    const, lin = lr_lambda(100, 0.1, "constant"), lr_lambda(100, 0.1, "linear")
    assert [const(s) for s in (0, 4, 9, 10, 99)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    assert [lin(s) for s in (0, 9, 10, 55, 99)] == [0.1, 1.0, 1.0, 0.5, 1 / 90]
    assert lr_lambda(10, 0.0, "linear")(0) == 1.0  # warm-up of at least one step
    with pytest.raises(ValueError, match="schedule"):
        lr_lambda(10, 0.1, "cosine")
    assert steps_for(2, 100, 64) == 4 and steps_for(2.0, 5832, 64) == 183


def test_shuffled_epochs_visit_every_example_once():
    s = BatchSampler(10, 4, seed=0, shuffle=True)
    drawn = [i for _ in range(5) for i in s.next()]  # 20 = two epochs
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:]) == list(range(10))
    s2 = BatchSampler(10, 4, seed=0, shuffle=True)
    s2.next()
    snap = s2.state()
    rest = [s2.next() for _ in range(4)]
    s3 = BatchSampler(10, 4, seed=99, shuffle=True)
    s3.load(snap)
    assert [s3.next() for _ in range(4)] == rest


def test_log_callback_gets_the_loss_curve():
    model, tok = tiny()
    seen = []
    stats = finetune(
        model, tok, TEXTS, steps=5, log=lambda m, s: seen.append((s, m)), log_every=2, **FAST
    )
    assert [s for s, _ in seen] == [2, 4, 5]
    assert [m["loss"] for _, m in seen] == [stats.losses[1], stats.losses[3], stats.losses[4]]
    assert all({"loss", "lr", "tokens"} <= set(m) for _, m in seen)


class Interrupt(Exception):
    pass


def interrupt_at(step):
    def log(metrics, s):
        if s == step:
            raise Interrupt

    return log


@pytest.mark.parametrize("shuffle,schedule", [(False, "constant"), (True, "linear")])
def test_resume_after_interruption_is_bit_identical(tmp_path, shuffle, schedule, monkeypatch):
    kw = dict(steps=7, seed=1, shuffle=shuffle, schedule=schedule, **FAST)
    ref, tok = tiny()
    full = finetune(ref, tok, TEXTS, **kw)

    # the interrupt propagates (log errors are normally only warned about)
    monkeypatch.setattr("core.train._safe_log", lambda log, m, s: log(m, s))
    model, _ = tiny()
    with pytest.raises(Interrupt):
        finetune(
            model,
            tok,
            TEXTS,
            checkpoint_dir=tmp_path,
            checkpoint_every=3,
            log=interrupt_at(5),
            **kw,
        )
    # the new format: a JSON record and its safetensors, no pickle
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".safetensors"}
    assert read_checkpoint(tmp_path / CHECKPOINT_FILE)["step"] == 3
    model, _ = tiny()  # a fresh process starts from the initial weights again
    resumed = finetune(model, tok, TEXTS, checkpoint_dir=tmp_path, checkpoint_every=3, **kw)
    assert resumed.resumed_from == 3
    assert same(state(model), state(ref))
    assert resumed.losses == full.losses and resumed.tokens == full.tokens


def test_checkpoint_of_another_run_is_refused(tmp_path):
    model, tok = tiny()
    finetune(model, tok, TEXTS, steps=2, checkpoint_dir=tmp_path, checkpoint_every=1, **FAST)
    model, _ = tiny()
    with pytest.raises(ValueError, match="another training run"):
        finetune(model, tok, TEXTS, steps=3, checkpoint_dir=tmp_path, checkpoint_every=1, **FAST)


def test_log_failures_only_warn():
    model, tok = tiny()

    def boom(metrics, step):
        raise RuntimeError("tracker down")

    with pytest.warns(UserWarning, match="tracker down"):
        stats = finetune(model, tok, TEXTS, steps=2, log=boom, **FAST)
    assert stats.steps == 2


def test_lora_trains_only_the_target_modules(tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    model, tok = tiny()
    before = state(model)
    lora, stats = finetune_lora(
        model, tok, TEXTS, target_modules=["q_proj", "v_proj"], r=2, alpha=4, steps=4, **FAST
    )
    assert isinstance(lora, PeftModel) and stats.steps == 4
    adapter = get_peft_model_state_dict(lora)
    assert adapter and all(("q_proj" in k or "v_proj" in k) and "lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # it trained
    lora.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    merged = {k: v.detach() for k, v in lora.merge_and_unload().state_dict().items()}
    changed = {k for k in before if not torch.equal(before[k], merged[k])}
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)


def test_lora_resume_is_bit_identical(tmp_path, monkeypatch):
    kw = dict(target_modules=["q_proj"], r=2, steps=5, seed=2, **FAST)
    ref, tok = tiny()
    ref_lora, _ = finetune_lora(ref, tok, TEXTS, **kw)
    monkeypatch.setattr("core.train._safe_log", lambda log, m, s: log(m, s))
    model, _ = tiny()
    with pytest.raises(Interrupt):
        finetune_lora(
            model,
            tok,
            TEXTS,
            checkpoint_dir=tmp_path,
            checkpoint_every=2,
            log=interrupt_at(3),
            **kw,
        )
    ckpt = read_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert ckpt["model"] and all("lora_" in k for k in ckpt["model"])  # the adapter, not the base
    model, _ = tiny()
    lora, _ = finetune_lora(model, tok, TEXTS, checkpoint_dir=tmp_path, checkpoint_every=2, **kw)
    assert same(state(lora), state(ref_lora))


def _train_fn(calls, steps=6, fail_at=None):
    def train(out_dir, checkpoint_dir):
        calls.append(out_dir)
        model, tok = tiny()
        log = interrupt_at(fail_at) if fail_at else None
        stats = finetune(
            model,
            tok,
            TEXTS,
            steps=steps,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=2,
            log=log,
            **FAST,
        )
        model.save_pretrained(out_dir)
        return stats

    return train


def test_cached_training_trains_once_and_records_cost(tmp_path):
    recipe = {"data": "sums", "steps": 6, "lr": 3e-3}
    calls: list = []
    path = cached_training(tmp_path, recipe, _train_fn(calls))
    assert path == cached_path(tmp_path, recipe) == tmp_path / recipe_key(recipe)
    assert len(recipe_key(recipe)) == 12 and is_cached(tmp_path, recipe)
    assert json.loads((path / "recipe.json").read_text()) == recipe
    stats = read_stats(path)
    assert stats["steps"] == 6 and stats["examples"] == 24 and stats["tokens"] > 0
    assert stats["seconds"] > 0 and len(stats["losses"]) == 6
    assert (path / "model.safetensors").is_file() and not (path / "checkpoints").exists()
    assert not path.with_name(path.name + ".partial").exists()
    again = cached_training(tmp_path, dict(reversed(recipe.items())), _train_fn(calls))
    assert again == path and len(calls) == 1  # key order does not matter; no retraining
    other = cached_training(tmp_path, {**recipe, "lr": 1e-3}, _train_fn(calls))
    assert other != path and len(calls) == 2


def test_cached_training_resumes_an_interrupted_run(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setattr("core.train._safe_log", lambda log, m, s: log(m, s))
    recipe = {"data": "sums", "steps": 6}
    calls: list = []
    with pytest.raises(Interrupt):
        cached_training(tmp_path / "a", recipe, _train_fn(calls, fail_at=5))
    partial = cached_path(tmp_path / "a", recipe).with_name(recipe_key(recipe) + ".partial")
    assert (partial / "checkpoints" / CHECKPOINT_FILE).is_file()
    assert not is_cached(tmp_path / "a", recipe)
    resumed = cached_training(tmp_path / "a", recipe, _train_fn(calls))
    assert read_stats(resumed)["resumed_from"] == 4
    clean = cached_training(tmp_path / "b", recipe, _train_fn(calls))
    a, b = load_file(resumed / "model.safetensors"), load_file(clean / "model.safetensors")
    assert same(a, b)
    assert read_stats(resumed)["losses"] == read_stats(clean)["losses"]


def test_trainstats_is_backward_compatible():
    s = TrainStats(steps=1, tokens=2, seconds=0.5)
    assert s.losses == [] and s.to_dict()["examples"] == 0
