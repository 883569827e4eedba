"""The built-in xs zoo: deterministic, cached by recipe, and a meaningful testbed.

Building xs takes a few CPU minutes once per cache (``MERGELAB_CACHE``); later runs reuse it.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from evals.suite.build import TASKS
from harness.zoo import CATEGORIES, build_zoo, with_overrides, zoo_dir

pytestmark = pytest.mark.e2e
MARGIN = 0.10  # an expert must beat the base on its own category (mean of its tasks) by 10 points


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((build_zoo("xs", 0) / "manifest.json").read_text())


def category_mean(scores: dict, model: str, cat: str) -> float:
    return sum(scores[model][t] for t in TASKS[cat]) / len(TASKS[cat])


def test_each_expert_beats_base_on_its_own_category(manifest):
    scores = manifest["scores"]
    for cat in TASKS:
        gain = category_mean(scores, cat, cat) - category_mean(scores, "base", cat)
        assert gain >= MARGIN, (cat, gain, scores)


def test_experts_do_not_win_other_categories(manifest):
    """Diagonal dominance: on each category its own expert beats every other expert."""
    scores = manifest["scores"]
    for cat, tasks in TASKS.items():
        own = sum(scores[cat][t] for t in tasks)
        for other in CATEGORIES:
            if other != cat:
                assert sum(scores[other][t] for t in tasks) < own, (cat, other, scores)


def test_task_arithmetic_keeps_a_substantial_share(manifest):
    norm = manifest["scores"]["normalised"]
    assert sum(norm.values()) / len(norm) >= 0.5, norm


def test_regime_numbers_are_recorded(manifest):
    geo = manifest["geometry"]
    assert set(geo["relative_norm"]) == set(CATEGORIES)
    assert all(0 < v < 1 for v in geo["relative_norm"].values())
    assert all(-1 <= v <= 1 for v in geo["cosine"].values())
    assert manifest["models"]["base"]["parameters"] > 1_000_000
    assert manifest["models"]["lora_math"]["parameters"] < manifest["models"]["math"]["parameters"]


def _weights_digest(root) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.safetensors")):
        h.update(f.relative_to(root).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def test_build_is_deterministic_and_cached_by_recipe(tmp_path, monkeypatch):
    tiny = with_overrides(
        "xs",
        vocab_size=300,
        hidden=32,
        layers=1,
        intermediate=64,
        pretrain_steps=4,
        pretrain_batch=8,
        expert_steps=2,
        expert_batch=8,
        lora_steps=2,
        eval_limit=2,
    )
    digests = []
    for cache in ("a", "b"):
        monkeypatch.setenv("MERGELAB_CACHE", str(tmp_path / cache))
        root = build_zoo("xs", 0, recipe=tiny, progress=False)
        digests.append(_weights_digest(root))
        mtime = (root / "manifest.json").stat().st_mtime_ns
        assert build_zoo("xs", 0, recipe=tiny, progress=False) == root  # reused, not rebuilt
        assert (root / "manifest.json").stat().st_mtime_ns == mtime
    assert digests[0] == digests[1]
    assert zoo_dir("xs", 0, with_overrides("xs", expert_steps=3)) != zoo_dir("xs", 0)
    assert zoo_dir("xs", 1) != zoo_dir("xs", 0)


def test_mergelab_without_arguments_scores_the_zoo(manifest, tmp_path):
    import os
    import shutil
    import subprocess

    env = {
        **os.environ,
        "MERGELAB_RUNS": str(tmp_path),
        "TQDM_DISABLE": "1",
        "WANDB_SILENT": "true",
    }
    proc = subprocess.run(
        [shutil.which("mergelab")], capture_output=True, text=True, env=env, timeout=1200
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = tmp_path.glob("*/result.json")
    record = json.loads(path.read_text())
    assert record["method"]["name"] == "task_arithmetic"
    assert set(record["pool"]["experts"]) == set(CATEGORIES)
    for tasks in TASKS.values():
        for task in tasks:
            assert task in record["scores"]
            assert f"| {task} |" in proc.stdout
    # the default merge is task arithmetic at 0.3, as scored in the manifest
    ta = manifest["scores"]["task_arithmetic_0.3"]
    for task, value in ta.items():
        assert next(iter(record["scores"][task].values())) == pytest.approx(value, abs=1e-4)
