"""The model pool: a base plus named experts, with lazy per-tensor access.

Members are Hugging Face checkpoints (a local directory or a hub id, safetensors shards
preferred, ``pytorch_model.bin`` read with ``weights_only=True``) or PEFT LoRA adapters over
the base. A LoRA expert's tensors are materialised one at a time as W0 + s·B·A, so a
LoRA expert streams like a full one.

``check_compatible`` runs before any merging and stops with an error naming the tensors
and the fix: different architectures, tensor names, shapes or vocabularies.

Broken members fail loudly, naming the member, the file and the fix: an unreadable
checkpoint (truncated or corrupted safetensors header, a file shorter than its header says,
an unreadable index) is a ``PoolError`` when the pool is opened (every shard's header is read
then), and a tensor holding NaN/inf is a ``NonFiniteMemberError`` when it is read
(:meth:`ModelPool.tensor`), before any method sees it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.sources import (
    TOKENIZER_FILES,
    CheckpointSource,
    LoraSource,
    NonFiniteMemberError,
    PoolError,
    TensorSource,
    few,
    parse_dtype,
)

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def resolve_checkpoint(path: str, revision: str | None = None) -> Path:
    """A local directory as is; a built-in zoo member (``zoo:...``, see
    :func:`harness.zoo.resolve_uri`) built on first use; otherwise a hub id fetched
    through the HF cache."""
    if path.startswith("zoo:"):
        from harness.zoo import resolve_uri

        return resolve_uri(path)
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise PoolError(f"model path {path!r} is not a directory; point it at a HF checkpoint dir")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as err:  # network, auth, missing repo: all end the same way for the user
        raise PoolError(
            f"{path!r} is neither a local directory nor a hub id that could be fetched "
            f"({type(err).__name__}: {err}). Download it first (huggingface-cli download "
            f"{path}) or set the member's path to a local checkpoint directory."
        ) from err


@dataclass
class Member:
    """One pool member as configured."""

    name: str
    path: str | None = None
    adapter: str | None = None
    revision: str | None = None
    tasks: list[str] = field(default_factory=list)


@dataclass
class ModelPool:
    """Base + experts, with the settings shared by every member."""

    name: str
    base: Member
    experts: list[Member]
    dtype: str | None = None
    exclude: list[str] = field(default_factory=list)
    trust_remote_code: bool = False
    seed: int | None = None  # the pool's own seed (a zoo replicate), recorded for the tables
    sources: dict[str, TensorSource] = field(default_factory=dict, repr=False)
    dirs: dict[str, Path] = field(default_factory=dict, repr=False)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], require_experts: bool = True) -> ModelPool:
        """Build from the ``model`` config group (see conf/model/*.yaml). A pool without
        experts is accepted only with ``require_experts=False`` (for a method that trains
        its own members from the base, ``MergeMethod.uses_experts``)."""
        if not cfg.get("base") or not cfg["base"].get("path"):
            raise PoolError("model.base.path is required (a local HF checkpoint dir or a hub id)")
        experts_cfg = cfg.get("experts") or {}
        if not experts_cfg and require_experts:
            raise PoolError(
                "model.experts is empty: this method merges experts, so the pool needs at "
                "least one (model.experts.<name>.path=DIR or .adapter=PEFT_DIR)"
            )
        experts = []
        for name, e in experts_cfg.items():
            e = dict(e or {})
            if bool(e.get("path")) == bool(e.get("adapter")):
                raise PoolError(
                    f"model.experts.{name} needs exactly one of 'path' (full checkpoint) "
                    "or 'adapter' (PEFT LoRA over the base)"
                )
            experts.append(
                Member(
                    name=name,
                    **{k: e.get(k) for k in ("path", "adapter", "revision")},
                    tasks=list(e.get("tasks") or []),
                )
            )
        if "base" in experts_cfg:
            raise PoolError("an expert may not be named 'base'; rename it in model.experts")
        b = cfg["base"]
        pool = cls(
            name=str(cfg.get("name") or "pool"),
            base=Member(name="base", path=b["path"], revision=b.get("revision")),
            experts=experts,
            dtype=cfg.get("dtype"),
            exclude=list(cfg.get("exclude") or []),
            trust_remote_code=bool(cfg.get("trust_remote_code", False)),
            seed=cfg.get("seed"),
        )
        parse_dtype(pool.dtype)
        return pool

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    def open(self) -> ModelPool:
        """Resolve every member and open lazy tensor access (no tensor is read yet)."""
        self.dirs["base"] = resolve_checkpoint(self.base.path, self.base.revision)
        base_src = CheckpointSource(self.dirs["base"], "base")
        self.sources["base"] = base_src
        for e in self.experts:
            if e.adapter:
                self.dirs[e.name] = resolve_checkpoint(e.adapter, e.revision)
                self.sources[e.name] = LoraSource(self.dirs[e.name], base_src, e.name)
            else:
                self.dirs[e.name] = resolve_checkpoint(e.path, e.revision)
                self.sources[e.name] = CheckpointSource(self.dirs[e.name], e.name)
        return self

    @property
    def base_dir(self) -> Path:
        return self.dirs["base"]

    def tensor_names(self) -> list[str]:
        """The base's tensor names, in checkpoint order."""
        return list(self.sources["base"].names)

    def is_merged(self, name: str) -> bool:
        """False for tensors kept from the base: excluded by pattern, or not floating point."""
        if any(re.search(p, name) for p in self.exclude):
            return False
        return self.sources["base"].dtype(name).is_floating_point

    def tensor(self, member: str, name: str) -> Tensor:
        """Member ``member``'s tensor ``name`` (a LoRA expert's as W0 + s·B·A), checked for
        NaN/inf as it is read: one ``isfinite`` pass, so a method that masks or drops
        entries (TIES, DARE) can never hide a corrupted member."""
        tensor = self.sources[member].get(name)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            src = self.sources[member]
            lora = " (materialised as W0 + s·B·A)" if isinstance(src, LoraSource) else ""
            raise NonFiniteMemberError(
                f"pool member {member!r} holds NaN/inf in tensor {name!r}{lora}: {bad} of "
                f"{tensor.numel()} values, read from {src.file(name)}. That "
                "checkpoint is corrupted (or was saved from a diverged training run): "
                "re-download or rebuild it, then run again."
            )
        return tensor

    def tensors(self, name: str) -> tuple[Tensor, dict[str, Tensor]]:
        """The base's and every expert's value of tensor ``name``, each checked finite."""
        return self.tensor("base", name), {e: self.tensor(e, name) for e in self.expert_names}

    def config_json(self, member: str = "base") -> dict[str, Any]:
        path = self.dirs[member] / "config.json"
        if not path.is_file():
            raise PoolError(f"{self.dirs[member]} has no config.json; is it a HF checkpoint?")
        return json.loads(path.read_text())

    def check_compatible(self) -> None:
        """Stop before any work if the members cannot be merged tensor by tensor."""
        base_cfg = self.config_json()
        base = self.sources["base"]
        base_names = set(base.names)
        for e in self.experts:
            if e.adapter:
                continue  # a LoRA expert is the base plus a delta: names and shapes match
            cfg = self.config_json(e.name)
            for key in ("model_type", "architectures"):
                if cfg.get(key) != base_cfg.get(key):
                    raise PoolError(
                        f"expert {e.name!r} has {key}={cfg.get(key)!r} but the base has "
                        f"{base_cfg.get(key)!r}: experts must be fine-tunes of the same "
                        "architecture as the base"
                    )
            src = self.sources[e.name]
            names = set(src.names)
            missing = sorted(n for n in base_names - names if self.is_merged(n))
            extra = sorted(names - base_names)
            if missing or extra:
                raise PoolError(
                    f"expert {e.name!r} tensor names differ from the base: missing "
                    f"{few(missing)}, extra {few(extra)}. Experts must share the base's "
                    "architecture; to merge only the shared tensors, list the others in "
                    "model.exclude (regexes)."
                )
            shapes = [
                f"{n}: base {base.shape(n)} vs {src.shape(n)}"
                for n in base.names
                if self.is_merged(n) and base.shape(n) != src.shape(n)
            ]
            vocab = (base_cfg.get("vocab_size"), cfg.get("vocab_size"))
            vocab_differs = vocab[0] != vocab[1] and not self._excludes_embeddings()
            if shapes or vocab_differs:
                raise PoolError(
                    f"expert {e.name!r} does not match the base: vocab_size {vocab[0]} vs "
                    f"{vocab[1]}; tensor shapes {few(shapes)}. If only the vocabulary differs, "
                    "merge the backbone alone with model.exclude=['embed_tokens','lm_head'] "
                    "(those tensors are then kept from the base), or resize the expert's "
                    "embeddings to the base tokenizer first."
                )
            self._check_tokenizer(e.name)

    def _check_tokenizer(self, expert: str) -> None:
        a, b = self.dirs["base"] / "tokenizer.json", self.dirs[expert] / "tokenizer.json"
        if not (a.is_file() and b.is_file()) or self._excludes_embeddings():
            return
        va = json.loads(a.read_text()).get("model", {}).get("vocab")
        vb = json.loads(b.read_text()).get("model", {}).get("vocab")
        if va != vb:
            diff = sorted(set(va or {}) ^ set(vb or {}))
            raise PoolError(
                f"expert {expert!r} uses a different tokenizer vocabulary than the base "
                f"(differing tokens: {few(diff)}); token ids would not line up. Use experts "
                "fine-tuned from the same base tokenizer, or merge the backbone alone with "
                "model.exclude=['embed_tokens','lm_head']."
            )

    def _excludes_embeddings(self) -> bool:
        return any(re.search(p, "model.embed_tokens.weight") for p in self.exclude)

    def tokenizer_files(self) -> Iterator[Path]:
        """The base's tokenizer files (copied into a saved merged checkpoint)."""
        for fname in TOKENIZER_FILES:
            if (self.base_dir / fname).is_file():
                yield self.base_dir / fname

    def describe(self) -> dict[str, Any]:
        """The pool as recorded in result.json."""
        return {
            "name": self.name,
            **({} if self.seed is None else {"seed": self.seed}),
            "base": self.base.path,
            "experts": {
                e.name: {"path": e.path or e.adapter, "lora": bool(e.adapter), "tasks": e.tasks}
                for e in self.experts
            },
        }
