"""Tensor sources: one checkpoint or one LoRA adapter over a base, read tensor by tensor.

Checkpoints are Hugging Face directories (hub ids are resolved to directories by the
pool): safetensors shards preferred, ``pytorch_model.bin`` read with ``weights_only=True``
(a pickle holding anything but tensors is refused, never unpickled). A LoRA adapter's
tensors are materialised one at a time as W0 + s·B·A (added in float32, rounded once), so
a LoRA expert streams like a full one.

Broken files fail loudly when the source is opened (every shard's header is read then):
a ``PoolError`` naming the member, the file and the fix.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = (
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
_BAD_BIN = (RuntimeError, EOFError, OSError)


def member_label(member: str | None, directory: Path) -> str:
    return f"pool member {member!r} ({directory})" if member else f"checkpoint {directory}"


@contextmanager
def reading(who: str, path: Path, *errors: type[BaseException]) -> Iterator[None]:
    """Turn a failure to read ``path`` (a ``SafetensorError``, or one of ``errors``) into a
    ``PoolError`` naming the member, the file, the underlying error and the fix."""
    try:
        yield
    except (SafetensorError, *errors) as err:
        raise PoolError(
            f"{who}: cannot read {path} ({type(err).__name__}: {err}). {_REFETCH}"
        ) from err


def load_bin(who: str, path: Path) -> dict[str, Tensor]:
    """A ``.bin`` state dict through ``torch.load(weights_only=True)``, memory-mapped when it
    is in torch's zip format (a legacy pre-1.6 file cannot be mapped, so it is read whole).
    A pickle the weights-only unpickler refuses is a ``PoolError`` naming the file, the
    refused object and the conversion fix; a truncated file is named as broken."""
    with reading(who, path, *_BAD_BIN):
        try:
            return torch.load(
                path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
            )
        except pickle.UnpicklingError as err:
            refused = re.search(r"WeightsUnpickler error: ([^\n]*)", str(err))
            converted = path.name.replace("pytorch_model", "model").replace(".bin", ".safetensors")
            raise PoolError(
                f"{who}: {path} was refused by torch.load(weights_only=True) "
                f"({refused.group(1) if refused else err}): the file pickles objects other "
                "than tensors (or its pickle is corrupted), and mergelab never unpickles "
                "arbitrary objects. If you trust the file, convert it once to safetensors "
                "(safetensors.torch.save_file(torch.load(path, weights_only=False), "
                f"'{converted}') in its directory) and remove the .bin; otherwise "
                "re-download it."
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
        self._who = member_label(member, directory)
        self._where: dict[str, Path] = {}
        self._bin: dict[str, Tensor] = {}
        self._bin_file: dict[str, Path] = {}
        index = directory / "model.safetensors.index.json"
        single = directory / "model.safetensors"
        if index.is_file():
            bad_index = (
                json.JSONDecodeError,
                UnicodeDecodeError,
                KeyError,
                TypeError,
                AttributeError,
            )
            with reading(self._who, index, *bad_index):
                weight_map = json.loads(index.read_text())["weight_map"]
                self._where = {k: directory / v for k, v in weight_map.items()}
            missing = sorted({str(p) for p in self._where.values() if not p.is_file()})
            if missing:
                raise PoolError(
                    f"{self._who}: {index} lists shards that are missing: {few(missing)}. "
                    "Copy or re-download the missing shards (for a hub id, delete it from the HF "
                    "cache first)."
                )
            for shard in sorted(set(self._where.values())):
                self._check_shard(shard, index)
        elif single.is_file():
            self._where = {k: single for k in self._keys(single)}
        else:
            bins = sorted(directory.glob("pytorch_model*.bin"))
            if not bins:
                raise PoolError(
                    f"{self._who} has no weights (model.safetensors, "
                    "model.safetensors.index.json or pytorch_model*.bin): point the member at "
                    "a complete checkpoint directory, or copy its weights there."
                )
            for b in bins:
                state = load_bin(self._who, b)
                self._bin.update(state)
                self._bin_file.update(dict.fromkeys(state, b))
        self.names = list(self._where or self._bin)
        if not self.names:
            raise PoolError(f"{self._who}: its weights hold no tensors. {_REFETCH}")
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}

    def _keys(self, path: Path) -> list[str]:
        with reading(self._who, path), safe_open(path, framework="pt") as f:
            return list(f.keys())

    def _check_shard(self, shard: Path, index: Path) -> None:
        absent = {k for k, p in self._where.items() if p == shard} - set(self._keys(shard))
        if absent:
            raise PoolError(
                f"{self._who}: {index} maps {few(sorted(absent))} to {shard}, which does not "
                f"hold them. {_REFETCH}"
            )

    def file(self, name: str) -> Path:
        return self._where[name] if self._where else self._bin_file[name]

    def get(self, name: str) -> Tensor:
        if not self._where:
            return self._bin[name]
        path = self._where[name]
        with reading(self._who, path), safe_open(path, framework="pt") as f:
            return f.get_tensor(name)

    def _info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        if name not in self._meta:
            if self._where:
                path = self._where[name]
                with reading(self._who, path), safe_open(path, framework="pt") as f:
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
SAFETENSORS_DTYPE_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


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
        who = member_label(member, adapter_dir)
        cfg_path = adapter_dir / "adapter_config.json"
        if not cfg_path.is_file():
            raise PoolError(
                f"{who} has no adapter_config.json, so it is not a PEFT LoRA adapter: point "
                "the expert's 'adapter' at the directory peft's save_pretrained wrote "
                "(adapter_config.json + adapter_model.safetensors), or use 'path' for a full "
                "checkpoint."
            )
        with reading(who, cfg_path, json.JSONDecodeError, UnicodeDecodeError):
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
        bad = [k for k in ("r", "lora_alpha") if not _positive_number(cfg.get(k))]
        if bad:
            raise PoolError(
                f"{who}: adapter {cfg_path} has no positive {' or '.join(bad)} "
                f"({', '.join(f'{k}={cfg.get(k)!r}' for k in bad)}); a LoRA adapter's config "
                "names both. Re-save the adapter with peft's save_pretrained."
            )
        r = cfg["r"]
        self.scaling = cfg["lora_alpha"] / (r**0.5 if cfg.get("use_rslora") else r)
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
        self.base = base
        self.names = base.names
        self.weights = adapter_dir / "adapter_model.safetensors"
        if self.weights.is_file():
            with reading(who, self.weights), safe_open(self.weights, framework="pt") as f:
                raw = {k: f.get_tensor(k) for k in f.keys()}
        elif (adapter_dir / "adapter_model.bin").is_file():
            self.weights = adapter_dir / "adapter_model.bin"
            raw = load_bin(who, self.weights)
        else:
            raise PoolError(
                f"{who} has no adapter_model.safetensors or adapter_model.bin: copy the "
                "adapter's weights next to its adapter_config.json (peft's save_pretrained "
                "writes both)."
            )
        self.pairs: dict[str, tuple[Tensor, Tensor]] = {}
        self.biases: dict[str, Tensor] = {}  # target bias name → lora_B's bias
        base_names = set(base.names)
        trained_on = (
            "List the adapter over the base it was trained on (its adapter_config.json says "
            f"base_model_name_or_path={cfg.get('base_model_name_or_path')!r}) as model.base."
        )

        def target(key: str, suffix: str, kind: str) -> str:
            name = re.sub(r"^base_model\.model\.", "", key).replace(suffix, f".{kind}")
            if name not in base_names:
                why = (
                    "the adapter was trained with lora_bias=True on a layer whose base has no bias"
                    if kind == "bias"
                    else "the adapter was trained on a different base model"
                )
                raise PoolError(
                    f"{who}: adapter {self.weights} targets {name!r}, which the base does not "
                    f"have; {why}. {trained_on}"
                )
            return name

        for key, t in raw.items():
            if key.endswith(".lora_A.weight"):
                b_key = key.replace(".lora_A.", ".lora_B.")
                if b_key not in raw or raw[b_key].shape[1] != t.shape[0]:
                    raise PoolError(
                        f"{who}: adapter {self.weights} has {key!r} but no {b_key!r} of the "
                        f"same rank. {_REFETCH}"
                    )
                self.pairs[target(key, ".lora_A.weight", "weight")] = (t, raw[b_key])
            elif key.endswith(".lora_B.bias"):
                self.biases[target(key, ".lora_B.bias", "bias")] = t
            elif not key.endswith(".lora_B.weight"):
                raise PoolError(
                    f"{who}: adapter {self.weights} holds {key!r}, which is not a LoRA A/B "
                    f"weight or lora_B bias; mergelab does not implement that adapter feature. "
                    f"{_MERGE_FIRST}"
                )
        shapes = [
            f"{name}: base {base.shape(name)} vs adapter {delta}"
            for name, delta in self._delta_shapes()
            if delta != base.shape(name)
        ]
        if shapes:
            raise PoolError(
                f"{who}: adapter {self.weights} does not fit the base's shapes ({few(shapes)}); "
                f"the adapter was trained on a different base model. {trained_on}"
            )

    def _delta_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Each target's shape as the adapter would write it (s·B·A, or lora_B's bias)."""
        for name, (a, b) in self.pairs.items():
            delta = (b.shape[0], a.shape[1])
            yield name, delta[::-1] if self.fan_in_fan_out else delta
        for name, bias in self.biases.items():
            yield name, tuple(bias.shape)

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


def _positive_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def few(items: Sequence[str], n: int = 8) -> str:
    if not items:
        return "none"
    shown = ", ".join(items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}] ({len(items)} in all)"
