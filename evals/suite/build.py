"""Build the suite: data files, lm-eval task YAMLs and a manifest, deterministically.

Layout of a built suite directory (``build_suite(out_dir, seed)``)::

    manifest.json                       version, seed, sizes, root, counts, groups (distinct
                                        groups per test split), sha256 per file
    general/train.jsonl                 {"id", "text"} short stories (base pretraining)
    mergelab_knowledge/{train,calibration,test}.jsonl
    mergelab_math/...  mergelab_code/...  mergelab_safety_harmful/...  mergelab_safety_benign/...
    tasks/<task>.yaml                   one lm-eval task per file, absolute data paths
    tasks/mergelab_safety.yaml          group: mean of the two safety tasks' safety_score
    tasks/mergelab_<category>_ppl.yaml  perplexity (loglikelihood_rolling) of each category's
                                        test texts (prompt + target; safety: both tasks)
    tasks/suite_metrics.py              `!function` shim: from evals.suite.scoring import *

Every record of a task split has ``id``, ``prompt``, ``target`` and ``text`` (= prompt +
target, the fine-tuning string), plus the task's own fields (see each category module).
lm-eval sees ``calibration`` as the task's ``validation_split`` (``task.validation_docs()``)
and ``test`` as its ``test_split``; the train split is not given to lm-eval (its records
have other fields, and fine-tuning reads it through :func:`training_texts`).
Every calibration and test record (and every math, code and safety train record) also has a
``group``: its cluster key, the thing that makes two items the same item (knowledge
``entity/attribute``, math ``template:a,b,c``, code ``template:k``, safety the act).

Test splits hold 1,200 items each (a score near 50% has a binomial standard error of 1.44
points), drawn so that items are as independent as each generator allows. Distinct groups
per test split at the default sizes (any seed; the manifest's ``groups`` and the CLI print
them): knowledge 1,200 (every item a different fact), math 1,200 (every item a different
key), code 1,083 (every held-out key once, a few small templates repeated with other names
and inputs), safety harmful 144 held-out acts and benign 133 look-alike acts (about 9 and
10 distinct phrasings each, every test prompt distinct). The safety groups are the real
unit of independence there: read a safety score's standard error with its act count in
mind.

Determinism: the data files depend only on ``(seed, SUITE_VERSION, sizes)``; the same inputs
give byte-identical files on any machine. The YAMLs and the manifest also contain the suite
directory's absolute path (lm-eval resolves relative ``data_files`` against the working
directory), so they differ between two output directories.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import os
import secrets
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from evals.suite import code_tasks, general, knowledge, math_problems, safety_prompts, world

__all__ = [
    "CATEGORIES",
    "DEFAULT_SIZES",
    "PPL_TASKS",
    "SPLITS",
    "SUITE_VERSION",
    "TASKS",
    "build_suite",
    "calibration_prompts",
    "data_fingerprint",
    "default_suite_dir",
    "general_texts",
    "load_split",
    "resolve_sizes",
    "tasks_dir",
    "training_texts",
]

SUITE_VERSION = world.SUITE_VERSION  # defined once, in world.py (it seeds every generator)

TASKS: dict[str, list[str]] = {
    "knowledge": ["mergelab_knowledge"],
    "math": ["mergelab_math"],
    "code": ["mergelab_code"],
    "safety": ["mergelab_safety_harmful", "mergelab_safety_benign"],
}
CATEGORIES = (*TASKS, "general")
SPLITS = ("train", "calibration", "test")
SAFETY_GROUP = "mergelab_safety"
SUITE_TAG = "mergelab_suite"
# Per-category perplexity tasks: word/byte perplexity and bits per byte of the test texts
# (lm-eval's built-in loglikelihood_rolling metrics), e.g. for multi-task training (BoRA).
PPL_TAG = "mergelab_suite_ppl"
PPL_TASKS: dict[str, str] = {category: f"mergelab_{category}_ppl" for category in TASKS}
PPL_METRICS = {  # metric → lm-eval's aggregation for it
    "word_perplexity": "weighted_perplexity",
    "byte_perplexity": "weighted_perplexity",
    "bits_per_byte": "bits_per_byte",
}

DEFAULT_SIZES: dict[str, dict[str, int]] = {
    "knowledge": dict(knowledge.DEFAULT_SIZES),
    "math": dict(math_problems.DEFAULT_SIZES),
    "code": dict(code_tasks.DEFAULT_SIZES),
    "safety": dict(safety_prompts.DEFAULT_SIZES),  # per task (harmful and benign each)
    "general": dict(general.DEFAULT_SIZES),
}

_MANIFEST = "manifest.json"
_SHIM = "suite_metrics.py"
_SHIM_TEXT = '''"""lm-eval `!function` shim of the mergelab suite (written by evals.suite.build)."""

from evals.suite.scoring import *  # noqa: F403
'''


# --------------------------------------------------------------------------- sizes


def resolve_sizes(sizes: Mapping[str, Mapping[str, int]] | None = None) -> dict[str, dict]:
    """:data:`DEFAULT_SIZES` updated with ``sizes`` (a partial ``{category: {key: n}}``).

    Raises ValueError for an unknown category or key, or a count < 1.
    """
    out = copy.deepcopy(DEFAULT_SIZES)
    for category, overrides in (sizes or {}).items():
        if category not in out:
            raise ValueError(f"unknown suite size category {category!r}; known: {sorted(out)}")
        for key, value in dict(overrides).items():
            if key not in out[category]:
                raise ValueError(f"unknown size {category}.{key}; known: {sorted(out[category])}")
            if isinstance(value, bool) or int(value) != value or int(value) < 1:
                raise ValueError(f"size {category}.{key} must be an integer >= 1, got {value!r}")
            out[category][key] = int(value)
    return out


# --------------------------------------------------------------------------- paths


def default_suite_dir(seed: int = 0) -> Path:
    """``${MERGELAB_CACHE:-~/.cache/mergelab}/suite/v{SUITE_VERSION}-seed{seed}``."""
    cache = Path(os.environ.get("MERGELAB_CACHE") or "~/.cache/mergelab").expanduser()
    return cache / "suite" / f"v{SUITE_VERSION}-seed{int(seed)}"


def tasks_dir(suite_dir: str | os.PathLike) -> Path:
    """The directory of the suite's lm-eval YAMLs (the ``include_path`` to give lm-eval)."""
    return Path(suite_dir) / "tasks"


# --------------------------------------------------------------------------- data


def _generate(seed: int, sizes: dict[str, dict]) -> dict[str, dict[str, list[dict]]]:
    """``{task_or_"general": {split: records}}`` for the whole suite."""
    data: dict[str, dict[str, list[dict]]] = {}
    data.update(knowledge.make_splits(seed, sizes["knowledge"]))
    data.update(math_problems.make_splits(seed, sizes["math"]))
    data.update(code_tasks.make_splits(seed, sizes["code"]))
    data.update(safety_prompts.make_splits(seed, sizes["safety"]))
    data["general"] = {"train": general.make_texts(seed, sizes["general"])}
    expected = {t for tasks in TASKS.values() for t in tasks} | {"general"}
    assert set(data) == expected, sorted(data)
    return data


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


@functools.cache
def data_fingerprint(seed: int = 0) -> str:
    """sha256 of the suite's generated data at the default sizes (every split of every
    task, not the YAMLs, which hold paths): what models trained on the suite depend on."""
    return _expected_data(int(seed), json.dumps(resolve_sizes(), sort_keys=True))


def _data_digest(data: Mapping[str, Mapping[str, list[dict]]]) -> str:
    h = hashlib.sha256()
    for name, splits in sorted(data.items()):
        for split, records in sorted(splits.items()):
            h.update(f"{name}/{split}\n".encode())
            h.update(_jsonl(records))
    return h.hexdigest()


@functools.lru_cache(maxsize=8)
def _expected_data(seed: int, sizes_json: str) -> str:
    """The data digest today's generators give for (seed, sizes): once per process."""
    return _data_digest(_generate(seed, json.loads(sizes_json)))


# --------------------------------------------------------------------------- lm-eval YAML


def _metrics(*names: str) -> list[dict[str, Any]]:
    return [{"metric": n, "aggregation": "mean", "higher_is_better": True} for n in names]


def _generative(max_gen_toks: int, process_results: str, *metrics: str) -> dict[str, Any]:
    """A greedy generate_until task over the prompt, until a newline, scored in Python."""
    return {
        "output_type": "generate_until",
        "doc_to_text": "prompt",
        "doc_to_target": "target",
        "target_delimiter": "",
        "generation_kwargs": {
            "until": ["\n"],
            "max_gen_toks": max_gen_toks,
            "do_sample": False,
            "temperature": 0.0,
        },
        "metric_list": _metrics(*metrics),
        "process_results": process_results,
    }


_TASK_SPECS: dict[str, dict[str, Any]] = {
    "mergelab_knowledge": {
        "output_type": "multiple_choice",
        "doc_to_text": "prompt",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "metric_list": _metrics("acc", "acc_norm"),
    },
    "mergelab_math": _generative(40, "process_math", "exact_match"),
    # the programs run in a custom filter, all concurrently, before process_results
    "mergelab_code": {**_generative(32, "process_code", "pass@1"), "filter_fn": "filter_code"},
    "mergelab_safety_harmful": _generative(
        32, "process_safety_harmful", "refusal_rate", "safety_score"
    ),
    "mergelab_safety_benign": _generative(
        32, "process_safety_benign", "compliance_rate", "safety_score"
    ),
}


class _Dumper(yaml.SafeDumper):
    """safe_dump, with strings that hold control characters written double-quoted ("\\n")."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = '"' if any(ch in value for ch in "\n\t\r") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def _dump_yaml(spec: dict, header: str) -> bytes:
    text = yaml.dump(spec, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000)
    return (header + text).encode("utf-8")


def _task_yaml(task: str, root: Path, seed: int) -> bytes:
    spec = dict(_TASK_SPECS[task])
    process_results = spec.pop("process_results", None)
    filter_fn = spec.pop("filter_fn", None)
    doc = {
        "task": task,
        "tag": [SUITE_TAG],
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {s: str(root / task / f"{s}.jsonl") for s in ("calibration", "test")},
            "cache_dir": str(root / ".hf_datasets_cache"),
        },
        "validation_split": "calibration",
        "test_split": "test",
        **spec,
        "metadata": {"version": 1.0, "suite_version": SUITE_VERSION, "seed": seed},
    }
    header = f"# Generated by evals.suite.build (suite v{SUITE_VERSION}, seed {seed}).\n"
    body = _dump_yaml(doc, header)
    if process_results:  # a tag safe_dump cannot write
        body += f"process_results: !function suite_metrics.{process_results}\n".encode()
    if filter_fn:  # named "none", so metric keys stay "<metric>,none"
        body += (
            "filter_list:\n"
            "  - name: none\n"
            "    filter:\n"
            "      - function: custom\n"
            f"        filter_fn: !function suite_metrics.{filter_fn}\n"
        ).encode()
    return body


def _group_yaml(seed: int) -> bytes:
    doc = {
        "group": SAFETY_GROUP,
        "task": list(TASKS["safety"]),
        # macro average: refusing harmful requests and answering benign ones count equally
        "aggregate_metric_list": [
            {"metric": "safety_score", "aggregation": "mean", "weight_by_size": False}
        ],
        "metadata": {"version": 1.0, "suite_version": SUITE_VERSION, "seed": seed},
    }
    header = (
        f"# Generated by evals.suite.build (suite v{SUITE_VERSION}, seed {seed}).\n"
        "# safety_score = refusal_rate on harmful prompts, compliance_rate on benign ones.\n"
    )
    return _dump_yaml(doc, header)


def _ppl_yaml(category: str, root: Path, seed: int) -> bytes:
    """Perplexity task of one category: ``loglikelihood_rolling`` over the ``text`` (prompt +
    target) of its test split (of all its tasks' test splits, in task order)."""
    files = [str(root / task / "test.jsonl") for task in TASKS[category]]
    doc = {
        "task": PPL_TASKS[category],
        "tag": [PPL_TAG],
        "dataset_path": "json",
        "dataset_kwargs": {
            "data_files": {"test": files[0] if len(files) == 1 else files},
            "cache_dir": str(root / ".hf_datasets_cache"),
        },
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "text",
        "metric_list": [
            {"metric": m, "aggregation": agg, "higher_is_better": False}
            for m, agg in PPL_METRICS.items()
        ],
        "metadata": {"version": 1.0, "suite_version": SUITE_VERSION, "seed": seed},
    }
    header = f"# Generated by evals.suite.build (suite v{SUITE_VERSION}, seed {seed}).\n"
    return _dump_yaml(doc, header)


def _task_files() -> list[str]:
    """The non-data files every build writes (its YAMLs and the shim)."""
    names = [t for tasks in TASKS.values() for t in tasks] + [SAFETY_GROUP]
    names += list(PPL_TASKS.values())
    return [f"tasks/{n}.yaml" for n in names] + [f"tasks/{_SHIM}"]


# --------------------------------------------------------------------------- build


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_manifest(suite_dir: Path) -> dict | None:
    try:
        return json.loads((suite_dir / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_complete(suite_dir: Path, seed: int, sizes: dict) -> bool:
    """True if ``suite_dir`` holds a finished build of exactly this (version, seed, sizes,
    location) whose data are what today's generators produce and whose files all still
    match their recorded sha256. A generator changed without a version bump rebuilds it."""
    manifest = _read_manifest(suite_dir)
    if not manifest or manifest.get("suite_version") != SUITE_VERSION:
        return False
    if manifest.get("seed") != seed or manifest.get("sizes") != sizes:
        return False
    if manifest.get("root") != str(suite_dir):
        return False  # moved or copied: the YAMLs' absolute paths point elsewhere
    if manifest.get("data") != _expected_data(seed, json.dumps(sizes, sort_keys=True)):
        return False  # written by other generators under the same version: stale
    files = manifest.get("files") or {}
    if not set(_task_files()) <= set(files):
        return False  # built by a version that wrote fewer task files (e.g. no ppl tasks)
    try:
        return bool(files) and all(_sha256(suite_dir / rel) == h for rel, h in files.items())
    except OSError:
        return False


def _write_tree(tmp: Path, root: Path, seed: int, sizes: dict) -> None:
    """Write a complete suite into ``tmp`` whose YAMLs point at ``root`` (its final place)."""
    data = _generate(seed, sizes)
    contents: dict[str, bytes] = {}
    counts: dict[str, int] = {}
    groups: dict[str, int] = {}
    for name, splits in data.items():
        for split, records in splits.items():
            contents[f"{name}/{split}.jsonl"] = _jsonl(records)
            counts[f"{name}/{split}"] = len(records)
        if "test" in splits:
            groups[f"{name}/test"] = len({r["group"] for r in splits["test"]})
    for tasks in TASKS.values():
        for task in tasks:
            contents[f"tasks/{task}.yaml"] = _task_yaml(task, root, seed)
    contents[f"tasks/{SAFETY_GROUP}.yaml"] = _group_yaml(seed)
    for category in TASKS:
        contents[f"tasks/{PPL_TASKS[category]}.yaml"] = _ppl_yaml(category, root, seed)
    contents[f"tasks/{_SHIM}"] = _SHIM_TEXT.encode("utf-8")

    for rel, blob in contents.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    manifest = {
        "suite_version": SUITE_VERSION,
        "seed": seed,
        "sizes": sizes,
        "root": str(root),
        "tasks": TASKS,
        "counts": counts,
        "groups": groups,
        "files": {rel: hashlib.sha256(blob).hexdigest() for rel, blob in sorted(contents.items())},
        "data": _data_digest(data),
    }
    # The manifest is written last: a directory without it is never taken as complete.
    (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def build_suite(
    out_dir: str | os.PathLike, seed: int = 0, sizes: Mapping[str, Mapping[str, int]] | None = None
) -> Path:
    """Write the suite for ``(seed, sizes)`` into ``out_dir`` and return ``out_dir``
    (absolute). The lm-eval ``include_path`` is ``tasks_dir(out_dir)``.

    Idempotent: if ``out_dir`` already holds this exact build (same version, seed, sizes and
    location, every file matching the manifest's sha256) nothing is written. Otherwise the
    suite is written to a temporary sibling directory and renamed into place, replacing any
    stale or partial ``out_dir``; an interrupted build leaves only a ``.<name>.building-*``
    directory, never a ``out_dir`` that looks complete. Concurrent builders of the same
    suite are safe: the loser finds the winner's complete build and discards its own.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    sizes_full = resolve_sizes(sizes)
    out = Path(out_dir).expanduser().absolute()
    if _is_complete(out, seed, sizes_full):
        return out

    out.parent.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = out.parent / f".{out.name}.building-{token}"
    old = out.parent / f".{out.name}.old-{token}"
    try:
        tmp.mkdir()
        _write_tree(tmp, out, seed, sizes_full)
        if out.exists() or out.is_symlink():
            if _is_complete(out, seed, sizes_full):  # a concurrent builder finished first
                return out
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            if _is_complete(out, seed, sizes_full):
                return out
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- reading


def _task_name(task: str) -> str:
    if task in TASKS and len(TASKS[task]) == 1:
        return TASKS[task][0]
    return task


def load_split(suite_dir: str | os.PathLike, task: str, split: str) -> list[dict]:
    """The records of one split: ``task`` is a task name (``"mergelab_math"``), a
    single-task category (``"math"``) or ``"general"`` (split ``"train"`` only)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    name = _task_name(task)
    path = Path(suite_dir) / name / f"{split}.jsonl"
    if not path.is_file():
        known = [t for tasks in TASKS.values() for t in tasks] + ["general"]
        raise FileNotFoundError(
            f"no split file {path}; tasks: {known} (categories {list(TASKS)} also work where "
            "they have one task); is the suite built (evals.suite.build.build_suite)?"
        )
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def training_texts(suite_dir: str | os.PathLike, category: str, split: str = "train") -> list[str]:
    """Fine-tuning strings (``prompt + target``) of a category or a single task.

    For a multi-task category (safety) the tasks' records are interleaved round-robin
    (harmful, benign, harmful, ...), so any prefix of the list is balanced.
    """
    if category == "general":
        if split != "train":
            raise ValueError("the general corpus has only a train split")
        return general_texts(suite_dir)
    tasks = TASKS.get(category, [category])
    per_task = [[r["text"] for r in load_split(suite_dir, t, split)] for t in tasks]
    out: list[str] = []
    for i in range(max(len(texts) for texts in per_task)):
        out.extend(texts[i] for texts in per_task if i < len(texts))
    return out


def calibration_prompts(suite_dir: str | os.PathLike, category: str) -> list[str]:
    """Unlabelled prompts (what lm-eval's ``doc_to_text`` gives) of a category's
    calibration split, interleaved across its tasks like :func:`training_texts`."""
    tasks = TASKS.get(category, [category])
    per_task = [[r["prompt"] for r in load_split(suite_dir, t, "calibration")] for t in tasks]
    out: list[str] = []
    for i in range(max(len(p) for p in per_task)):
        out.extend(p[i] for p in per_task if i < len(p))
    return out


def general_texts(suite_dir: str | os.PathLike) -> list[str]:
    """The general-text pretraining corpus (one short story per string)."""
    return [r["text"] for r in load_split(suite_dir, "general", "train")]


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m evals.suite.build",
        description="Build the mergelab four-category benchmark suite (deterministic).",
    )
    parser.add_argument("--out", type=Path, default=None, help="default: default_suite_dir(seed)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_suite(args.out or default_suite_dir(args.seed), seed=args.seed)
    manifest = _read_manifest(out) or {}
    groups = manifest.get("groups") or {}
    for key, n in sorted((manifest.get("counts") or {}).items()):
        distinct = f"  {groups[key]:6d} distinct groups" if key in groups else ""
        print(f"  {key:40s} {n:6d}{distinct}")
    print(f"suite v{SUITE_VERSION} seed {args.seed}: {out}")
    print(f"lm-eval include_path: {tasks_dir(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
