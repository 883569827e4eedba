"""The runner's cache of what data-dependent methods learn (coefficients, Fisher or Gram
statistics), so a rerun, a sweep over evaluation options or over a method's merge-only
options fits once.

A method opts in by naming in ``fit_state_keys`` the attributes its ``fit`` sets and its
merge reads, and in ``fit_independent`` the options only its merge reads. The key is the
sha256 of everything else that decides the fit:

- the method's target and options (less ``fit_independent``), the pool's config and the
  experts' order, every member file's path, size and modification time (a checkpoint
  rewritten in place refits), the tasks and their calibration config, the seed, device,
  the thread count torch actually uses, and the torch / transformers versions;
- what the fit reads from its context: the calibration prompts, each expert's tasks, the
  mergeable tensor names and the tokenizer's fingerprint;
- the source of every module under ``methods/``, ``core/`` and ``harness/``: a code
  change refits.

``force=true`` refits and replaces the entry. A state that cannot be serialised warns and
leaves the cell uncached rather than failing it.

An entry is ``<runs_dir>/.fit_cache/<key>/`` holding ``state.safetensors`` (the state's
tensors) and ``state.json`` (its structure and plain values), written into a temporary
directory and renamed, under a per-key lock: an interrupted fit leaves no entry, and of
two workers reaching one key the second waits and reuses the first's. Training workflows
(BoRA, Merge to Learn) keep their own training cache and name no state here.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from core.fingerprints import tokenizer_fingerprint
from harness.pool import ModelPool
from methods.base import FitContext, MergeMethod

ROOT = Path(__file__).resolve().parents[1]
_TENSOR = "__tensor__"


def code_digest() -> str:
    """sha256 over the path and bytes of every ``.py`` file under ``methods/``, ``core/``
    and ``harness/``."""
    h = hashlib.sha256()
    files = [p for d in ("methods", "core", "harness") for p in (ROOT / d).rglob("*.py")]
    for p in sorted(files):
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def encode(value: Any, tensors: dict[str, Tensor], where: str) -> Any:
    """``value`` as JSON, its tensors moved into ``tensors`` (dicts with str keys, lists,
    tuples as lists, str / int / float / bool / None)."""
    if isinstance(value, Tensor):
        name = str(len(tensors))
        t = value.detach().cpu().contiguous()
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        seen = any(u.data_ptr() == t.data_ptr() for u in tensors.values())
        tensors[name] = t if whole and not seen else t.clone()  # copy views and shared ones
        return {_TENSOR: name}
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"fit state {where}: dict keys must be str to be cached")
        return {k: encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"fit state {where}: a {type(value).__name__} cannot be cached")


def decode(value: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        return {k: decode(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v, tensors) for v in value]
    return value


def member_files(pool: ModelPool) -> dict[str, list[list[Any]]]:
    """Per member, the [path, size, mtime_ns] of every file its tensors are read from."""
    names = pool.tensor_names()
    out = {}
    for member, source in pool.sources.items():
        files = sorted({str(source.file(n)) for n in names})
        out[member] = [[f, (st := os.stat(f)).st_size, st.st_mtime_ns] for f in files]
    return out


def fit_key(
    cell: Mapping[str, Any],
    method: MergeMethod,
    ctx: FitContext,
    members: Mapping[str, Any] | None = None,
) -> str:
    """The sha256 of everything that decides ``method``'s fit in this cell (module doc)."""
    options = {k: v for k, v in cell["method"].items() if k not in method.fit_independent}
    payload = {
        "method": options,
        "model": cell["model"],
        "experts": list(ctx.expert_names),
        "member_files": members or {},
        "torch_threads": torch.get_num_threads(),
        "versions": {p: metadata.version(p) for p in ("torch", "transformers")},
        "task": {k: cell["task"].get(k) for k in ("tasks", "calibration")},
        "seed": cell["seed"],
        "device": cell["device"],
        "calibration": ctx.calibration,
        "expert_tasks": ctx.expert_tasks,
        "tensor_names": list(ctx.tensor_names),
        "tokenizer": tokenizer_fingerprint(ctx.tokenizer),
        "code": code_digest(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _store(entry: Path, state: Mapping[str, Any]) -> None:
    tensors: dict[str, Tensor] = {}
    skeleton = {k: encode(v, tensors, k) for k, v in state.items()}
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
    tmp.chmod(0o755)  # readable by the other users of a shared runs directory
    try:
        save_file(tensors, tmp / "state.safetensors")
        (tmp / "state.json").write_text(json.dumps(skeleton))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(entry, ignore_errors=True)  # an incomplete or refreshed entry
        os.replace(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load(entry: Path) -> dict[str, Any]:
    tensors = load_file(entry / "state.safetensors")
    return decode(json.loads((entry / "state.json").read_text()), tensors)


def cached_fit(
    method: MergeMethod,
    ctx: FitContext,
    cell: Mapping[str, Any],
    root: Path,
    members: Mapping[str, Any] | None = None,
    refresh: bool = False,
) -> dict[str, str]:
    """Fit ``method`` or restore its cached state (``refresh``: fit and replace it);
    returns ``{"key", "fit"}`` with ``fit`` ``"stored"`` (fitted now), ``"reused"`` or
    ``"uncached"`` (the method names no state, or its state cannot be serialised)."""
    if not method.fit_state_keys:
        method.fit(ctx)
        return {"fit": "uncached"}
    key = fit_key(cell, method, ctx, members)
    entry = root / key
    with _locked(root / f"{key}.lock"):
        if not refresh and (entry / "state.json").is_file():
            method.load_fit_state(_load(entry))
            return {"key": key, "fit": "reused"}
        method.fit(ctx)
        try:
            _store(entry, method.fit_state())
        except TypeError as err:
            warnings.warn(f"{method.name}: fit not cached ({err})", stacklevel=2)
            return {"key": key, "fit": "uncached"}
    return {"key": key, "fit": "stored"}
