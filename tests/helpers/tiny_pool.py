"""A tiny mergeable pool built inside the tests: a base briefly trained on a mix of two toy
skills, two fully fine-tuned experts (one per skill), a LoRA expert, and two local
multiple-choice lm-eval tasks that score the skills. All deterministic from fixed seeds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from core.train import finetune
from tests.helpers.tiny_lm import make_tiny_lm

COLORS = ["red", "blue", "green", "gold"]
THINGS = ["sky", "leaf", "sun", "rose", "sea", "lime", "coin", "ruby"]


def add_items(n: int, seed: int) -> list[tuple[str, str, list[str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        wrong = rng.sample([x for x in range(9) if x != a + b], 3)
        out.append((f"{a}+{b}=", str(a + b), [str(a + b)] + [str(w) for w in wrong]))
    return out


def color_items(seed: int) -> list[tuple[str, str, list[str]]]:
    rng = random.Random(seed)
    out = []
    for thing in THINGS:
        color = rng.choice(COLORS)
        out.append((f"{thing} is ", color, [color] + [c for c in COLORS if c != color]))
    return out


def write_tasks(root: Path) -> Path:
    """Two lm-eval MC tasks (tiny_add, tiny_color) over local jsonl; returns the YAML dir."""
    root.mkdir(parents=True, exist_ok=True)
    for task, items in (("tiny_add", add_items(20, seed=7)), ("tiny_color", color_items(3))):
        data = root / f"{task}.jsonl"
        with data.open("w") as f:
            for prompt, _answer, choices in items:
                f.write(json.dumps({"prompt": prompt, "choices": choices, "label": 0}) + "\n")
        spec = {
            "task": task,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            "output_type": "multiple_choice",
            "doc_to_text": "{{prompt}}",
            "doc_to_target": "{{label}}",
            "doc_to_choice": "{{choices}}",
            "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
        (root / f"{task}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return root


def build_pool(root: Path, steps: int = 150) -> dict[str, Path]:
    """Save base, two full experts and a LoRA expert under ``root``; return their dirs."""
    from peft import LoraConfig, get_peft_model

    add_text = [p + a for p, a, _ in add_items(200, seed=1)]
    color_text = [p + a for p, a, _ in color_items(3)] * 10
    model, tok = make_tiny_lm(seed=0, hidden_size=32, num_layers=2)
    finetune(
        model, tok, add_text[:50] + color_text[:20], steps=steps, lr=3e-3, seed=0, progress=False
    )
    dirs = {"base": root / "base"}
    model.save_pretrained(dirs["base"])
    tok.save_pretrained(dirs["base"])
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for name, texts in (("add", add_text), ("color", color_text)):
        model.load_state_dict(base_state)
        finetune(model, tok, texts, steps=steps, lr=1e-3, seed=1, progress=False)
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        tok.save_pretrained(dirs[name])
    model.load_state_dict(base_state)
    lora = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    dirs["lora_color"] = root / "lora_color"
    lora.save_pretrained(dirs["lora_color"])
    return dirs


def write_conf(conf_dir: Path, dirs: dict[str, Path], task_dir: Path) -> Path:
    """A user config dir (``--config-dir``) with ``model=tiny`` and ``task=tiny``."""
    (conf_dir / "model").mkdir(parents=True, exist_ok=True)
    (conf_dir / "task").mkdir(parents=True, exist_ok=True)
    model = {
        "name": "tiny",
        "base": {"path": str(dirs["base"])},
        "experts": {
            "add": {"path": str(dirs["add"]), "tasks": ["tiny_add"]},
            "color": {"path": str(dirs["color"]), "tasks": ["tiny_color"]},
        },
        "dtype": None,
        "exclude": [],
        "trust_remote_code": False,
    }
    task = {
        "tasks": ["tiny_add", "tiny_color"],
        "include_path": str(task_dir),
        "num_fewshot": None,
        "calibration": {"split": "test", "n": 8},
    }
    (conf_dir / "model" / "tiny.yaml").write_text(yaml.safe_dump(model, sort_keys=False))
    (conf_dir / "task" / "tiny.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return conf_dir


def main() -> None:
    """``python -m tests.helpers.tiny_pool DIR``: build the tiny pool and its conf dir."""
    import sys

    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny_pool").resolve()
    dirs = build_pool(root / "models")
    conf = write_conf(root / "conf", dirs, write_tasks(root / "tasks"))
    print(f"tiny pool in {root}; use: mergelab --config-dir {conf} model=tiny task=tiny")


if __name__ == "__main__":
    main()


def reshard(d: Path) -> None:
    """Re-save the checkpoint in ``d`` as two shards and an index (in place)."""
    from safetensors.torch import load_file, save_file

    state = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = list(state)
    halves = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for fname, keys in halves.items():
        save_file({k: state[k] for k in keys}, d / fname, metadata={"format": "pt"})
    index = {"weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
