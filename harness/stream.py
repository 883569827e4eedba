"""The tensor-by-tensor executor and the sharded HF checkpoint writer.

``execute`` drives a method over a pool: its statistics passes, then the merge pass. Each
step holds one tensor of the base and of each expert (upcast to float32 on the compute
device; a ``chunked`` method only a slice of it) and the merged result, so peak memory is
a few tensors. Merged tensors go to a sink: a dict (in-memory merge, for models that
fit) or ``ShardedCheckpointWriter`` (a directory ``from_pretrained`` and
``lm_eval --model hf`` load unchanged), which plans the shards up front and writes each
tensor as it comes.

Every member tensor is checked for NaN/inf when read (``ModelPool.tensor``: a
``NonFiniteMemberError`` naming the member, tensor and file), before the method sees it;
so NaN/inf in a merged tensor (``NonFiniteError``) comes from finite inputs, and the error
points at the method's hyperparameters.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import shutil
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from core.sources import SAFETENSORS_DTYPE_NAMES, NonFiniteError, few, parse_dtype
from harness.alloc import reuse_freed_memory
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

    Work overlaps, and the values do not change: while one tensor is merged, a reader
    thread loads the next one's members (up to :data:`PREFETCH_BYTES` ahead); one thread
    hashes each finished tensor and another hands it to ``sink`` (a
    :class:`ShardedCheckpointWriter` is given the whole layout first and streams each
    tensor straight into its shard). A method that declares ``chunked`` sees each tensor
    as flat slices of :data:`CHUNK` entries (in every pass), so only those slices are
    ever held in float32, on one intra-op thread (small slices gain nothing from more;
    the threads above use the other cores). Freed memory is reused across tensors
    (:func:`harness.alloc.reuse_freed_memory`).
    """
    out_dtype = parse_dtype(pool.dtype)
    names = pool.tensor_names()
    merged_names = [n for n in names if pool.is_merged(n)]
    is_merged = set(merged_names)
    method.setup(pool.expert_names, seed)
    if method.needs_data:
        if fit_context is None:
            raise ValueError(f"{method.name} learns from data and needs a FitContext")
        if fit_cache is None:
            method.fit(fit_context)
        else:
            fit_cache(method, fit_context)

    loader = _Loader(pool, device, bool(method.chunked))
    with reuse_freed_memory(), _intra_op_threads(1 if method.chunked else None):
        for p in range(method.stat_passes):
            with closing(loader.each(merged_names, f"stats pass {p + 1}", progress)) as each:
                for name, passes in each:
                    for base, experts in next(passes):
                        method.observe(p, name, base, experts)
                        del base, experts
            method.end_pass(p)

        src = pool.sources["base"]
        if isinstance(sink, ShardedCheckpointWriter):
            sink.plan([(n, _out_dtype(pool, n, out_dtype), src.shape(n)) for n in names])
        merged = loader.each(merged_names, f"merge ({method.name})", progress, method.tensor_passes)
        with closing(merged), _Drain(sink) as drain:
            for name in names:
                dtype = _out_dtype(pool, name, out_dtype)
                if name in is_merged:
                    _, passes = next(merged)
                    for p in range(method.tensor_passes):
                        for base, experts in next(passes):
                            method.observe_tensor(p, name, base, experts)
                            del base, experts
                        method.end_tensor_pass(p, name)
                    result = torch.empty(src.shape(name), dtype=dtype)
                    flat, at = result.view(-1), 0
                    for base, experts in next(passes):
                        piece = method.merge_tensor(name, base, experts)
                        del base, experts
                        piece = _checked(method, name, piece, dtype)
                        flat[at : at + piece.numel()] = piece.view(-1)
                        at += piece.numel()
                else:
                    result = pool.tensor("base", name).to(dtype)
                drain.put(name, result.contiguous())
        return drain.hexdigest()


# Float32 bytes the reader thread may hold ready beyond what the merge is working on (a
# larger tensor waits until nothing else is held: the embeddings are never held twice).
PREFETCH_BYTES = 512 << 20
# Entries per slice for a ``chunked`` method: the float32 slices of all members and the
# method's temporaries stay within the CPU caches.
CHUNK = 1 << 18

Part = tuple[Tensor, dict[str, Tensor]]


class _Loader:
    """Each tensor's members as float32 on the device, checked finite as they are first
    read (a tensor's later passes reread the same members unchecked), produced by a reader
    thread ahead of the caller (up to :data:`PREFETCH_BYTES` ready).

    Whole tensors, or with ``chunked`` flat slices of :data:`CHUNK` entries read from the
    members' memory-mapped tensors one slice at a time; a slice holding NaN/inf has its
    whole tensor checked, so the error counts every bad value.
    """

    def __init__(self, pool: ModelPool, device: str, chunked: bool):
        self.pool, self.device, self.chunked = pool, device, chunked
        self.members = ["base", *pool.expert_names]

    def each(
        self, names: list[str], desc: str, progress: bool, again: int = 0
    ) -> Iterator[tuple[str, Iterator[Iterator[Part]]]]:
        """``(name, passes)`` for each name in order: ``passes`` yields ``1 + again``
        iterators over the tensor's parts ``(base, experts)`` (its slices, or the whole
        tensor once unless ``chunked``), to be consumed in order, each to its end, before
        the next name is asked for."""
        pipe = _Pipe(PREFETCH_BYTES)
        reader = threading.Thread(target=self._produce, args=(names, pipe, 1 + again), daemon=True)
        reader.start()
        try:
            for name in tqdm(names, desc=desc, disable=not progress, leave=False):
                yield name, (self._parts(pipe) for _ in range(1 + again))
        finally:
            pipe.close()
            reader.join()

    def _parts(self, pipe: _Pipe) -> Iterator[Part]:
        while True:
            item, nbytes = pipe.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:  # the end of this tensor
                return
            yield item
            item = None  # the caller dropped its references too: count the bytes free
            pipe.release(nbytes)

    def _produce(self, names: list[str], pipe: _Pipe, times: int) -> None:
        try:
            for name in names:
                raw = {m: self.pool.sources[m].get(name) for m in self.members}
                flat = {m: t.reshape(-1) for m, t in raw.items()}
                for i in range(times):  # passes after the first reread checked members
                    if self.chunked:
                        for at in range(0, flat["base"].numel(), CHUNK):
                            part = {m: t[at : at + CHUNK] for m, t in flat.items()}
                            pipe.put(self._part(name, part, flat, i == 0), 4 * CHUNK * len(raw))
                    else:
                        nbytes = 4 * flat["base"].numel() * len(raw)
                        pipe.put(self._part(name, raw, raw, i == 0), nbytes)
                    pipe.put(None, 0)
        except _Closed:
            return
        except BaseException as err:  # noqa: BLE001 (raised in the consumer)
            with suppress(_Closed):
                pipe.put(err, 0)

    def _part(
        self, name: str, tensors: dict[str, Tensor], whole: dict[str, Tensor], check: bool
    ) -> Part:
        f32 = {}
        for m, t in tensors.items():
            f32[m] = _f32(t, self.device)
            if not check:
                continue
            try:
                self.pool.check_finite(m, name, f32[m])
            except NonFiniteError:
                self.pool.check_finite(m, name, whole[m])  # the whole tensor's count
                raise
        base = f32.pop("base")
        return base, f32


class _Closed(Exception):
    """The consumer is gone: the reader stops."""


class _Pipe:
    """A queue bounded by bytes: ``put`` waits while what is held (put and not yet
    released) plus the new item exceed ``budget``, unless nothing is held."""

    def __init__(self, budget: int):
        self.budget, self.held, self.closed = budget, 0, False
        self.items: deque[tuple[Any, int]] = deque()
        self.cond = threading.Condition()

    def put(self, item: Any, nbytes: int) -> None:
        with self.cond:
            self.cond.wait_for(
                lambda: self.closed or not self.held or self.held + nbytes <= self.budget
            )
            if self.closed:
                raise _Closed
            self.held += nbytes
            self.items.append((item, nbytes))
            self.cond.notify_all()

    def get(self) -> tuple[Any, int]:
        with self.cond:
            self.cond.wait_for(lambda: self.items)
            return self.items.popleft()

    def release(self, nbytes: int) -> None:
        with self.cond:
            self.held -= nbytes
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.items.clear()
            self.cond.notify_all()


def _out_dtype(pool: ModelPool, name: str, out_dtype: torch.dtype | None) -> torch.dtype:
    dtype = pool.sources["base"].dtype(name)
    return out_dtype if out_dtype is not None and dtype.is_floating_point else dtype


def _checked(method: MergeMethod, name: str, merged: Tensor, dtype: torch.dtype) -> Tensor:
    """``merged`` on the CPU, or ``NonFiniteError`` if it holds NaN/inf, also once rounded
    to ``dtype`` (fp16 overflows): decided by its extremes (one ``aminmax``; rounding is
    monotone, so the rounded extremes are the rounded tensor's)."""
    if merged.numel():
        ends = torch.stack(torch.aminmax(merged))
        if not (torch.isfinite(ends).all() and torch.isfinite(ends.to(dtype)).all()):
            raise NonFiniteError(
                f"{method.name} produced NaN/inf in tensor {name!r} from finite members "
                "(every member tensor is checked as it is read), so the method's "
                "hyperparameters are the likely cause: e.g. a scaling or weights large "
                f"enough to overflow {dtype}. Lower them (the method.* options) and run again."
            )
    return merged.cpu()


@contextmanager
def _intra_op_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` (``None``: unchanged) within the block."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Drain:
    """Hands finished tensors, in order, to two threads: one hashes them, one gives them
    to the sink (at most ``depth`` tensors wait for each). An error in either is raised
    in the caller at the next ``put`` or on exit."""

    def __init__(self, sink: Sink, depth: int = 2):
        self.digest = hashlib.sha256()
        self.error: BaseException | None = None
        self.queues: list[queue.Queue] = [queue.Queue(depth), queue.Queue(depth)]
        self.threads = [
            threading.Thread(target=self._run, args=(fn, q), daemon=True)
            for fn, q in zip((self._hash, sink), self.queues, strict=True)
        ]

    def __enter__(self) -> _Drain:
        for thread in self.threads:
            thread.start()
        return self

    def _hash(self, name: str, t: Tensor) -> None:
        self.digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        self.digest.update(_bytes(t))

    def _run(self, fn: Sink, q: queue.Queue) -> None:
        while (item := q.get()) is not None:
            if self.error is not None:
                continue
            try:
                fn(*item)
            except BaseException as err:  # noqa: BLE001 (re-raised in the caller)
                self.error = err

    def put(self, name: str, tensor: Tensor) -> None:
        self._raise()
        for q in self.queues:
            q.put((name, tensor))

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def __exit__(self, *exc: object) -> None:
        for q, thread in zip(self.queues, self.threads, strict=True):
            q.put(None)
            thread.join()
        if exc[0] is None:
            self._raise()

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


def _f32(t: Tensor, device: str) -> Tensor:
    return t.to(device=device, dtype=torch.float32)


def _bytes(t: Tensor) -> memoryview:
    """The tensor's bytes without a copy (CPU, contiguous)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


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

    :meth:`plan` fixes the layout first (every tensor's name, dtype and shape, in order:
    a new shard starts when the next tensor would take the current one past
    ``max_shard_size``), so each shard's header is known before its first tensor arrives
    and each tensor is written straight to its place in the file: no shard is buffered
    in memory. :meth:`write_all` plans and writes a mapping in one call.

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
        self.shards: list[list[str]] = []
        self.total = 0
        self._layout: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
        self._shard_of: list[int] = []
        self._next = 0
        self._file: Any = None

    def plan(self, entries: Sequence[tuple[str, torch.dtype, Sequence[int]]]) -> None:
        """Fix the tensors to come (name, dtype, shape), in the order they will arrive."""
        if self._layout:
            raise RuntimeError("ShardedCheckpointWriter.plan() was already called")
        size = 0
        for name, dtype, shape in entries:
            nbytes = math.prod(shape) * dtype.itemsize
            if not self.shards or (self.shards[-1] and size + nbytes > self.max_bytes):
                self.shards.append([])
                size = 0
            self.shards[-1].append(name)
            self._shard_of.append(len(self.shards) - 1)
            self._layout.append((name, dtype, tuple(shape)))
            size += nbytes
            self.total += nbytes

    def write_all(self, state: dict[str, Tensor]) -> None:
        """Plan ``state``'s tensors in its order and write them."""
        self.plan([(k, v.dtype, tuple(v.shape)) for k, v in state.items()])
        for name, tensor in state.items():
            self(name, tensor)

    def __call__(self, name: str, tensor: Tensor) -> None:
        if self._next >= len(self._layout):
            raise RuntimeError(
                f"ShardedCheckpointWriter got {name!r} beyond its plan: call plan() with "
                "every tensor first (or write_all)"
            )
        expected = self._layout[self._next]
        if (name, tensor.dtype, tuple(tensor.shape)) != expected:
            raise ValueError(
                f"ShardedCheckpointWriter expected {expected} next, got "
                f"{(name, tensor.dtype, tuple(tensor.shape))}"
            )
        shard = self._shard_of[self._next]
        if self._file is None:
            self._file = open(self.tmp / f"shard-{shard:05d}.tmp", "wb")  # noqa: SIM115
            self._file.write(self._header(shard))
        self._file.write(_bytes(tensor.contiguous()))
        self._next += 1
        if self._next == len(self._layout) or self._shard_of[self._next] != shard:
            self._flush()

    def _header(self, shard: int) -> bytes:
        """The safetensors header of ``shard``: its tensors in arrival order, packed."""
        entries: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for (name, dtype, shape), s in zip(self._layout, self._shard_of, strict=True):
            if s == shard:
                end = offset + math.prod(shape) * dtype.itemsize
                entries[name] = {
                    "dtype": SAFETENSORS_DTYPE_NAMES[dtype],
                    "shape": list(shape),
                    "data_offsets": [offset, end],
                }
                offset = end
        header = json.dumps(entries, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # data starts 8-byte aligned
        return len(header).to_bytes(8, "little") + header

    def _flush(self) -> None:
        """The current shard is complete: close its file."""
        self._file.close()
        self._file = None

    def close(self, pool: ModelPool, card: str) -> Path:
        """Finish shards and index; add config, generation config, tokenizer and card.
        Returns the completed partial directory (loadable with ``from_pretrained``)."""
        if self._next != len(self._layout):
            missing = [name for name, _, _ in self._layout[self._next :]]
            raise RuntimeError(f"ShardedCheckpointWriter closed before {few(missing)} arrived")
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


def mergekit_equivalent(
    record: dict[str, Any], paths: Mapping[str, Any] | None = None
) -> tuple[str | None, str]:
    """The mergekit 0.1.5 YAML of the merge ``record`` describes
    (:func:`harness.mergekit_config.mergekit_yaml`; ``paths``: the pool's member
    directories, written into it), or ``None`` where mergekit has no such merge; and why
    it could not be written, if it failed (the merge stands without it)."""
    from harness.mergekit_config import mergekit_yaml

    config = record.get("config") or {}
    try:
        method, model = config["method"], config["model"]
        return mergekit_yaml(method, model, seed=record["seed"], paths=paths), ""
    except Exception as err:  # noqa: BLE001 (reported in the card, never fatal)
        return None, f"{type(err).__name__}: {err}"


def model_card(record: dict[str, Any], mergekit: str | None = None, why: str = "") -> str:
    """A model card recording how the checkpoint was merged, with ``mergekit``, the YAML
    of the same merge, where one exists (:func:`mergekit_equivalent` gives both)."""
    import yaml

    body = yaml.safe_dump(
        {"method": record["method"], "pool": record["pool"], "seed": record["seed"]},
        sort_keys=False,
    )
    what = "Merge" if record.get("tool") == "mergelab-merge" else "Cell"
    card = (
        "---\nlibrary_name: transformers\ntags: [mergelab, merge]\n---\n"
        f"# Merged with mergelab\n\n{what} `{record['cell_id']}`. Merge configuration:\n\n"
        f"```yaml\n{body}```\n"
    )
    if mergekit is None:
        because = f" ({why})" if why else ""
        return card + (
            f"\nNo mergekit 0.1.5 configuration computes this merge{because}: its options "
            "(or its pool) have no mergekit counterpart.\n"
        )
    return card + f"\n## The same merge with mergekit 0.1.5\n\n```yaml\n{mergekit}```\n"
