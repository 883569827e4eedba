"""The model pool: a base plus named experts, with lazy per-tensor access.

Members are Hugging Face checkpoints (a local directory or a hub id, safetensors shards
preferred, ``pytorch_model.bin`` read with ``weights_only=True``) or PEFT LoRA adapters over
the base. A LoRA expert's tensors are materialised one at a time as W0 + s·B·A, so a
LoRA expert streams like a full one.

``check_compatible`` runs before any merging and stops with an error naming the tensors
or tokens and the fix: different architectures, tensor names, shapes or vocabularies, a
different token→id mapping, or different bos/eos/pad/unk tokens. The ``model`` config is
validated when it is read (``from_config``): every error names its option and the fix.

Broken members fail loudly, naming the member, the file and the fix: an unreadable
checkpoint (truncated or corrupted safetensors header, a file shorter than its header says,
an unreadable index) is a ``PoolError`` when the pool is opened (every shard's header is read
then), and a tensor holding NaN/inf is a ``NonFiniteMemberError`` when it is read
(:meth:`ModelPool.tensor`), before any method sees it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
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
    member_label,
    parse_dtype,
    reading,
)

# A directory holding none of these has no tokenizer (chat_template.jinja etc. alone do not
# make one).
_VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
_SPECIAL_TOKENS = ("bos", "eos", "pad", "unk")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


def resolve_checkpoint(path: str, revision: str | None = None, option: str = "model path") -> Path:
    """A local directory as is; a built-in zoo member (``zoo:...``, see
    :func:`harness.zoo.resolve_uri`) built on first use; otherwise a hub id fetched
    through the HF cache. ``option`` is the config key that named ``path`` (in errors)."""
    if path.startswith("zoo:"):
        from harness.zoo import resolve_uri

        return resolve_uri(path)
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if local.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1:
        found = "a file" if local.exists() else "nothing"
        raise PoolError(
            f"{option}={path!r} is not a directory ({found} is there): point it at a local "
            "checkpoint directory (a HF checkpoint, or a PEFT adapter for 'adapter') or a hub id"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(path, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as err:  # network, auth, missing repo: all end the same way for the user
        raise PoolError(
            f"{option}={path!r} is neither a local directory nor a hub id that could be "
            f"fetched ({type(err).__name__}: {err}). Download it first (huggingface-cli "
            f"download {path}) or set {option} to a local checkpoint directory."
        ) from err


@dataclass
class Member:
    """One pool member as configured."""

    name: str
    path: str | None = None
    adapter: str | None = None
    revision: str | None = None
    tasks: list[str] = field(default_factory=list)

    @property
    def option(self) -> str:
        """Its config key, named in errors."""
        return "model.base" if self.name == "base" else f"model.experts.{self.name}"


def _special(tokenizer: Any, kind: str) -> str:
    """A special token as ``'</s>' (id 2)``, ``None`` when the tokenizer has none."""
    token = getattr(tokenizer, f"{kind}_token")
    return f"{token!r} (id {getattr(tokenizer, f'{kind}_token_id')})" if token else "None"


def _exclude_patterns(value: Any) -> list[str]:
    """``model.exclude`` as a list of regexes, each checked to compile when the config is
    read. A bare string is refused: ``list()`` would split it into one-character patterns
    that exclude nearly everything."""
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise PoolError(
            f"model.exclude={value!r} must be a list of regexes: model.exclude=[{value}]"
        )
    for i, pattern in enumerate(value):
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise PoolError(
                f"model.exclude[{i}]={pattern!r} is not a valid regex ({err}): fix the "
                "pattern, escaping characters meant literally with a backslash (\\[, \\., \\()"
            ) from err
    return list(value)


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
        b = cfg.get("base")
        if not isinstance(b, Mapping) or not b.get("path"):
            raise PoolError(
                "model.base.path is required: model.base.path=DIR (a local HF checkpoint dir) "
                "or a hub id"
            )
        experts_cfg = cfg.get("experts") or {}
        if not isinstance(experts_cfg, Mapping):
            raise PoolError(
                f"model.experts={experts_cfg!r} must map names to members: "
                "model.experts.<name>.path=DIR (or .adapter=PEFT_DIR)"
            )
        if not experts_cfg and require_experts:
            raise PoolError(
                "model.experts is empty: this method merges experts, so the pool needs at "
                "least one (model.experts.<name>.path=DIR or .adapter=PEFT_DIR)"
            )
        experts = []
        for name, e in experts_cfg.items():
            e = e or {}
            if not isinstance(e, Mapping) or bool(e.get("path")) == bool(e.get("adapter")):
                raise PoolError(
                    f"model.experts.{name} needs exactly one of 'path' (full checkpoint) "
                    f"or 'adapter' (PEFT LoRA over the base), not {e!r}: "
                    f"model.experts.{name}.path=DIR or model.experts.{name}.adapter=PEFT_DIR"
                )
            if isinstance(e.get("tasks"), str):
                raise PoolError(
                    f"model.experts.{name}.tasks={e['tasks']!r} must be a list of task names: "
                    f"model.experts.{name}.tasks=[{e['tasks']}]"
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
        pool = cls(
            name=str(cfg.get("name") or "pool"),
            base=Member(name="base", path=b["path"], revision=b.get("revision")),
            experts=experts,
            dtype=cfg.get("dtype"),
            exclude=_exclude_patterns(cfg.get("exclude")),
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
        base_dir = resolve_checkpoint(
            self.base.path, self.base.revision, f"{self.base.option}.path"
        )
        self.dirs["base"] = base_dir
        base_src = CheckpointSource(base_dir, "base")
        self.sources["base"] = base_src
        for e in self.experts:
            if e.adapter:
                option = f"{e.option}.adapter"
                self.dirs[e.name] = resolve_checkpoint(e.adapter, e.revision, option)
                self.sources[e.name] = LoraSource(self.dirs[e.name], base_src, e.name)
            else:
                self.dirs[e.name] = resolve_checkpoint(e.path, e.revision, f"{e.option}.path")
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
        NaN/inf as it is read (:meth:`check_finite`), so a method that masks or drops
        entries (TIES, DARE) can never hide a corrupted member."""
        return self.check_finite(member, name, self.sources[member].get(name))

    def check_finite(self, member: str, name: str, tensor: Tensor) -> Tensor:
        """``tensor`` (member ``member``'s ``name``, or a float copy of it) if it holds no
        NaN/inf, else a ``NonFiniteMemberError`` naming the member, tensor and file.

        One ``aminmax`` reduction decides (NaN propagates to both ends, ±inf shows at
        one): vectorised and free of the boolean mask ``isfinite`` would allocate; the
        count of bad values is computed only for the error."""
        if not tensor.is_floating_point() or tensor.numel() == 0:
            return tensor
        low, high = torch.aminmax(tensor)
        if torch.isfinite(low) and torch.isfinite(high):
            return tensor
        bad = int((~torch.isfinite(tensor)).sum())
        src = self.sources[member]
        lora = " (materialised as W0 + s·B·A)" if isinstance(src, LoraSource) else ""
        raise NonFiniteMemberError(
            f"pool member {member!r} holds NaN/inf in tensor {name!r}{lora}: {bad} of "
            f"{tensor.numel()} values, read from {src.file(name)}. That "
            "checkpoint is corrupted (or was saved from a diverged training run): "
            "re-download or rebuild it, then run again."
        )

    def tensors(self, name: str) -> tuple[Tensor, dict[str, Tensor]]:
        """The base's and every expert's value of tensor ``name``, each checked finite."""
        return self.tensor("base", name), {e: self.tensor(e, name) for e in self.expert_names}

    def config_json(self, member: str = "base") -> dict[str, Any]:
        """``member``'s config.json; a missing or torn file is a ``PoolError`` naming it."""
        who = member_label(member, self.dirs[member])
        path = self.dirs[member] / "config.json"
        if not path.is_file():
            raise PoolError(
                f"{who} has no config.json, so it is not a HF checkpoint: save the model with "
                "save_pretrained (it writes config.json beside the weights), or copy in the "
                "config.json of the model it was fine-tuned from."
            )
        with reading(who, path, json.JSONDecodeError, UnicodeDecodeError):
            return json.loads(path.read_text())

    def check_compatible(self) -> None:
        """Stop before any work if the members cannot be merged tensor by tensor: every
        full expert's architecture, tensor names and shapes first (cheap), then its
        tokenizer against the base's (loads both)."""
        base_cfg = self.config_json()
        full = [e.name for e in self.experts if not e.adapter]  # a LoRA expert is the base
        for expert in full:  # plus a delta: its names and shapes are checked when it opens
            self._check_tensors(expert, base_cfg)
        with_tokenizer = [e for e in full if self.has_tokenizer(e)]
        if with_tokenizer:
            base_tokenizer = self.tokenizer()
            for expert in with_tokenizer:
                self._check_tokenizer(expert, base_tokenizer)

    def _check_tensors(self, expert: str, base_cfg: dict[str, Any]) -> None:
        base = self.sources["base"]
        base_names = set(base.names)
        cfg = self.config_json(expert)
        for key in ("model_type", "architectures"):
            if cfg.get(key) != base_cfg.get(key):
                raise PoolError(
                    f"expert {expert!r} has {key}={cfg.get(key)!r} but the base has "
                    f"{base_cfg.get(key)!r}: experts must be fine-tunes of the same "
                    f"architecture as the base; set model.experts.{expert}.path to one, or "
                    "drop the expert."
                )
        src = self.sources[expert]
        names = set(src.names)
        missing = sorted(n for n in base_names - names if self.is_merged(n))
        extra = sorted(names - base_names)
        if missing or extra:
            raise PoolError(
                f"expert {expert!r} tensor names differ from the base: missing "
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
                f"expert {expert!r} does not match the base: vocab_size {vocab[0]} vs "
                f"{vocab[1]}; tensor shapes {few(shapes)}. Experts must be fine-tunes of the "
                "base (same config). If only the vocabulary differs, merge the backbone alone "
                "with model.exclude=['embed_tokens','lm_head'] (those tensors are then kept "
                "from the base), or resize the expert's embeddings to the base tokenizer first."
            )

    def has_tokenizer(self, member: str) -> bool:
        """Whether ``member``'s directory holds a tokenizer (a file that defines a vocabulary)."""
        return any((self.dirs[member] / f).is_file() for f in _VOCAB_FILES)

    def tokenizer(self, member: str = "base") -> Any:
        """``member``'s tokenizer (the base's is the merged model's). Loaded with
        AutoTokenizer, so every tokenizer format is compared the same way; a missing or
        unloadable tokenizer is a ``PoolError`` naming the member, the directory and the fix."""
        from transformers import AutoTokenizer

        directory = self.dirs[member]
        who = member_label(member, directory)
        if not self.has_tokenizer(member):
            raise PoolError(
                f"{who} has no tokenizer (none of {list(_VOCAB_FILES)}): the merged model is "
                "scored and saved with the base's tokenizer, so copy the tokenizer the base "
                f"was trained with into {directory} (tokenizer.save_pretrained)."
            )
        try:
            return AutoTokenizer.from_pretrained(
                directory, trust_remote_code=self.trust_remote_code
            )
        except Exception as err:  # a torn or unsupported tokenizer: whatever its loader raises
            raise PoolError(
                f"{who}: cannot load its tokenizer ({type(err).__name__}: {err}). Re-download "
                f"or re-save it (tokenizer.save_pretrained) into {directory}."
            ) from err

    def _check_tokenizer(self, expert: str, base: Any) -> None:
        """The expert's token→id mapping must equal the base's (skipped when model.exclude
        keeps the embeddings from the base: the documented fix for a different vocabulary),
        and so must its bos/eos/unk tokens and ids (always: the merged model starts and stops
        with the base's, whichever tensors are merged). The pad token is compared only when
        both define one: fine-tunes often add one to a base without (Llama-2 and its chat,
        math and code fine-tunes), which changes no weight."""
        tok = self.tokenizer(expert)
        if not self._excludes_embeddings():
            va, vb = base.get_vocab(), tok.get_vocab()
            shared = sorted(va.keys() & vb.keys(), key=va.__getitem__)
            moved = [f"{t!r} base id {va[t]} vs {vb[t]}" for t in shared if va[t] != vb[t]]
            only = sorted(va.keys() ^ vb.keys())
            if moved or only:
                raise PoolError(
                    f"expert {expert!r} uses a different tokenizer vocabulary than the base: "
                    f"tokens with other ids {few(moved)}; tokens in only one of them "
                    f"{few(only)}. Token ids would not line up. Use experts fine-tuned from the "
                    "base's tokenizer, or merge the backbone alone with "
                    "model.exclude=['embed_tokens','lm_head']."
                )
        specials = [
            f"{s} base {_special(base, s)} vs {_special(tok, s)}"
            for s in _SPECIAL_TOKENS
            if _special(base, s) != _special(tok, s)
            and (s != "pad" or (base.pad_token and tok.pad_token))
        ]
        if specials:
            raise PoolError(
                f"expert {expert!r} has other special tokens than the base: {few(specials)}. "
                "The merged model starts, pads and stops with the base's tokenizer, not the "
                "one this expert was trained with. Use experts fine-tuned with the base's "
                f"special tokens (if this one was, set them in {self.dirs[expert]}/"
                "tokenizer_config.json), or drop the expert."
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
