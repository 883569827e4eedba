"""Training texts for fine-tuning and training methods, from one spec format.

A spec is a mapping with exactly one source key:

- ``{suite: <category>}``: the built-in suite's train split of that category (prompt +
  target, one text per item) or ``general`` for the pretraining corpus; ``seed`` picks
  the suite (default 0, the zoo's).
- ``{jsonl: <path>, field: text}``: a local JSON-lines file.
- ``{hf: <hub id or local dataset dir>, split: train, field: text, name: null}``: a
  ``datasets`` dataset (hub ids need the network or the HF cache).

Optional for all: ``n`` (keep the first n texts after a seeded shuffle with ``shuffle_seed``).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_SOURCES = ("suite", "jsonl", "hf")


def load_texts(spec: Mapping[str, Any]) -> list[str]:
    """The texts a spec names; errors name the spec and the fix."""
    spec = dict(spec)
    given = [k for k in _SOURCES if k in spec]
    if len(given) != 1:
        raise ValueError(f"data spec {spec} needs exactly one source key of {list(_SOURCES)}")
    if "suite" in spec:
        texts = _suite(str(spec["suite"]), int(spec.get("seed", 0)))
    elif "jsonl" in spec:
        path = Path(spec["jsonl"]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data spec names {path}, which does not exist")
        field = spec.get("field", "text")
        texts = [json.loads(line)[field] for line in path.read_text().splitlines() if line.strip()]
    else:
        import datasets

        ds = datasets.load_dataset(spec["hf"], spec.get("name"), split=spec.get("split", "train"))
        field = spec.get("field", "text")
        if field not in ds.column_names:
            raise ValueError(f"dataset {spec['hf']} has no column {field!r}: {ds.column_names}")
        texts = list(ds[field])
    if not texts:
        raise ValueError(f"data spec {spec} gave no texts")
    if spec.get("n") is not None:
        rng = random.Random(int(spec.get("shuffle_seed", 0)))
        texts = rng.sample(texts, min(int(spec["n"]), len(texts)))
    return texts


def _suite(category: str, seed: int) -> list[str]:
    from evals.suite.build import TASKS, build_suite, default_suite_dir, general_texts
    from evals.suite.build import training_texts as suite_texts

    suite = build_suite(default_suite_dir(seed), seed=seed)
    if category == "general":
        return general_texts(suite)
    if category not in TASKS:
        raise ValueError(
            f"suite category {category!r} is unknown; use 'general' or one of {list(TASKS)}"
        )
    return suite_texts(suite, category)
