"""The built-in model zoo: a tokenizer, a base LLaMA and one expert per suite category.

Recipe (``RECIPES``; see ../shared/specs/zoo.md for why): a byte-level BPE tokenizer
trained on the suite; a base pretrained on the general corpus with a light share of
every category (so it knows each format but has little skill); then per category one
fully fine-tuned expert started from the base, trained on mostly its own category plus
some of the pretraining mix. Training packs texts into full blocks (no padding). The
experts' task vectors are nearly orthogonal but large (‖τ‖/‖θ0‖ is in the manifest): on
a 1.3M-parameter model, learning rates small enough for real fine-tunes' 0.01-0.05 left
the experts at the base's level in the steps a CPU build can afford. PEFT LoRA experts
(same data) are built on first use.

Same everywhere. The weights are a function of the recipe, the suite, the zoo's seed and
the packages that compute floats, not of the caller's environment:

- Every build runs in a child process with a pinned environment (:data:`PINNED_ENV`: one
  torch/OpenMP/MKL thread, MKL's conditional numerical reproducibility and torch's and
  oneDNN's kernels capped at AVX2, a fixed hash seed), whatever the caller's
  ``OMP_NUM_THREADS``. The four experts (and the four LoRA adapters) train in parallel
  child processes, each single-threaded, so the build uses the machine's cores and still
  gives the same bytes on one core or sixteen.
- The *logical* zoo is ``<size>-seed<seed>-<recipe digest>`` (:func:`zoo_id`): the
  digest covers the recipe, the seed, the suite's version and generated data
  (:func:`evals.suite.build.data_fingerprint`), :data:`ZOO_CODE_VERSION` and the pinned
  environment. Configs name members by URI, ``zoo:<zoo id>/<member>``
  (:func:`member_uri`), so a cell's id depends on the logical pool, never on where the
  cache lives, and composing a config builds nothing; the model pool resolves the URI
  (:func:`resolve_uri`), building on first use (a file lock per part: concurrent sweeps
  build it once). Cache directories add a digest of the versions of the float-computing
  packages (:data:`FLOAT_PACKAGES`), so other versions build their own zoo instead of
  reusing one that is not theirs.
- ``harness/zoo_expected.json`` records the sha256 of every file of the zoos the README's
  numbers come from, with the environment that built them and a digest of the texts they
  trained on; each build's manifest records its own. The comparison is made when a zoo
  is used, against the record of the code in use (never a stored verdict, which a later
  record would outdate). A mismatch (another CPU's kernels, other package versions) is
  reported once per process, naming what of the environment differs and what it means
  for comparing numbers.
- A cached part is reused only if it trained on today's suite texts and (experts) on the
  base cached now (:func:`_usable`); otherwise it is rebuilt, with a note.

Seeds. A zoo seed is a replicate of the experts: one base (tokenizer + pretrained base,
``Recipe.base_seed``, built once and shared) fine-tuned into four experts with the seed's
own batch order and data sampling, on the same suite (``Recipe.suite_seed``), so
replicates differ the way repeated fine-tuning runs of one released base differ and are
scored on the same test items (paired comparisons across seeds line up item by item).

Layout: ``<cache>/zoo/<base id>-<env digest>/`` holds ``tokenizer/``, ``base/`` and its
``manifest.json``; ``<cache>/zoo/<zoo id>-<env digest>/`` holds ``experts/<category>/``
and ``manifest.json`` (recipe, environment, seeds, losses, build time, task-vector
geometry, file sha256, training-text digest), and after first use
``lora/<category>/`` with ``lora/manifest.json``. Scores are not part of the build:
``mergelab -m +experiment=zoo_references`` scores base and experts as ordinary cells.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from importlib import metadata
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from evals.suite.build import (
    SUITE_VERSION,
    TASKS,
    build_suite,
    data_fingerprint,
    default_suite_dir,
    general_texts,
    training_texts,
)
from harness.kernels import KERNEL_ENV

ZOO_CODE_VERSION = "2"  # bump when the build procedure changes in a way the recipe misses
CATEGORIES = tuple(TASKS)
EXPECTED_FILE = Path(__file__).with_name("zoo_expected.json")
# What the build child runs under. Thread counts change float summation order; MKL_CBWR
# and ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA choose the same kernels on any x86 CPU
# with AVX2; the hash seed and single-threaded tokenizers keep Python and BPE training
# orders fixed.
PINNED_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    **KERNEL_ENV,
    "PYTHONHASHSEED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "RAYON_NUM_THREADS": "1",
    "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
}
# Packages whose versions change the zoo's floats (cache directory key, manifest).
FLOAT_PACKAGES = ("torch", "transformers", "tokenizers", "peft", "safetensors", "numpy")
# What a recorded build keeps of its environment (compared when a later build differs).
RECORDED_ENVIRONMENT = (
    "processor",
    "cpu_id",
    "cpu_flags",
    "cpu_capability",
    "libc",
    "python_full",
    *FLOAT_PACKAGES,
)
_ID = re.compile(r"^zoo:(?P<size>[a-z0-9_]+)-seed(?P<seed>\d+)-(?P<digest>[0-9a-f]{10})/(?P<m>.+)$")


class ZooError(ValueError):
    """A zoo that cannot be named, built or found; the message says why and the fix."""


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the zoo's weights (with the seed and the environment)."""

    vocab_size: int = 2048
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 4
    intermediate: int = 384
    max_length: int = 64
    pretrain_steps: int = 300
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 64
    category_share: float = 0.03  # of each category in pretraining (rest: general text)
    expert_steps: int = 300
    expert_lr: float = 1e-3
    expert_batch: int = 32
    own_share: float = 0.8  # expert data: own category; the rest is the pretraining mix
    lora_r: int = 8
    lora_alpha: int = 16
    lora_steps: int = 200
    lora_lr: float = 2e-3
    suite_seed: int = 0  # every zoo seed trains on this suite, so seeds share test items
    base_seed: int = 0  # every zoo seed fine-tunes this one base (seeds vary the experts)


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


# --------------------------------------------------------------------------- names

# Recipe fields that decide the tokenizer and the base; the others only decide experts.
BASE_FIELDS = (
    "vocab_size", "hidden", "layers", "heads", "kv_heads", "intermediate", "max_length",
    "pretrain_steps", "pretrain_lr", "pretrain_batch", "category_share", "suite_seed",
    "base_seed",
)  # fmt: skip


def cache_root() -> Path:
    return Path(os.environ.get("MERGELAB_CACHE") or Path.home() / ".cache" / "mergelab")


def _recipe(size: str) -> Recipe:
    if size not in RECIPES:
        raise ZooError(f"zoo size {size!r} is unknown; use one of {sorted(RECIPES)}")
    return RECIPES[size]


def _digest(recipe: dict[str, Any], *parts: Any) -> str:
    """Recipe fields, the suite's version and generated data, the build code's version and
    the pinned environment: everything but the packages that decides the weights."""
    suite = [SUITE_VERSION, data_fingerprint(recipe["suite_seed"])]
    key = json.dumps([recipe, *parts, suite, ZOO_CODE_VERSION, PINNED_ENV], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def zoo_id(size: str = "xs", seed: int = 0, recipe: Recipe | None = None) -> str:
    """The logical zoo: size, seed and a digest of everything else that decides it."""
    return f"{size}-seed{int(seed)}-{_digest(asdict(recipe or _recipe(size)), int(seed))}"


def base_id(size: str = "xs", recipe: Recipe | None = None) -> str:
    """The logical base (tokenizer + pretrained base), shared by every seed of a zoo."""
    fields_ = asdict(recipe or _recipe(size))
    return f"{size}-base-{_digest({k: fields_[k] for k in BASE_FIELDS})}"


def environment() -> dict[str, str]:
    """Versions of what computes the zoo's floats (keyed into its cache directory)."""
    out = {"python": ".".join(platform.python_version_tuple()[:2]), "machine": platform.machine()}
    for pkg in FLOAT_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _env_digest() -> str:
    return hashlib.sha256(json.dumps(environment(), sort_keys=True).encode()).hexdigest()[:8]


def zoo_dir(size: str = "xs", seed: int = 0, recipe: Recipe | None = None) -> Path:
    """Where the zoo's experts live in this environment (built or not)."""
    return cache_root() / "zoo" / f"{zoo_id(size, seed, recipe)}-{_env_digest()}"


def base_dir(size: str = "xs", recipe: Recipe | None = None) -> Path:
    """Where the zoo's tokenizer and base live in this environment (built or not)."""
    return cache_root() / "zoo" / f"{base_id(size, recipe)}-{_env_digest()}"


def _member_path(member: str) -> str:
    kind, _, cat = member.rpartition("/")
    if member == "base":
        return "base"
    if kind in ("", "experts", "lora") and cat in CATEGORIES:
        return f"{kind or 'experts'}/{cat}"
    raise ZooError(
        f"zoo member {member!r} is unknown: use 'base', a category {list(CATEGORIES)} "
        "or 'lora/<category>'"
    )


def member_uri(size: str, member: str, seed: int = 0) -> str:
    """``zoo:<zoo id>/<member>`` for ``base``, ``<category>`` or ``lora/<category>``
    (what ``${zoo:xs,math}`` in a config resolves to). Builds nothing."""
    return f"zoo:{zoo_id(size, seed)}/{_member_path(member)}"


def resolve_uri(uri: str, *, progress: bool = True) -> Path:
    """The directory of a zoo member URI, building the zoo (or its LoRA experts) first if
    this environment has not built it yet."""
    match = _ID.match(uri)
    if not match:
        raise ZooError(
            f"{uri!r} is not a zoo member URI (zoo:<size>-seed<N>-<digest>/<member>); "
            "write ${zoo:xs,base} or ${zoo:xs,math} in the config instead"
        )
    size, seed, member = match["size"], int(match["seed"]), _member_path(match["m"])
    expected = zoo_id(size, seed)
    if f"{size}-seed{seed}-{match['digest']}" != expected:
        raise ZooError(
            f"{uri!r} names a zoo this mergelab does not build (its {size} zoo of seed {seed} "
            f"is {expected}): the URI was written by another version of the zoo recipe. "
            f"Name the member as ${{zoo:{size},{match['m']},{seed}}} to get this version's."
        )
    if member == "base":
        return build_base(size, progress=progress) / "base"
    if member.startswith("lora/"):
        return build_lora(size, seed, progress=progress) / member.removeprefix("lora/")
    return build_zoo(size, seed, progress=progress) / member


# --------------------------------------------------------------------------- building


@contextmanager
def _locked(out: Path):
    """An exclusive lock per zoo directory: concurrent sweeps build a zoo once."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _ensure(part: str, done: Path, size: str, seed: int, recipe: Recipe, device: str,
            progress: bool) -> None:  # fmt: skip
    if not _usable(part, done, recipe, note=False):
        with _locked(done.parent):
            if not _usable(part, done, recipe, note=True):
                _run_child(part, size, seed, recipe, device, progress)
    _report_once(done)


def _usable(part: str, done: Path, recipe: Recipe, *, note: bool) -> bool:
    """Whether a cached part can be reused: it is complete and was trained on today's suite.

    The cache key holds the digest of the data today's generators give, but a part also
    records the digest of the texts it actually read (``inputs``). A part whose texts differ
    (built from a stale suite cache), or one from before that record existed whose files
    are not the recorded build's, is rebuilt, with a note. LoRA experts live inside their
    experts' directory and go with it."""
    if not done.is_file():
        return False
    if part == "lora":
        return True
    manifest = json.loads(done.read_text())
    built = (manifest.get("inputs") or {}).get("training_texts")
    if built is not None:
        ok = built == training_digest(recipe.suite_seed)
    else:
        files = manifest.get("files", {})
        ok = compare_expected(manifest["zoo_id"], files)["status"] == "matches"
    if ok and part == "experts":  # fine-tuned from the base that is cached now
        base = json.loads((base_dir(manifest["size"], recipe) / "manifest.json").read_text())
        ok = all(manifest["files"].get(k) == v for k, v in base["files"].items())
    if not ok and note:
        print(
            f"[mergelab] NOTE: rebuilding zoo {manifest['zoo_id']}: the cached build in "
            f"{done.parent} did not train on today's suite data and base (or cannot show "
            "it did).",
            file=sys.stderr,
            flush=True,
        )
    return ok


@functools.lru_cache(maxsize=4)
def training_digest(suite_seed: int) -> str:
    """sha256 of every text a zoo trains on (general corpus, then each category's train
    split), read from the suite cache as a build reads it."""
    return _texts_digest(_corpus(*_data_for_seed(suite_seed)))


def build_base(
    size: str = "xs", *, device: str = "cpu", progress: bool = True, recipe: Recipe | None = None
) -> Path:
    """Build (or reuse) the zoo's tokenizer and pretrained base; return their directory."""
    recipe = recipe or _recipe(size)
    out = base_dir(size, recipe)
    _ensure("base", out / "manifest.json", size, recipe.base_seed, recipe, device, progress)
    return out


def build_zoo(
    size: str = "xs",
    seed: int = 0,
    *,
    device: str = "cpu",
    progress: bool = True,
    recipe: Recipe | None = None,
) -> Path:
    """Build (or reuse) the zoo's full experts (and its base); return the experts' zoo
    directory (``experts/<category>``, ``manifest.json``)."""
    recipe = recipe or _recipe(size)
    build_base(size, device=device, progress=progress, recipe=recipe)
    out = zoo_dir(size, seed, recipe)
    _ensure("experts", out / "manifest.json", size, seed, recipe, device, progress)
    return out


def build_lora(
    size: str = "xs",
    seed: int = 0,
    *,
    device: str = "cpu",
    progress: bool = True,
    recipe: Recipe | None = None,
) -> Path:
    """Build (or reuse) the zoo's LoRA experts; return ``<zoo>/lora``."""
    recipe = recipe or _recipe(size)
    out = build_zoo(size, seed, device=device, progress=progress, recipe=recipe) / "lora"
    _ensure("lora", out / "manifest.json", size, seed, recipe, device, progress)
    return out


def _run_child(
    part: str, size: str, seed: int, recipe: Recipe, device: str, progress: bool
) -> None:
    """Build ``part`` of the zoo in a child process under :data:`PINNED_ENV`."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    env.update(PINNED_ENV)
    env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers' load/save bars: noise here
    cmd = [sys.executable, "-m", "harness.zoo", "_child", part, "--size", size]
    cmd += ["--seed", str(seed), "--recipe", json.dumps(asdict(recipe)), "--device", device]
    cmd += [] if progress else ["--no-progress"]
    print(f"[mergelab] building the {size} zoo's {part} (seed {seed})", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise ZooError(f"building the {size} zoo's {part} failed (exit code {proc.returncode})")


def derived_seed(seed: int, purpose: str) -> int:
    """A 31-bit seed for one purpose of a zoo seed (experts of seed 0 and 1 never share one)."""
    digest = hashlib.sha256(f"mergelab-zoo/{int(seed)}/{purpose}".encode()).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


def _check_pinned() -> None:
    import torch

    wrong = {k: os.environ.get(k) for k, v in PINNED_ENV.items() if os.environ.get(k) != v}
    if wrong or torch.get_num_threads() != 1:
        raise ZooError(
            f"the zoo build child runs without its pinned environment ({wrong}, torch threads "
            f"{torch.get_num_threads()}); build through harness.zoo.build_zoo"
        )


def _workers() -> int:
    return max(1, min(len(CATEGORIES), len(os.sched_getaffinity(0))))


def _data(recipe: Recipe) -> tuple[dict[str, list[str]], list[str]]:
    """Each category's training texts and the general texts of the recipe's suite."""
    return _data_for_seed(recipe.suite_seed)


def _corpus(texts: dict[str, list[str]], general: list[str]) -> list[str]:
    """Every training text in one list: the general corpus, then each category's (what
    the tokenizer trains on and :func:`training_digest` hashes)."""
    return general + sum(texts.values(), [])


def _data_for_seed(suite_seed: int) -> tuple[dict[str, list[str]], list[str]]:
    suite = build_suite(default_suite_dir(suite_seed), seed=suite_seed)
    texts = {c: [_eol(t) for t in training_texts(suite, c)] for c in CATEGORIES}
    return texts, [_eol(t) for t in general_texts(suite)]


def _partial(out: Path) -> Path:
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _finish(tmp: Path, out: Path, manifest: dict[str, Any]) -> None:
    manifest["environment"] = {**environment(), **_kernel_info(), "pinned": PINNED_ENV}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def _build_base(size: str, seed: int, recipe: Recipe, device: str, progress: bool) -> None:
    from core.train import finetune

    _check_pinned()
    out = base_dir(size, recipe)
    tmp = _partial(out)
    start = time.perf_counter()
    texts, general = _data(recipe)
    corpus = _corpus(texts, general)
    tokenizer = train_tokenizer(corpus, recipe, tmp / "tokenizer")
    model = _new_model(recipe, len(tokenizer), derived_seed(seed, "base/init"))
    stats = finetune(
        model,
        tokenizer,
        _pretrain_mix(general, texts, recipe, derived_seed(seed, "base/mix")),
        steps=recipe.pretrain_steps,
        lr=recipe.pretrain_lr,
        batch_size=recipe.pretrain_batch,
        max_length=recipe.max_length,
        seed=derived_seed(seed, "base/train"),
        device=device,
        progress=progress,
        desc="zoo: pretrain base",
        pack=True,
    )
    _save(model, tokenizer, tmp / "base")
    manifest = {
        "zoo_id": base_id(size, recipe),
        "size": size,
        "base_seed": seed,
        "recipe": {k: asdict(recipe)[k] for k in BASE_FIELDS},
        "suite_version": SUITE_VERSION,
        "zoo_code_version": ZOO_CODE_VERSION,
        "models": {"base": _entry(model, stats, derived_seed(seed, "base/train"))},
        "build_seconds": round(time.perf_counter() - start, 1),
        "files": _file_digests(tmp, ["tokenizer/tokenizer.json", "base"]),
        "inputs": {"training_texts": _texts_digest(corpus)},
    }
    _finish(tmp, out, manifest)


def _build_experts(size: str, seed: int, recipe: Recipe, device: str, progress: bool) -> None:
    _check_pinned()
    base, out = base_dir(size, recipe), zoo_dir(size, seed, recipe)
    tmp = _partial(out)
    start = time.perf_counter()
    jobs = [("full", cat, base, tmp / "experts" / cat, recipe, seed, device) for cat in CATEGORIES]
    base_manifest = json.loads((base / "manifest.json").read_text())
    manifest = {
        "zoo_id": zoo_id(size, seed, recipe),
        "size": size,
        "seed": seed,
        "recipe": asdict(recipe),
        "suite_version": SUITE_VERSION,
        "zoo_code_version": ZOO_CODE_VERSION,
        "base": {"dir": str(base), "zoo_id": base_manifest["zoo_id"]},
        "models": {**base_manifest["models"], **_train_parallel(jobs, progress)},
        "build_seconds": round(time.perf_counter() - start, 1),
        "workers": _workers(),
        "geometry": task_vector_geometry(base / "base", tmp / "experts"),
        "files": {**base_manifest["files"], **_file_digests(tmp, ["experts"])},
        "inputs": {"training_texts": training_digest(recipe.suite_seed)},
    }
    _finish(tmp, out, manifest)


def _build_lora(size: str, seed: int, recipe: Recipe, device: str, progress: bool) -> None:
    _check_pinned()
    base, out = base_dir(size, recipe), zoo_dir(size, seed, recipe) / "lora"
    tmp = _partial(out)
    start = time.perf_counter()
    jobs = [("lora", cat, base, tmp / cat, recipe, seed, device) for cat in CATEGORIES]
    manifest = {
        "zoo_id": zoo_id(size, seed, recipe),
        "models": _train_parallel(jobs, progress),
        "build_seconds": round(time.perf_counter() - start, 1),
        "workers": _workers(),
        "geometry": lora_geometry(base / "base", tmp),
        "files": {f"lora/{k}": v for k, v in _file_digests(tmp, ["."]).items()},
    }
    _finish(tmp, out, manifest)


def _train_parallel(jobs: list[tuple], progress: bool) -> dict[str, dict[str, Any]]:
    """Train the experts of ``jobs`` in parallel single-threaded processes (spawned, so each
    starts under the pinned environment); the bytes do not depend on the worker count."""
    jobs = [(*job, progress) for job in jobs]
    if _workers() == 1:
        return dict(_train_expert(job) for job in jobs)
    with ProcessPoolExecutor(_workers(), mp_context=get_context("spawn")) as pool:
        return dict(pool.map(_train_expert, jobs))


def _train_expert(job: tuple) -> tuple[str, dict[str, Any]]:
    """One expert from the base: fully fine-tuned (``full``) or a LoRA adapter (``lora``),
    on its own category plus a share of the pretraining mix, saved to ``dest``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.train import finetune, finetune_lora

    kind, cat, base, dest, recipe, seed, device, progress = job
    torch.set_num_threads(1)
    texts, general = _data(recipe)
    mix = _pretrain_mix(general, texts, recipe, derived_seed(recipe.base_seed, "base/mix"))
    data = _expert_mix(texts[cat], mix, recipe, derived_seed(seed, f"{kind}/{cat}/data"))
    tokenizer = AutoTokenizer.from_pretrained(base / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(base / "base", dtype=torch.float32)
    train_seed = derived_seed(seed, f"{kind}/{cat}/train")
    common = {
        "batch_size": recipe.expert_batch,
        "max_length": recipe.max_length,
        "seed": train_seed,
        "device": device,
        "progress": progress,
        "desc": f"zoo: {kind} {cat}",
        "pack": True,
    }
    if kind == "full":
        stats = finetune(
            model, tokenizer, data, steps=recipe.expert_steps, lr=recipe.expert_lr, **common
        )
        _save(model, tokenizer, dest)
        return cat, _entry(model, stats, train_seed)
    lora, stats = finetune_lora(
        model,
        tokenizer,
        data,
        r=recipe.lora_r,
        alpha=recipe.lora_alpha,
        steps=recipe.lora_steps,
        lr=recipe.lora_lr,
        **common,
    )
    lora.save_pretrained(dest)
    return f"lora_{cat}", _entry(lora, stats, train_seed, trainable=True)


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
    import torch
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
    rng = random.Random(derived_seed(seed, "pretrain/mix"))
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
    n = sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)
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


def _kernel_info() -> dict[str, Any]:
    import torch

    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **_cpu_identity(),
        "libc": "-".join(platform.libc_ver()),
        "python_full": platform.python_version(),
    }


def _cpu_identity() -> dict[str, str]:
    """The CPU's model name, ``vendor/family/model/stepping`` and a digest of its feature
    flags (two virtual machines can share a model name and differ in what they expose)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = " ".join(sorted(info.get("flags", "").split()))
    return {
        "processor": info.get("model name") or platform.processor() or "unknown",
        "cpu_id": "/".join(
            info.get(k, "?") for k in ("vendor_id", "cpu family", "model", "stepping")
        ),
        "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()[:12],
    }


def _texts_digest(texts: list[str]) -> str:
    """sha256 of a list of training texts (each length-prefixed, so no two lists collide)."""
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


# --------------------------------------------------------------------------- checks


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_digests(root: Path, parts: list[str]) -> dict[str, str]:
    """sha256 of the weight files (``*.safetensors``) under each part, or of the file itself."""
    out: dict[str, str] = {}
    for part in parts:
        path = root / part
        files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
        for f in files:
            out[f.relative_to(root).as_posix()] = _sha256(f)
    return dict(sorted(out.items()))


def expected_digests() -> dict[str, Any]:
    """The recorded sha256 of the zoos the README's numbers come from (by zoo id)."""
    try:
        return json.loads(EXPECTED_FILE.read_text())
    except FileNotFoundError:
        return {}


def compare_expected(
    zid: str,
    files: dict[str, str],
    environment: dict[str, Any] | None = None,
    inputs: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``files`` (built) against the recorded sha256 of the same files of zoo ``zid``:
    ``status`` ``matches``, ``differs`` or ``unrecorded``. A difference lists the differing
    files, the recorded environment, what of it differs from ``environment`` (the build's)
    as ``{key: [recorded, built]}``, and which training ``inputs`` differ from the recorded
    ones (none means the same data went into a different computation)."""
    record = expected_digests().get(zid)
    if not record:
        return {"status": "unrecorded"}
    want = {k: v for k, v in record["files"].items() if k in files}
    if not want:
        return {"status": "unrecorded"}
    differing = sorted(k for k, v in want.items() if files.get(k) != v)
    out: dict[str, Any] = {"status": "differs" if differing else "matches"}
    if differing:
        expected_env = record.get("environment", {})
        built = environment or {}
        out["differing"] = differing
        out["expected_environment"] = expected_env
        out["environment_differences"] = {
            k: [v, built.get(k)] for k, v in expected_env.items() if built.get(k) != v
        }
        recorded_inputs, built_inputs = record.get("inputs", {}), inputs or {}
        out["inputs_differing"] = sorted(
            k for k, v in recorded_inputs.items() if k in built_inputs and built_inputs[k] != v
        )
    return out


_REPORTED: set[str] = set()


def _report_once(manifest_path: Path) -> None:
    """Print, once per process and build, when a built zoo part is not the recorded one."""
    if str(manifest_path) in _REPORTED:
        return
    _REPORTED.add(str(manifest_path))
    manifest = json.loads(manifest_path.read_text())
    zid = manifest["zoo_id"]
    status = compare_expected(
        zid, manifest["files"], manifest["environment"], manifest.get("inputs")
    )
    if status["status"] != "differs":
        return
    changed = status["environment_differences"]
    versions = {k: v for k, v in changed.items() if k in FLOAT_PACKAGES}
    if status["inputs_differing"]:
        cause = f"its training inputs differ from the recorded ones ({status['inputs_differing']})"
    elif versions:
        cause = f"package versions differ from the recorded build's (recorded, here): {versions}"
    elif changed:
        cause = f"the packages match, so this CPU's kernels differ (recorded, here): {changed}"
    else:
        cause = "yet nothing recorded about the environment differs (please report this)"
    print(
        f"[mergelab] NOTE: zoo {zid} built here differs from the recorded build in "
        f"{len(status['differing'])} file(s) ({', '.join(status['differing'][:4])}); {cause}. "
        "Scores on this zoo are consistent with each other but will not equal the README's "
        "tables: compare methods within runs on this zoo, not against numbers from elsewhere.",
        file=sys.stderr,
        flush=True,
    )


# --------------------------------------------------------------------------- geometry


def task_vector_geometry(base: Path, experts: Path) -> dict[str, Any]:
    """Pairwise cosine of the full experts' task vectors, ‖τk‖, ‖θ0‖ and ‖τk‖/‖θ0‖."""
    import torch
    from safetensors.torch import load_file

    theta0 = load_file(base / "model.safetensors")
    taus = {}
    for cat in CATEGORIES:
        exp = load_file(experts / cat / "model.safetensors")
        taus[cat] = torch.cat([(exp[k].double() - v.double()).flatten() for k, v in theta0.items()])
    return _geometry(theta0, taus)


def lora_geometry(base: Path, lora: Path) -> dict[str, Any]:
    """The same geometry for the LoRA experts' materialised deltas s·B·A."""
    import torch
    from safetensors.torch import load_file

    theta0 = load_file(base / "model.safetensors")
    taus = {}
    for cat in CATEGORIES:
        cfg = json.loads((lora / cat / "adapter_config.json").read_text())
        raw = load_file(lora / cat / "adapter_model.safetensors")
        deltas = {}
        for key, a in raw.items():
            if ".lora_A." in key:
                name = re.sub(r"^base_model\.model\.", "", key).replace(".lora_A.weight", ".weight")
                b = raw[key.replace(".lora_A.", ".lora_B.")]
                deltas[name] = (b.double() @ a.double()) * (cfg["lora_alpha"] / cfg["r"])
        taus[cat] = torch.cat(
            [
                deltas.get(k, torch.zeros(v.shape, dtype=torch.float64)).flatten()
                for k, v in theta0.items()
            ]
        )
    return _geometry(theta0, taus)


def _geometry(theta0: dict[str, Any], taus: dict[str, Any]) -> dict[str, Any]:
    import torch

    flat0 = torch.cat([v.flatten().double() for v in theta0.values()])
    cos = {
        f"{a}|{b}": round(float(torch.nn.functional.cosine_similarity(taus[a], taus[b], dim=0)), 4)
        for i, a in enumerate(CATEGORIES)
        for b in CATEGORIES[i + 1 :]
    }
    return {
        "cosine": cos,
        "relative_norm": {c: round(float(t.norm() / flat0.norm()), 4) for c, t in taus.items()},
        "norm": {c: round(float(t.norm()), 4) for c, t in taus.items()},
        "base_norm": round(float(flat0.norm()), 4),
    }


def with_overrides(size: str, **kw: Any) -> Recipe:
    """The named recipe with some fields changed (for experiments and tests)."""
    return replace(_recipe(size), **kw)


# --------------------------------------------------------------------------- CLI


def record_expected(size: str, seed: int) -> dict[str, Any]:
    """Record the built zoo's files (base, experts and, if built, LoRA experts) in
    :data:`EXPECTED_FILE` as the reference build, under its zoo id and its base's id
    (maintainers do this when the recipe or the lock changes)."""
    root = zoo_dir(size, seed)
    manifest = json.loads((root / "manifest.json").read_text())
    files = dict(manifest["files"])
    if (root / "lora" / "manifest.json").is_file():
        files.update(json.loads((root / "lora" / "manifest.json").read_text())["files"])
    env = {k: manifest["environment"].get(k) for k in RECORDED_ENVIRONMENT}
    inputs = manifest.get("inputs", {})
    entry = {"environment": env, "inputs": inputs, "files": dict(sorted(files.items()))}
    base_files = {k: v for k, v in files.items() if k.startswith(("base/", "tokenizer/"))}
    expected = expected_digests()
    expected[manifest["zoo_id"]] = entry
    expected[manifest["base"]["zoo_id"]] = {
        "environment": env,
        "inputs": inputs,
        "files": base_files,
    }
    EXPECTED_FILE.write_text(json.dumps(dict(sorted(expected.items())), indent=2) + "\n")
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.zoo", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (
        ("build", "build (or reuse) a zoo and print its directory"),
        ("record", "record a built zoo's sha256 in harness/zoo_expected.json"),
        ("_child", "internal: build one part under the pinned environment"),
    ):
        p = sub.add_parser(name, help=text)
        if name == "_child":
            p.add_argument("part", choices=["base", "experts", "lora"])
            p.add_argument("--recipe", required=True)
        p.add_argument("--size", default="xs")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="cpu")
        p.add_argument("--lora", action="store_true", help="also build the LoRA experts")
        p.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    progress = not args.no_progress
    if args.command == "_child":
        names = {f.name for f in fields(Recipe)}
        recipe = Recipe(**{k: v for k, v in json.loads(args.recipe).items() if k in names})
        build = {"base": _build_base, "experts": _build_experts, "lora": _build_lora}[args.part]
        build(args.size, args.seed, recipe, args.device, progress)
    elif args.command == "build":
        root = build_zoo(args.size, args.seed, device=args.device, progress=progress)
        if args.lora:
            build_lora(args.size, args.seed, device=args.device, progress=progress)
        print(root)
    else:
        print(json.dumps(record_expected(args.size, args.seed), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
