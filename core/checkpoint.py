"""Training resume checkpoints that are never unpickled: safetensors plus a JSON record.

A checkpoint at ``<dir>/<stem>.json`` is two files:

- ``<stem>.<sha256[:16]>.safetensors``: every tensor of the state (weights, optimizer
  moments and steps, RNG states as uint8 tensors, ...), named by its path in the state;
- ``<stem>.json``, the commit record: format, version, the tensor file's full sha256 and
  the rest of the state as JSON, each tensor replaced by ``{"__tensor__": name}``. Tuples
  and dicts with non-string keys (an optimizer's per-parameter state is keyed by int) are
  tagged, so ``read_checkpoint(p)`` gives back exactly the structure that was written.

Writing puts the tensors under a new content-addressed name (temp file, fsync, rename),
then replaces the record the same way: that rename commits the pair. A kill before it
leaves the previous record naming its own tensor file, which is only deleted after the
commit, so a reader never sees a mismatched pair. Reading parses JSON and safetensors
only, checks the sha256 and that the record and the tensor file name the same tensors,
and refuses a legacy ``<stem>.pt`` (a ``torch.save`` pickle, which could run code when
loaded) without opening it. Every refusal names the file and says how to start over.
The tensor file is held in memory as bytes, hashed and parsed from those same bytes (no
window between the check and the load): resume states are the trainable tensors of
small models or adapters, so this costs little.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

FORMAT = "mergelab-resume-checkpoint"
VERSION = 1
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_TAGS = (_TENSOR, _TUPLE, _ITEMS)


class CheckpointError(ValueError):
    """A checkpoint that is refused: legacy pickle, truncated, mismatched or malformed."""


def write_checkpoint(record: str | os.PathLike, state: Mapping[str, Any]) -> None:
    """Save ``state`` (nested dicts, lists, tuples, tensors and JSON scalars) as the
    checkpoint whose record is ``record``, replacing the previous one atomically. Tensors
    are copied to contiguous CPU memory first, so none aliases another in the file."""
    record = Path(record)
    record.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(dict(state), "", tensors)
    data = save_tensors(tensors)
    digest = hashlib.sha256(data).hexdigest()
    tensor_file = _tensor_file(record, digest)
    _write_atomic(tensor_file, data)
    body = {"format": FORMAT, "version": VERSION, "sha256": digest, "state": tree}
    _write_atomic(record, json.dumps(body).encode())
    for stale in record.parent.glob(f"{record.stem}.*.safetensors*"):  # and killed temps
        if stale != tensor_file:
            stale.unlink()


def read_checkpoint(record: str | os.PathLike) -> dict[str, Any] | None:
    """The state saved by :func:`write_checkpoint` at ``record``, or None when there is no
    record. Raises :class:`CheckpointError` for a legacy pickle checkpoint next to it or a
    record and tensor file that are unreadable or do not match."""
    record = Path(record)
    legacy = record.with_suffix(".pt")
    if legacy.exists():
        raise CheckpointError(
            f"{legacy} is a checkpoint in the old pickle format, which is never loaded "
            f"(unpickling a file can run code); delete it to restart training from scratch"
        )
    if not record.is_file():
        return None
    fix = f"delete {record.parent / record.stem}.* to restart training from scratch"
    try:
        body = json.loads(record.read_bytes())
        digest = body["sha256"]
        if body["format"] != FORMAT or body["version"] != VERSION:
            raise ValueError(f"format {body['format']!r} version {body['version']!r}")
        if not re.fullmatch("[0-9a-f]{64}", digest):
            raise ValueError(f"sha256 {digest!r} is not a hex digest")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint record {record} is unreadable ({exc}); {fix}") from exc
    tensor_file = _tensor_file(record, digest)
    if not tensor_file.is_file():
        raise CheckpointError(f"{tensor_file}, named by {record}, is missing; {fix}")
    data = tensor_file.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise CheckpointError(
            f"{tensor_file} does not match the sha256 in {record} (truncated or modified); {fix}"
        )
    try:
        tensors = load_tensors(data)
        used: set[str] = set()
        state = _decode(body["state"], tensors, used)
        if used != set(tensors):
            raise ValueError(f"tensors {sorted(set(tensors) - used)} are not in the record")
    except (SafetensorError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint {tensor_file} does not match its record {record} ({exc}); {fix}"
        ) from exc
    return state


def _tensor_file(record: Path, digest: str) -> Path:
    return record.with_name(f"{record.stem}.{digest[:16]}.safetensors")


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a synced temp file and a rename (then sync the
    directory), so ``path`` holds either its old bytes or all of the new ones."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON, its tensors moved to ``tensors`` under their path (``a/b/0``)."""
    if isinstance(obj, torch.Tensor):
        if path in tensors:
            raise ValueError(f"two tensors of the checkpoint state would both be named {path!r}")
        tensors[path] = obj.detach().cpu().clone(memory_format=torch.contiguous_format)
        return {_TENSOR: path}
    if isinstance(obj, list | tuple):
        items = [_encode(v, _join(path, i), tensors) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {_TUPLE: items}
    if isinstance(obj, Mapping):
        items = [(k, _encode(v, _join(path, k), tensors)) for k, v in obj.items()]
        tag_like = len(obj) == 1 and next(iter(obj)) in _TAGS
        if all(isinstance(k, str) for k in obj) and not tag_like:
            return dict(items)
        return {_ITEMS: [[_encode(k, path, tensors), v] for k, v in items]}
    if obj is None or isinstance(obj, str | int | float):
        return obj
    raise TypeError(f"checkpoint state {path or '<root>'} has an unsupported {type(obj).__name__}")


def _join(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor], used: set[str]) -> Any:
    """Inverse of :func:`_encode`; records in ``used`` the tensors it took."""
    if isinstance(obj, list):
        return [_decode(v, tensors, used) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1 and (tag := next(iter(obj))) in _TAGS:
        if tag == _TENSOR:
            used.add(obj[tag])
            return tensors[obj[tag]]
        if tag == _TUPLE:
            return tuple(_decode(v, tensors, used) for v in obj[tag])
        return {_decode(k, tensors, used): _decode(v, tensors, used) for k, v in obj[tag]}
    return {k: _decode(v, tensors, used) for k, v in obj.items()}
