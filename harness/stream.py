"""The tensor-by-tensor executor and the sharded HF checkpoint writer.

``execute`` drives a method over a pool: its statistics passes, then the merge pass. Each
step holds one tensor of the base and of each expert (upcast to float32 on the compute
device) and the merged result, so peak memory is a few tensors plus the writer's shard
buffer. Merged tensors go to a sink: a dict (in-memory merge, for models that fit) or
``ShardedCheckpointWriter`` (a directory ``from_pretrained`` and ``lm_eval --model hf``
load unchanged).

Every member tensor is checked for NaN/inf when read (``ModelPool.tensor``: a
``NonFiniteMemberError`` naming the member, tensor and file), before the method sees it;
so NaN/inf in a merged tensor (``NonFiniteError``) comes from finite inputs, and the error
points at the method's hyperparameters.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from core.sources import NonFiniteError, parse_dtype
from harness.pool import ModelPool
from harness.records import worker_suffix
from methods.base import FitContext, MergeMethod

Sink = Callable[[str, Tensor], None]


def execute(
    pool: ModelPool,
    method: MergeMethod,
    sink: Sink,
    *,
    seed: int,
    device: str = "cpu",
    progress: bool = True,
    fit_context: FitContext | None = None,
    fit_cache: Callable[[MergeMethod, FitContext], object] | None = None,
) -> str:
    """Run ``method`` over ``pool`` tensor by tensor; return the merged weights' sha256.

    A data-dependent method first learns from ``fit_context`` (its ``fit``, or through
    ``fit_cache(method, fit_context)``, which may restore a cached fit). Tensors kept
    from the base (excluded or non-floating) are passed through unchanged. Every tensor
    read (base, experts, kept tensors) is checked finite first (``NonFiniteMemberError``);
    a merged tensor with NaN/inf raises ``NonFiniteError``.
    The hash covers every tensor's name, dtype, shape and bytes in checkpoint order, so
    equal hashes mean bit-identical weights.
    """
    out_dtype = parse_dtype(pool.dtype)
    names = pool.tensor_names()
    merged_names = [n for n in names if pool.is_merged(n)]
    method.setup(pool.expert_names, seed)
    if method.needs_data:
        if fit_context is None:
            raise ValueError(f"{method.name} learns from data and needs a FitContext")
        if fit_cache is None:
            method.fit(fit_context)
        else:
            fit_cache(method, fit_context)

    def loaded(name: str) -> tuple[Tensor, dict[str, Tensor]]:
        base, experts = pool.tensors(name)
        return _f32(base, device), {k: _f32(v, device) for k, v in experts.items()}

    for p in range(method.stat_passes):
        for name in tqdm(
            merged_names,
            desc=f"stats pass {p + 1}/{method.stat_passes}",
            disable=not progress,
            leave=False,
        ):
            method.observe(p, name, *loaded(name))
        method.end_pass(p)

    digest = hashlib.sha256()
    for name in tqdm(names, desc=f"merge ({method.name})", disable=not progress, leave=False):
        if name in merged_names:
            base, experts = loaded(name)
            dtype = out_dtype or pool.sources["base"].dtype(name)
            result = method.merge_tensor(name, base, experts).to(dtype)
            if not torch.isfinite(result).all():  # checked in the output dtype: fp16 overflows
                raise NonFiniteError(
                    f"{method.name} produced NaN/inf in tensor {name!r} from finite members "
                    "(every member tensor is checked as it is read), so the method's "
                    "hyperparameters are the likely cause: e.g. a scaling or weights large "
                    f"enough to overflow {dtype}. Lower them (the method.* options) and run again."
                )
            result = result.cpu()
        else:
            result = pool.tensor("base", name)
            if out_dtype is not None and result.is_floating_point():
                result = result.to(out_dtype)
        result = result.contiguous()
        digest.update(f"{name}|{result.dtype}|{tuple(result.shape)}|".encode())
        digest.update(_bytes(result))
        sink(name, result)
    return digest.hexdigest()


def _f32(t: Tensor, device: str) -> Tensor:
    return t.to(device=device, dtype=torch.float32)


def _bytes(t: Tensor) -> bytes:
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def parse_size(size: str | int) -> int:
    """'500MB' / '2GB' / bytes → bytes (the ``max_shard_size`` option)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    s = str(size).strip().upper()
    try:
        for unit, mult in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("B", 1)):
            if s.endswith(unit):
                s, scale = s[: -len(unit)], mult
                break
        else:
            scale = 1
        n = int(float(s) * scale)
    except ValueError:
        n = 0
    if n <= 0:
        raise ValueError(
            f"max_shard_size={size!r} is not a size: use e.g. 1GB, 500MB or a byte count"
        )
    return n


class ShardedCheckpointWriter:
    """Writes tensors into safetensors shards + index, then config, tokenizer and card.

    Everything goes to this writer's own ``<out>.partial-<host>-<pid>-<token>`` (workers
    sharing a runs directory never share one); ``close`` completes it there and
    :meth:`swap_in` later renames it to ``out``, so an interrupted write never leaves a
    directory that looks complete, and the caller decides when ``out`` changes.
    """

    def __init__(self, out_dir: Path, max_shard_size: str | int = "1GB"):
        self.out_dir = Path(out_dir)
        self.tmp = self.out_dir.with_name(f"{self.out_dir.name}.partial-{worker_suffix()}")
        self.tmp.mkdir(parents=True)
        self.max_bytes = parse_size(max_shard_size)
        self.buffer: dict[str, Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def __call__(self, name: str, tensor: Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + size > self.max_bytes:
            self._flush()
        self.buffer[name] = tensor
        self.buffer_bytes += size
        self.total += size

    def _flush(self) -> None:
        idx = len(self.shards)
        save_file(self.buffer, self.tmp / f"shard-{idx:05d}.tmp", metadata={"format": "pt"})
        self.shards.append(list(self.buffer))
        self.buffer, self.buffer_bytes = {}, 0

    def close(self, pool: ModelPool, card: str) -> Path:
        """Finish shards and index; add config, generation config, tokenizer and card.
        Returns the completed partial directory (loadable with ``from_pretrained``)."""
        if self.buffer:
            self._flush()
        n = len(self.shards)
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.tmp / f"shard-{i:05d}.tmp", self.tmp / final)
            weight_map.update({k: final for k in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = pool.config_json()
        if pool.dtype:
            config["dtype"] = pool.dtype
            config.pop("torch_dtype", None)
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2))
        gen = pool.base_dir / "generation_config.json"
        if gen.is_file():
            shutil.copy(gen, self.tmp / gen.name)
        for f in pool.tokenizer_files():
            shutil.copy(f, self.tmp / f.name)
        (self.tmp / "README.md").write_text(card)
        return self.tmp

    def swap_in(self) -> Path:
        """Replace ``out`` by the closed partial directory with two renames (a directory
        cannot be renamed over a full one): the old ``out`` is set aside as
        ``<out>.old-<host>-<pid>-<token>``, the partial takes its name, the old is deleted.
        ``out`` is missing only between the two renames, and is never incomplete."""
        aside = self.out_dir.with_name(f"{self.out_dir.name}.old-{worker_suffix()}")
        with suppress(FileNotFoundError):
            os.rename(self.out_dir, aside)
        os.rename(self.tmp, self.out_dir)
        shutil.rmtree(aside, ignore_errors=True)
        return self.out_dir


def model_card(record: dict[str, Any]) -> str:
    """A model card recording how the checkpoint was merged."""
    import yaml

    body = yaml.safe_dump(
        {"method": record["method"], "pool": record["pool"], "seed": record["seed"]},
        sort_keys=False,
    )
    return (
        "---\nlibrary_name: transformers\ntags: [mergelab, merge]\n---\n"
        f"# Merged with mergelab\n\nCell `{record['cell_id']}`. Merge configuration:\n\n"
        f"```yaml\n{body}```\n"
    )
