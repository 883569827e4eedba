"""Cell ids, atomic result records and resume.

A cell is one resolved configuration (method × pool × tasks × eval × seed × device). Its
id is a hash of exactly those parts, so the same cell in two sweeps is the same directory
``<runs_dir>/<cell_id>/`` and is computed once. ``result.json`` is written last and
atomically: a cell with a complete result is finished; anything else (no record, a torn
one, ``status: "failed"`` with its ``error``) is redone. Workers sharing a runs directory
(sweeps, SLURM array tasks, several hosts) claim a cell before computing it
(:class:`CellClaim`), so each cell is computed once.

``result.json`` schema 2 (``SCHEMA``) carries each score's meaning with it, so readers
never guess a metric's direction from its name or the primary metric from key order::

    "metrics": {task_or_group: {metric_key: {"value": float, "stderr": float | None,
                "higher_is_better": bool | None, "aggregation": str | None,
                "primary": bool}}},           # exactly one primary per task/group
    "n_shot": {task_or_group: int},            # few-shot count lm-eval used
    "groups": {group: {"subtasks": [task, ...], "weight_by_size": bool,
               "aggregation": str}},           # requested, aggregated groups; {} if none
    "scores" / "stderr": {task_or_group: {metric_key: value}}, "n_samples": {task: int},
    "versions": versions(), "environment": environment()

(see ``evals.lm_eval.EvalResult`` for how each field is read from lm-eval).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from importlib import metadata
from pathlib import Path
from typing import Any

from evals.backends import cell_eval

SCHEMA = 2
# Config keys that decide a cell's result; everything else (logging, paths, output
# options, dry-run) may change without making it a different cell.
CELL_KEYS = ("method", "model", "task", "eval", "seed", "device", "threads")
_PACKAGES = (
    "torch",
    "transformers",
    "lm_eval",
    "peft",
    "safetensors",
    "datasets",
    "hydra-core",
    "wandb",
    "pandas",
    "mergelab",
)


def split_metric_key(key: str) -> tuple[str, str]:
    """A record's metric key as lm-eval's (metric, filter): ``acc`` → (acc, none),
    ``exact_match/strict-match`` → (exact_match, strict-match) (the inverse of
    :func:`evals.lm_eval.metric_key`)."""
    name, sep, filter_name = key.partition("/")
    return (name, filter_name) if sep else (name, "none")


def method_params(method_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The method's options as flat table parameters: a nested piece (a mapping with a
    ``_target_``, as ``method=task_vector``'s ``transform``) becomes ``transform: <class>``
    plus ``transform.<option>`` entries."""
    out: dict[str, Any] = {}
    for k, v in method_cfg.items():
        if k == "_target_":
            continue
        if isinstance(v, Mapping) and "_target_" in v:
            out[k] = str(v["_target_"]).rsplit(".", 1)[-1]
            out.update({f"{k}.{sk}": sv for sk, sv in method_params(v).items()})
        else:
            out[k] = v
    return out


def cell_id(cfg: dict[str, Any]) -> str:
    """12 hex digits of the sha256 of the result-deciding parts of a resolved config; its
    ``eval`` as :func:`evals.backends.cell_eval` gives it (an hf cell's id leaves
    ``eval.backend`` and ``eval.vllm`` out, so it is the id from before those options)."""
    missing = [k for k in CELL_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"config lacks {missing}; a cell needs all of {list(CELL_KEYS)}")
    parts = {k: cfg[k] for k in CELL_KEYS}
    parts["eval"] = cell_eval(parts["eval"])
    return config_digest(parts)


def config_digest(parts: Mapping[str, Any]) -> str:
    """12 hex digits of the sha256 of ``parts`` as sorted-key JSON (values that JSON lacks
    as their ``str``): the id of a cell or of a ``mergelab-merge`` output."""
    key = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Record the block's wall time in seconds as ``timings[stage]`` (a record's
    ``timings``)."""
    start = time.perf_counter()
    yield
    timings[stage] = round(time.perf_counter() - start, 4)


def result_path(runs_dir: str | Path, cid: str) -> Path:
    return Path(runs_dir) / cid / "result.json"


def load_finished(runs_dir: str | Path, cid: str) -> dict[str, Any] | None:
    """The cell's record if it finished, else ``None`` (missing, partial or unreadable)."""
    path = result_path(runs_dir, cid)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if record.get("status") == "complete" else None


class ClaimLost(RuntimeError):
    """This worker's claim on a cell was taken over (judged stale while the worker was
    paused or slow): it must not write to the cell any more."""


class CellClaim:
    """A worker's claim on one cell: ``<runs_dir>/.claims/<cid>.json`` holding the owner's
    ``host``, ``ns`` (boot id and pid namespace), ``pid``, ``pid_start`` (its start time
    in clock ticks after boot), ``token``, ``started`` and ``heartbeat`` (Unix seconds).

    Decisions, for runs directories shared by sweeps and SLURM array tasks on several
    hosts: no ``flock`` (unreliable on network filesystems). The claim is created by
    hard-linking a fully written temporary file to its name (atomic and exclusive on
    local and NFS filesystems, and never seen half written).

    Staleness: a claim is stale when its heartbeat is older than ``timeout`` seconds
    (hosts' clocks must agree to well within ``timeout - heartbeat``) or, on the same
    host, at once when its process is gone. "Same host" means the same hostname, boot
    and pid namespace, and "gone" that no process has the pid or the one that has it
    started at another time (a reused pid). Containers sharing a hostname but not a pid
    namespace thus rely on the heartbeat timeout only; systems without ``/proc`` trust
    hostname + pid, so there give such containers distinct hostnames.

    Takeover: a stale claim is renamed aside (of several takers one wins the rename). The
    winner deletes it if its whole content (token and heartbeat) is still what was judged
    stale; otherwise its owner refreshed it meanwhile and it is linked back. If another
    worker claimed the free name in that gap, the put-back fails and the owner finds its
    claim lost (below); every other taker competes for the free name again.

    Heartbeat and loss: a daemon thread rewrites the claim (temporary file + rename) every
    ``heartbeat`` seconds, only after reading that it still holds this worker's token.
    Read-then-rename is not atomic: a takeover landing between the two (microseconds,
    and only of a claim whose owner stalled past ``timeout``) is overwritten; the taker
    then finds *its* claim lost, so one worker still holds the cell. A claim seen
    holding another token is lost for good: the thread sets :attr:`lost` and stops, never
    writing over it. :meth:`check` (called by the holder before each write to the cell)
    re-reads the file and raises :class:`ClaimLost` once the claim is someone else's or
    gone; the holder then writes nothing. :meth:`release` deletes the claim only if it
    still holds this worker's token (read-then-unlink: the same accepted window).

    Other caches under ``runs_dir`` (``.fit_cache``, the zoo, ``.train_cache``) still use
    ``flock``: safe on one host; on NFS they rely on the filesystem's lock support.
    """

    def __init__(self, runs_dir: str | Path, cid: str, *, heartbeat: float, timeout: float):
        self.cid = cid
        self.path = Path(runs_dir) / ".claims" / f"{cid}.json"
        self.heartbeat, self.timeout = float(heartbeat), float(timeout)
        self.owner = {
            "host": socket.gethostname(),
            "ns": _pid_namespace(),
            "pid": os.getpid(),
            "pid_start": _proc_start(os.getpid()),
            "token": secrets.token_hex(6),
            "started": time.time(),
        }
        self.lost = threading.Event()  # set once the claim was seen held by another worker
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def acquire(self, done: Callable[[], bool]) -> bool:
        """Claim the cell, waiting while a live worker holds it (a message when the wait
        starts, and on each takeover). False, without a claim, once ``done()`` is true,
        whether that is seen while waiting or right after claiming."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        waited_on = None
        while True:
            if self._link():
                if done():
                    self.release()
                    return False
                self._hold()
                return True
            if done():
                return False
            held = self._read(self.path)
            if held is None:  # released, or moved aside by a taker: try again
                continue
            reason = self._stale(held)
            if reason:
                self._take_over(held, reason)
                continue
            if held["token"] != waited_on:
                waited_on = held["token"]
                print(
                    f"[mergelab] wait {self.cid}: claimed by {held['host']} pid {held['pid']} "
                    f"(heartbeat {time.time() - held['heartbeat']:.0f} s ago); polling"
                )
            time.sleep(min(self.heartbeat, 1.0))

    def try_acquire(self) -> bool:
        """Claim the cell without waiting: True if it was free or its claim stale (taken
        over), False while a live worker holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self._link():
            held = self._read(self.path)
            if held is not None:
                reason = self._stale(held)
                if reason is None:
                    return False
                self._take_over(held, reason)
            if not self._link():
                return False
        self._hold()
        return True

    def check(self) -> None:
        """Raise :class:`ClaimLost` unless this worker still holds the claim."""
        if (lost := self.loss()) is not None:
            raise lost

    def loss(self) -> ClaimLost | None:
        """``None`` while this worker holds the claim, else the :class:`ClaimLost` to
        raise. Once lost, always lost; else the file decides (read once more after a
        moment if missing: a taker may be putting it back)."""
        held = self._read(self.path)
        if not self.lost.is_set():
            if held is None:
                time.sleep(min(self.heartbeat, 0.2))
                held = self._read(self.path)
            if held is not None and held["token"] == self.owner["token"]:
                return None
            self.lost.set()
        now = f"{held['host']} pid {held['pid']} holds it" if held else "it was deleted"
        return ClaimLost(
            f"the claim on cell {self.cid} was taken over ({now}), judged stale while this "
            "worker was paused or slow; it writes nothing to the cell"
        )

    def release(self) -> None:
        """Stop the heartbeat and delete the claim if it is still this worker's."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        held = self._read(self.path)
        if held is not None and held["token"] == self.owner["token"]:
            self.path.unlink(missing_ok=True)

    def _hold(self) -> None:
        """Just claimed: clear old leftovers and start the heartbeat."""
        self._sweep_leftovers()
        self._beat = threading.Thread(target=self._beating, daemon=True)
        self._beat.start()

    def _temp(self) -> Path:
        """The owner's data with a fresh heartbeat, written and fsynced beside the claim."""
        tmp = self.path.with_name(f".{self.cid}.{self.owner['token']}.tmp")
        with open(tmp, "w") as f:
            json.dump({**self.owner, "heartbeat": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _link(self) -> bool:
        tmp = self._temp()
        try:
            return _link_new(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def _beating(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:  # written before the check, so only read → rename is an open window
                tmp = self._temp()
            except OSError:
                continue  # a missed beat only ages the claim
            held = self._read(self.path)
            if held is not None and held["token"] == self.owner["token"]:
                with suppress(OSError):
                    os.replace(tmp, self.path)
                continue
            tmp.unlink(missing_ok=True)
            if held is not None:  # another worker's: lost for good, never written over
                self.lost.set()
                return
            # missing: set aside by a taker, maybe to be put back; never recreated

    def _sweep_leftovers(self) -> None:
        """Delete what dead workers left beside this cell's claim: temporary claim files
        whose writer is stale by the claim's own rule (its process gone, or silent for
        ``timeout``; one cut off mid-write goes stale at its mtime), and set-aside claims
        older than ``timeout`` (the name carries only the taker's token, so age is the
        only sign; live ones exist for microseconds)."""
        folder = self.path.parent
        for tmp in folder.glob(f".{self.cid}.*.tmp"):
            held = self._read(tmp)
            if held is not None and self._stale(held):
                tmp.unlink(missing_ok=True)
        for aside in folder.glob(f"{self.path.name}.stale-*"):
            with suppress(OSError):
                if time.time() - aside.stat().st_mtime > self.timeout:
                    aside.unlink()

    def _stale(self, held: dict[str, Any]) -> str | None:
        age = time.time() - held["heartbeat"]
        if age > self.timeout:
            return f"no heartbeat for {age:.0f} s"
        if (held["host"], held.get("ns")) != (self.owner["host"], self.owner["ns"]):
            return None
        if not _pid_alive(held["pid"]):
            return "its process is gone"
        start = _proc_start(held["pid"])  # None: hidden (hidepid) or just exited
        if start is not None and start != held.get("pid_start"):
            return "its process is gone (pid reused)"
        return None

    def _take_over(self, held: dict[str, Any], reason: str) -> None:
        aside = self.path.with_name(f"{self.path.name}.stale-{self.owner['token']}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another taker moved it first
        if self._read(aside) == held:
            print(
                f"[mergelab] take over {self.cid}: the claim of {held['host']} pid "
                f"{held['pid']} is stale ({reason})"
            )
        elif not _link_new(aside, self.path):  # refreshed after being judged: give it back
            print(
                f"[mergelab] {self.cid}: the claim of {held['host']} pid {held['pid']} was "
                "refreshed while being taken over and another worker claimed the cell "
                "meanwhile; its owner will find its claim lost"
            )
        aside.unlink(missing_ok=True)

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        """The claim, ``None`` if there is none; one that cannot be parsed (written by
        something else) reads as an ownerless claim beating at its mtime, so it goes stale."""
        try:
            text = path.read_text()
            mtime = path.stat().st_mtime
        except OSError:
            return None
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return {"host": "", "pid": 0, "token": "", "heartbeat": mtime}


def _link_new(src: Path, dst: Path) -> bool:
    """Hard-link ``src`` to the new name ``dst``; False if ``dst`` exists (a retried NFS
    link that had in fact succeeded counts as done)."""
    try:
        os.link(src, dst)
        return True
    except FileExistsError:
        return os.stat(src).st_nlink == 2


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        pass
    return True


def _pid_namespace() -> str | None:
    """This boot's id and this process's pid namespace (Linux; ``None`` elsewhere): pids
    are comparable only between processes that share both."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _proc_start(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks after boot (``/proc/<pid>/stat``
    field 22; ``None`` if unknown), so a reused pid is not taken for the claim's owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


@contextmanager
def claimed(
    runs_dir: str | Path, cid: str, done: Callable[[], bool], *, heartbeat: float, timeout: float
) -> Iterator[CellClaim | None]:
    """``with claimed(...) as claim:`` this worker's :class:`CellClaim` on the cell, held
    until exit, or ``None`` if the cell turned ``done()`` instead."""
    claim = CellClaim(runs_dir, cid, heartbeat=heartbeat, timeout=timeout)
    if not claim.acquire(done):
        yield None
        return
    try:
        yield claim
    finally:
        claim.release()


def clean_cell(cell_dir: Path) -> None:
    """Remove what dead writers left in a cell directory: temporary records and partial
    or set-aside checkpoints. Only the claim holder calls it, so none of it is live."""
    for junk in [*cell_dir.glob(".result.json.*.tmp"), *cell_dir.glob("merged.*")]:
        _remove(junk)


def clean_own(cell_dir: Path) -> None:
    """Remove this worker's partial checkpoints only (for a worker that lost its claim:
    everything else in the cell may be the new holder's)."""
    for junk in cell_dir.glob(f"merged.partial-{_worker_prefix()}*"):
        _remove(junk)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _worker_prefix() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-"


def worker_suffix() -> str:
    """``<host>-<pid>-<token>``: names a worker's own partial files and directories."""
    return f"{_worker_prefix()}{secrets.token_hex(4)}"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file in the same directory, fsync, then rename over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def versions() -> dict[str, str]:
    """Python, key package versions and the mergelab git commit, for the record."""
    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        out["mergelab_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out["mergelab_commit"] = "unknown"
    return out


def environment() -> dict[str, Any]:
    """What else can change scores: torch's thread count and CPU kernel set (reductions
    differ with both), the machine, and every installed distribution with a sha256 of
    their sorted ``name==version`` lines (equal hashes: equal package sets)."""
    import torch

    packages: dict[str, str] = {}
    for dist in metadata.distributions():  # first on sys.path wins, as for metadata.version
        if dist.name:
            packages.setdefault(dist.name, dist.version)
    lines = "\n".join(sorted(f"{name}=={version}" for name, version in packages.items()))
    return {
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "packages_sha256": hashlib.sha256(lines.encode()).hexdigest(),
        "packages": dict(sorted(packages.items())),
    }
