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
import pickle
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


class PoolError(ValueError):
    """A model pool that cannot be merged; the message names the problem and the fix."""


class NonFiniteError(ValueError):
    """A tensor holds NaN or inf."""


class NonFiniteMemberError(NonFiniteError, PoolError):
    """A pool member's tensor holds NaN or inf: its checkpoint is corrupted or broken."""


_REFETCH = (
    "The file is truncated or corrupted (an interrupted download or copy?): re-download "
    "that checkpoint (for a hub id, delete it from the HF cache first) or rebuild it, then "
    "run again."
)


# What torch.load raises on a truncated or corrupted pytorch_model.bin (OSError: mmap).
_BAD_BIN = (RuntimeError, EOFError, OSError, pickle.UnpicklingError)


def _who(member: str | None, directory: Path) -> str:
    return f"pool member {member!r} ({directory})" if member else f"checkpoint {directory}"


@contextmanager
def _reading(who: str, path: Path, *errors: type[BaseException]) -> Iterator[None]:
    """Turn a failure to read ``path`` (a ``SafetensorError``, or one of ``errors``) into a
    ``PoolError`` naming the member, the file, the underlying error and the fix."""
    try:
        yield
    except (SafetensorError, *errors) as err:
        raise PoolError(
            f"{who}: cannot read {path} ({type(err).__name__}: {err}). {_REFETCH}"
        ) from err


def parse_dtype(name: str | None) -> torch.dtype | None:
    """Config dtype name → torch dtype (``None`` keeps the checkpoint's own dtype)."""
    if name is None:
        return None
    if name not in DTYPES:
        raise PoolError(
            f"model.dtype={name!r} is not supported; use one of {sorted(DTYPES)} or null"
        )
    return DTYPES[name]


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


class TensorSource:
    """Lazy, read-only access to one member's state dict."""

    names: list[str]

    def get(self, name: str) -> Tensor:
        raise NotImplementedError

    def file(self, name: str) -> Path:
        """The file tensor ``name`` is read from (named in errors)."""
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def dtype(self, name: str) -> torch.dtype:
        raise NotImplementedError


class CheckpointSource(TensorSource):
    """Tensors of a HF checkpoint directory, read one at a time.

    Opening reads every safetensors header (not the payload), so a truncated or corrupted
    file, or an index naming tensors its shard lacks, fails here (``PoolError``) rather than
    mid-merge. ``member`` is the pool member's name, used in error messages.
    """

    def __init__(self, directory: Path, member: str | None = None):
        self.directory = directory
        self._who = _who(member, directory)
        self._where: dict[str, Path] = {}
        self._bin_file: dict[str, Path] = {}
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.is_file():
            bad_index = (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError)
            with _reading(self._who, index, *bad_index):
                weight_map = json.loads(index.read_text())["weight_map"]
                self._where = {k: directory / v for k, v in weight_map.items()}
            missing = sorted({p for p in self._where.values() if not p.is_file()})
            if missing:
                raise PoolError(f"{self._who} lists shards that are missing: {missing}")
            for shard in sorted(set(self._where.values())):
                self._check_shard(shard, index)
        elif single.is_file():
            self._where = {k: single for k in self._keys(single)}
        else:
            bins = sorted(directory.glob("pytorch_model*.bin"))
            if not bins:
                raise PoolError(
                    f"no weights in {directory}: expected model.safetensors, "
                    "model.safetensors.index.json or pytorch_model*.bin"
                )
            self._bin: dict[str, Tensor] = {}
            for b in bins:  # weights_only: never unpickle arbitrary objects
                with _reading(self._who, b, *_BAD_BIN):
                    state = torch.load(b, map_location="cpu", weights_only=True, mmap=True)
                self._bin.update(state)
                self._bin_file.update(dict.fromkeys(state, b))
        self.names = list(self._where) if self._where else list(self._bin)
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def _keys(self, path: Path) -> list[str]:
        with _reading(self._who, path), safe_open(path, framework="pt") as f:
            return list(f.keys())

    def _check_shard(self, shard: Path, index: Path) -> None:
        absent = {k for k, p in self._where.items() if p == shard} - set(self._keys(shard))
        if absent:
            raise PoolError(
                f"{self._who}: {index} maps {_few(sorted(absent))} to {shard}, which does not "
                f"hold them. {_REFETCH}"
            )

    def file(self, name: str) -> Path:
        return self._where[name] if self._where else self._bin_file[name]

    def get(self, name: str) -> Tensor:
        if not self._where:
            return self._bin[name]
        path = self._where[name]
        with _reading(self._who, path), safe_open(path, framework="pt") as f:
            return f.get_tensor(name)

    def _info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        if name not in self._meta:
            if self._where:
                path = self._where[name]
                with _reading(self._who, path), safe_open(path, framework="pt") as f:
                    sl = f.get_slice(name)
                    shape = tuple(sl.get_shape())
                    dtype = _SAFETENSORS_DTYPES[sl.get_dtype()]
            else:
                t = self._bin[name]
                shape, dtype = tuple(t.shape), t.dtype
            self._meta[name] = (shape, dtype)
        return self._meta[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        return self._info(name)[1]


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# LoraConfig keys whose value never changes the merged weights (bookkeeping, initialisation
# schemes, dropout); any other key set to a true value is a feature LoraSource would have
# to implement, so it refuses the adapter rather than merge it approximately.
_LORA_INERT_KEYS = frozenset(
    "task_type peft_type auto_mapping peft_version base_model_name_or_path revision "
    "inference_mode r target_modules exclude_modules lora_alpha lora_dropout fan_in_fan_out "
    "bias use_rslora init_lora_weights layers_to_transform layers_pattern megatron_core "
    "loftq_config eva_config corda_config lora_ga_config qalora_group_size runtime_config "
    "lora_bias ensure_weight_tying".split()
)


# The fix for any adapter LoraSource refuses.
_MERGE_FIRST = (
    "Merge it into a full checkpoint with peft's merge_and_unload() and list that directory "
    "as the expert's path instead"
)


class LoraSource(TensorSource):
    """A PEFT LoRA adapter applied to the base: W = W0 + s·B·A, one tensor at a time.

    s = lora_alpha / r (lora_alpha / sqrt(r) with ``use_rslora``). With ``lora_bias`` the
    adapter's ``lora_B`` bias b moves the base layer's bias: bias0 + s·b, as peft merges it.
    Deltas are added to the base in float32 and returned in float32: whoever consumes the
    tensor rounds it once to its output dtype (a bf16 base plus a LoRA delta is not
    rounded to bf16 first). Any adapter feature not implemented here (DoRA, rank/alpha
    patterns, ``modules_to_save``, ``target_parameters``, trained base biases, embedding
    LoRA, …: every LoraConfig key outside ``_LORA_INERT_KEYS`` set to a true value) is
    refused with an error rather than merged approximately. ``member`` is the pool member's
    name, used in error messages.
    """

    def __init__(self, adapter_dir: Path, base: TensorSource, member: str | None = None):
        who = _who(member, adapter_dir)
        cfg_path = adapter_dir / "adapter_config.json"
        if not cfg_path.is_file():
            raise PoolError(f"{who} has no adapter_config.json; is it a PEFT LoRA adapter?")
        with _reading(who, cfg_path, json.JSONDecodeError, UnicodeDecodeError):
            cfg = json.loads(cfg_path.read_text())
        unsupported = sorted(k for k, v in cfg.items() if v and k not in _LORA_INERT_KEYS)
        if cfg.get("bias", "none") != "none":
            unsupported.append(f"bias={cfg['bias']!r}")
        if cfg.get("peft_type", "LORA") != "LORA" or unsupported:
            raise PoolError(
                f"{who}: adapter {cfg_path} uses {cfg.get('peft_type')} {unsupported}, which "
                "mergelab does not implement: only plain LoRA (optionally with lora_bias) is "
                f"supported. {_MERGE_FIRST}"
            )
        r = cfg["r"]
        self.scaling = cfg["lora_alpha"] / (r**0.5 if cfg.get("use_rslora") else r)
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
        self.base = base
        self.names = base.names
        self.weights = adapter_dir / "adapter_model.safetensors"
        if self.weights.is_file():
            with _reading(who, self.weights), safe_open(self.weights, framework="pt") as f:
                raw = {k: f.get_tensor(k) for k in f.keys()}
        elif (adapter_dir / "adapter_model.bin").is_file():
            self.weights = adapter_dir / "adapter_model.bin"
            with _reading(who, self.weights, *_BAD_BIN):
                raw = torch.load(self.weights, map_location="cpu", weights_only=True)
        else:
            raise PoolError(f"{adapter_dir} has no adapter_model.safetensors or adapter_model.bin")
        self.pairs: dict[str, tuple[Tensor, Tensor]] = {}
        self.biases: dict[str, Tensor] = {}  # target bias name → lora_B's bias
        base_names = set(base.names)

        def target(key: str, suffix: str, kind: str) -> str:
            name = re.sub(r"^base_model\.model\.", "", key).replace(suffix, f".{kind}")
            if name not in base_names:
                why = (
                    "the adapter was trained with lora_bias=True on a layer whose base has no bias"
                    if kind == "bias"
                    else "was the adapter trained on a different base model?"
                )
                raise PoolError(
                    f"{who}: adapter {self.weights} targets {name!r}, which the base does not "
                    f"have; {why}"
                )
            return name

        for key, t in raw.items():
            if key.endswith(".lora_A.weight"):
                b_key = key.replace(".lora_A.", ".lora_B.")
                if b_key not in raw:
                    raise PoolError(f"{who}: adapter {self.weights} has {key!r} but no {b_key!r}")
                self.pairs[target(key, ".lora_A.weight", "weight")] = (t, raw[b_key])
            elif key.endswith(".lora_B.bias"):
                self.biases[target(key, ".lora_B.bias", "bias")] = t
            elif not key.endswith(".lora_B.weight"):
                raise PoolError(
                    f"{who}: adapter {self.weights} holds {key!r}, which is not a LoRA A/B "
                    f"weight or lora_B bias; mergelab does not implement that adapter feature. "
                    f"{_MERGE_FIRST}"
                )

    def file(self, name: str) -> Path:
        """The adapter's weights for a tensor it changes, else the base's file."""
        return self.weights if name in self.pairs or name in self.biases else self.base.file(name)

    def get(self, name: str) -> Tensor:
        """The base's tensor, or for a tensor the adapter changes W0 + s·B·A (a bias:
        bias0 + s·b) in float32, rounded by no one here."""
        w = self.base.get(name)
        if name in self.biases:
            return w.float() + self.biases[name].float() * self.scaling
        if name not in self.pairs:
            return w
        a, b = self.pairs[name]
        delta = (b.float() @ a.float()) * self.scaling
        if self.fan_in_fan_out:
            delta = delta.T
        return w.float() + delta

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)


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
    def from_config(cls, cfg: Mapping[str, Any]) -> ModelPool:
        """Build from the ``model`` config group (see conf/model/*.yaml)."""
        if not cfg.get("base") or not cfg["base"].get("path"):
            raise PoolError("model.base.path is required (a local HF checkpoint dir or a hub id)")
        experts_cfg = cfg.get("experts") or {}
        if not experts_cfg:
            raise PoolError("model.experts is empty: a pool needs at least one expert to merge")
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
                    f"{_few(missing)}, extra {_few(extra)}. Experts must share the base's "
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
                    f"{vocab[1]}; tensor shapes {_few(shapes)}. If only the vocabulary differs, "
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
                f"(differing tokens: {_few(diff)}); token ids would not line up. Use experts "
                "fine-tuned from the same base tokenizer, or merge the backbone alone with "
                "model.exclude=['embed_tokens','lm_head']."
            )

    def _excludes_embeddings(self) -> bool:
        return any(re.search(p, "model.embed_tokens.weight") for p in self.exclude)

    def tokenizer_files(self) -> Iterator[Path]:
        """The base's tokenizer files (copied into a saved merged checkpoint)."""
        for fname in _TOKENIZER_FILES:
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


def _few(items: Sequence[str], n: int = 8) -> str:
    if not items:
        return "none"
    shown = ", ".join(items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}] ({len(items)} in all)"
