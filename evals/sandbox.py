"""Run model-written Python (a candidate function plus its hidden tests) in a contained child.

:func:`run_code` never runs untrusted code in the calling process. Each call:

* creates a fresh temporary directory (mode 0700), used as the child's working directory and
  deleted afterwards, whatever the child did;
* starts ``python -I -S -B -c BOOTSTRAP`` (isolated mode: no ``PYTHON*`` variables, no user
  or site packages, no ``.pyc`` writes) with an **empty environment** but for ``TMPDIR``
  (the work directory, so ``tempfile`` works inside it), in a new session
  (its own process group), stdin a pipe that carries a per-run nonce and the program, and
  stdout/stderr anonymous temporary files (never pipes the child could fill);
* kills the whole process group on the wall-clock timeout (``timeout_s``, a timer thread;
  the parent otherwise blocks on the child's exit, so a run costs no more than the child).

The bootstrap, which runs before any untrusted code, in order:

1. **Network namespace (best effort).** ``unshare(CLONE_NEWNET)`` through ctypes (works as
   root or with ``CAP_SYS_ADMIN``), else ``unshare(CLONE_NEWUSER | CLONE_NEWNET)`` (works
   where unprivileged user namespaces are enabled). If either succeeds the child sees only a
   loopback device that is down, so even a hook bypass cannot reach any network. If both
   fail (e.g. a locked-down container) the audit hook below is the network barrier.
   ctypes is then dropped from ``sys.modules`` so the program cannot reuse it.
2. **Resource limits** (soft = hard, so they cannot be raised again): ``RLIMIT_AS``
   (``memory_mb``; a memory bomb gets ``MemoryError``), ``RLIMIT_CPU`` (``ceil(timeout_s)``,
   SIGXCPU/SIGKILL past it), ``RLIMIT_FSIZE`` (1 MiB per written file, stdout/stderr
   included), ``RLIMIT_CORE`` 0, ``RLIMIT_NOFILE`` 64 and ``RLIMIT_NPROC`` 0 (no fork and no
   threads; not enforced for root, for whom the audit hook blocks process creation instead).
3. **Audit hook** (``sys.addaudithook``; Python offers no way to remove one). It raises
   :class:`PermissionError` for, and reports to the parent:

   * every ``socket.*`` event (creating a socket, DNS lookups, connect, bind...), so a
     network call fails before any packet is sent;
   * process creation and signals: ``subprocess.Popen``, ``os.system``, ``os.exec*``,
     ``os.spawn*``, ``os.posix_spawn``, ``os.fork``, ``os.forkpty``, ``os.kill``,
     ``os.killpg``, ``signal.pthread_kill``; importing ``_posixsubprocess`` (so importing
     ``subprocess``/``multiprocessing`` already fails);
   * ctypes (every ``ctypes.*`` event; importing ``ctypes``/``_ctypes``), and other native
     file writers: ``_sqlite3``, ``_dbm``, ``_gdbm``, ``_posixshmem``, ``sqlite3.connect``;
   * ``resource.setrlimit``/``prlimit``, ``os.chmod``/``chown``/``chflags``, links and
     symlinks, ``webbrowser.open``;
   * writes, creations, truncations, removals and renames (``open`` for writing, ``os.open``
     with write flags, ``os.remove``/``rmdir``/``mkdir``/``rename``/``replace``/
     ``truncate``/``utime``, ``shutil.*`` via those) of any path outside the temporary
     directory, or relative to a ``dir_fd``. Reading files is allowed (imports need it).

   The hook's state is bound into default arguments (replacing them is itself an audited
   event that the hook blocks), not read from module globals.

Result: :class:`SandboxResult` with ``status``:

* ``"passed"``: the program ran to its end (the bootstrap printed the run's nonce);
* ``"failed"``: an ``AssertionError`` (a hidden test failed), or the program stopped early
  (``sys.exit``, ``os._exit``);
* ``"error"``: a syntax error or any other exception (``NameError``, ``TypeError``...);
* ``"timeout"``: the wall clock or the CPU limit ran out (the process group was killed);
* ``"memory"``: ``MemoryError`` (the address-space limit was hit);
* ``"blocked"``: the program attempted something the audit hook forbids (reported even if
  the program caught the ``PermissionError``).

Threat model: this contains *model-written* code (buggy, occasionally naive about files or
the network) on a machine you control. Audit hooks are not a security boundary against a
determined adversary in the same interpreter (CPython documents as much); the OS-level
layers (separate process and session, no inherited environment, rlimits, private temp dir,
and the network namespace where available) bound what a bypass could do. For hostile code
use a container or VM sandbox.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import Literal

__all__ = ["SandboxResult", "Status", "run_code"]

Status = Literal["passed", "failed", "timeout", "memory", "blocked", "error"]

_FSIZE_BYTES = 1 << 20
_DETAIL_CHARS = 500
_OUTPUT_TAIL_BYTES = 64 * 1024

# Exit codes of the bootstrap (anything else: the program called os._exit itself).
_EXIT_ASSERT, _EXIT_SYNTAX, _EXIT_MEMORY, _EXIT_EXCEPTION, _EXIT_SYSEXIT = 101, 102, 103, 104, 105
_BLOCKED_MARK = "@@MERGELAB_SANDBOX_BLOCKED@@"
_OK_MARK = "@@MERGELAB_SANDBOX_OK@@"


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one :func:`run_code` call. ``passed`` is ``status == "passed"``;
    ``detail`` is a short human-readable reason (last line of the error, the blocked
    event...); ``network_isolated`` says whether the child got its own network namespace."""

    passed: bool
    status: Status
    detail: str
    network_isolated: bool = False


# The bootstrap runs in the child with `python -I -S -B -c`. argv: memory bytes, cpu seconds,
# fsize bytes. stdin: nonce line, then the program. It must be self-contained (stdlib only).
_BOOTSTRAP = r"""
import sys, posix
_nonce = sys.stdin.buffer.readline().decode("ascii").strip()
_source = sys.stdin.buffer.read().decode("utf-8", "replace")
sys.stdin = None
_mem, _cpu, _fsize = (int(v) for v in sys.argv[1:4])
_root = posix.getcwd()


def _write_file(path, data):
    fd = posix.open(path, posix.O_WRONLY)
    try:
        posix.write(fd, data)
    finally:
        posix.close(fd)


_netns = 0
try:
    import ctypes
    _libc = ctypes.CDLL(None, use_errno=True)
    _uid, _gid = posix.getuid(), posix.getgid()
    if _libc.unshare(0x40000000) == 0:  # CLONE_NEWNET
        _netns = 1
    elif _libc.unshare(0x10000000 | 0x40000000) == 0:  # CLONE_NEWUSER | CLONE_NEWNET
        _netns = 1
        try:  # map our own uid/gid so file ownership inside the namespace stays valid
            _write_file("/proc/self/setgroups", b"deny")
            _write_file("/proc/self/uid_map", b"%d %d 1" % (_uid, _uid))
            _write_file("/proc/self/gid_map", b"%d %d 1" % (_gid, _gid))
        except OSError:
            pass
    del _libc, ctypes
except Exception:
    pass
for _m in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
    del sys.modules[_m]

import resource
for _lim, _val in ((resource.RLIMIT_AS, _mem), (resource.RLIMIT_CPU, _cpu),
                   (resource.RLIMIT_FSIZE, _fsize), (resource.RLIMIT_CORE, 0),
                   (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_NPROC, 0)):
    try:
        resource.setrlimit(_lim, (_val, _val))
    except (ValueError, OSError):
        pass
posix.write(2, b"@@MERGELAB_SANDBOX_NETNS@@%d\n" % _netns)

_BLOCK = frozenset((
    "subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
    "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill", "os.startfile",
    "resource.setrlimit", "resource.prlimit", "os.chmod", "os.chown", "os.chflags",
    "os.lchflags", "os.lchmod", "os.lchown", "os.link", "os.symlink", "os.setxattr",
    "os.removexattr", "webbrowser.open", "sqlite3.connect", "sqlite3.connect/handle",
    "sys.remote_exec", "pty.spawn",
))
_BLOCK_PREFIX = ("socket.", "ctypes.")
_BLOCK_IMPORT = frozenset(("ctypes", "_ctypes", "_posixsubprocess", "_sqlite3", "sqlite3",
                           "_dbm", "_gdbm", "dbm", "_posixshmem", "_multiprocessing"))
_PROTECTED_ATTRS = frozenset(("__code__", "__defaults__", "__kwdefaults__"))
# event -> (indices of path arguments, indices of dir_fd arguments)
_PATHS = {
    "os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
    "os.rename": ((0, 1), (2, 3)), "os.truncate": ((0,), ()), "os.utime": ((0,), (3,)),
    "os.mkfifo": ((0,), (2,)), "os.mknod": ((0,), (3,)), "shutil.rmtree": ((0,), (1,)),
}
_WRITE_FLAGS = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND


def _mergelab_sandbox_hook(
        event, args, *, _block=_BLOCK, _prefix=_BLOCK_PREFIX, _imports=_BLOCK_IMPORT,
        _protected=_PROTECTED_ATTRS, _paths=_PATHS, _wflags=_WRITE_FLAGS, _root=_root,
        _getcwd=posix.getcwd, _fspath=posix.fspath, _write=posix.write,
        _isinstance=isinstance, _str=str, _bytes=bytes, _int=int, _len=len, _repr=repr,
        _any=any, _Error=PermissionError, _default_fds=(None, -1, -100),
        _function=type(_write_file)):
    def inside(p):
        if _isinstance(p, _int):
            return True  # an already-open descriptor
        try:
            p = _fspath(p)
        except Exception:
            return False
        if _isinstance(p, _bytes):
            p = p.decode("utf-8", "surrogateescape")
        if not p.startswith("/"):
            p = _getcwd() + "/" + p
        parts = []
        for part in p.split("/"):
            if part == "..":
                if parts:
                    parts.pop()
            elif part and part != ".":
                parts.append(part)
        p = "/" + "/".join(parts)
        return p == _root or p.startswith(_root + "/")

    reason = None
    if event in _block or event.startswith(_prefix):
        reason = event
    elif event == "import":
        if args[0] in _imports:
            reason = "import " + args[0]
    elif event == "open":
        path, mode, flags = args[0], args[1], args[2]
        if mode is None:  # os.open: its dir_fd is not audited, so only paths inside
            if not inside(path):
                reason = "os.open " + _repr(path)
        elif ((_isinstance(flags, _int) and flags & _wflags)
              or (_isinstance(mode, _str) and _any(c in mode for c in "wax+"))):
            if not inside(path):
                reason = "open for writing " + _repr(path)
    elif event == "object.__setattr__" or event == "object.__delattr__":
        target = args[0]
        if (_isinstance(target, _function) and args[1] in _protected
                and target.__code__.co_name == "_mergelab_sandbox_hook"
                and target.__code__.co_filename == "<string>"):
            reason = "modifying the sandbox's audit hook"
    elif event in _paths:
        idx, fd_idx = _paths[event]
        for i in fd_idx:
            if i < _len(args) and args[i] not in _default_fds:
                reason = event + " with dir_fd"
        if reason is None:
            for i in idx:
                if not inside(args[i]):
                    reason = event + " " + _repr(args[i])
                    break
    if reason is not None:
        try:
            _write(2, ("@@MERGELAB_SANDBOX_BLOCKED@@" + reason.replace("\n", " ")[:300]
                       + "\n").encode("utf-8", "replace"))
        except Exception:
            pass
        raise _Error("blocked by the mergelab sandbox: " + reason)


sys.dont_write_bytecode = True
sys.addaudithook(_mergelab_sandbox_hook)
del _mergelab_sandbox_hook


def _exception_text(e):
    # The last line of traceback.format_exception_only, built by hand: importing traceback
    # costs about as much as the rest of the start-up, and most generated programs fail.
    cls = type(e)
    name = cls.__qualname__
    if cls.__module__ not in ("builtins", "__main__"):
        name = cls.__module__ + "." + name
    try:
        msg = str(e.msg if isinstance(e, SyntaxError) else e)
    except BaseException:
        msg = "<exception str() failed>"
    return name + (": " + msg if msg else "") + "\n"


_ns = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    _code = compile(_source, "<solution>", "exec")
except (SyntaxError, ValueError) as _e:
    sys.stderr.write(_exception_text(_e))
    sys.stderr.flush()
    posix._exit(102)
del _source
try:
    exec(_code, _ns)
except MemoryError:
    _ns.clear()
    posix.write(2, b"MemoryError\n")
    posix._exit(103)
except SystemExit as _e:
    sys.stderr.write("exited early (SystemExit %r)\n" % (_e.code,))
    sys.stderr.flush()
    posix._exit(105)
except BaseException as _e:
    try:
        sys.stderr.write(_exception_text(_e))
        sys.stderr.flush()
    except BaseException:
        pass
    posix._exit(101 if isinstance(_e, AssertionError) else 104)
try:
    sys.stdout.flush()
    sys.stderr.flush()
except BaseException:
    pass
posix.write(1, ("\n@@MERGELAB_SANDBOX_OK@@" + _nonce + "\n").encode())
posix._exit(0)
"""


def _tail(fh, limit: int = _OUTPUT_TAIL_BYTES) -> str:
    fh.flush()
    size = fh.seek(0, os.SEEK_END)
    fh.seek(max(0, size - limit))
    return fh.read().decode("utf-8", "replace")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:_DETAIL_CHARS] if lines else ""


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _on_timeout(proc: subprocess.Popen, timed_out: threading.Event) -> None:
    timed_out.set()
    _kill_group(proc)


def run_code(program: str, *, timeout_s: float = 5.0, memory_mb: int = 256) -> SandboxResult:
    """Run ``program`` (a candidate solution followed by its asserts) in a contained child
    process and classify the outcome (see the module docstring for the containment layers
    and the meaning of each status). Never raises for anything the program does."""
    if not isinstance(program, str):
        raise TypeError(f"program must be a str, got {type(program).__name__}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if memory_mb < 32:
        raise ValueError(f"memory_mb must be >= 32, got {memory_mb}")
    if "\x00" in program:
        return SandboxResult(False, "error", "program contains a NUL byte")

    nonce = secrets.token_hex(16)
    workdir = tempfile.mkdtemp(prefix="mergelab-sandbox-")
    cpu_s = max(1, math.ceil(timeout_s))
    cmd = [
        sys.executable,
        "-I",
        "-S",
        "-B",
        "-c",
        _BOOTSTRAP,
        str(memory_mb * 1024 * 1024),
        str(cpu_s),
        str(_FSIZE_BYTES),
    ]
    timed_out = threading.Event()
    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=err,
                cwd=workdir,
                env={"TMPDIR": workdir},  # tempfile's default directory: the work directory
                start_new_session=True,
                close_fds=True,
            )
            # The wall-clock limit is a timer that kills the group; communicate() itself waits
            # without a timeout, i.e. blocks in waitpid and returns the moment the child exits
            # (with a timeout, Popen polls with sleeps of up to 50 ms, which would dominate
            # the run time of a passing program).
            timer = threading.Timer(timeout_s, _on_timeout, (proc, timed_out))
            timer.daemon = True
            timer.start()
            try:
                proc.communicate(input=(nonce + "\n" + program).encode("utf-8"))
            finally:
                timer.cancel()
                _kill_group(proc)  # anything left behind in its group
                proc.wait()
            stdout, stderr = _tail(out), _tail(err)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    netns = "@@MERGELAB_SANDBOX_NETNS@@1" in stderr
    blocked = [
        ln[len(_BLOCKED_MARK) :] for ln in stderr.splitlines() if ln.startswith(_BLOCKED_MARK)
    ]
    errors = "\n".join(ln for ln in stderr.splitlines() if not ln.startswith("@@MERGELAB_SANDBOX"))
    rc = proc.returncode

    def result(status: Status, detail: str) -> SandboxResult:
        return SandboxResult(status == "passed", status, detail[:_DETAIL_CHARS], netns)

    if timed_out.is_set():
        return result("timeout", f"wall-clock timeout after {timeout_s:g} s")
    if rc in (-signal.SIGXCPU, -signal.SIGKILL):
        return result("timeout", f"CPU time limit ({cpu_s} s) exceeded")
    if blocked:
        return result("blocked", f"blocked: {blocked[0]}")
    if rc == _EXIT_MEMORY:
        return result("memory", f"MemoryError (limit {memory_mb} MiB)")
    if rc == 0 and f"{_OK_MARK}{nonce}" in stdout:
        return result("passed", "all tests passed")
    if rc == _EXIT_ASSERT:
        return result("failed", _last_line(errors) or "AssertionError")
    if rc in (_EXIT_SYNTAX, _EXIT_EXCEPTION):
        return result("error", _last_line(errors) or "exception")
    if rc == _EXIT_SYSEXIT:
        return result("failed", _last_line(errors))
    if rc is not None and rc < 0:
        return result("error", f"killed by signal {signal.Signals(-rc).name}")
    return result("failed", f"exited with code {rc} before the tests finished")
