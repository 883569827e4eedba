"""Run model-written Python (a candidate function plus its hidden tests) in a contained child.

Untrusted code never runs in the calling process. A :class:`Sandbox` is a **server**:
``python -I -S -B -c SERVER`` (isolated mode: no ``PYTHON*`` variables, no user or site
packages, no ``.pyc`` writes) with an **empty environment**, in a new session, its stdin
and stdout the job and result pipes. It enters a network namespace once (step 1 below),
then, for each program, **forks a fresh child** that contains itself (steps 2-3) and runs
the program: every program gets a pristine interpreter, as if freshly started, without
paying an interpreter start-up. :func:`run_code` runs one program in a sandbox of its
own; :func:`run_many` runs many, one server per CPU. For each program:

* the parent creates a fresh temporary directory (mode 0700) holding the child's working
  directory and its stdout/stderr files (outside the working directory, so the program
  cannot write them by path), and deletes it afterwards, whatever the child did;
* the child starts its own session (process group), gets ``/dev/null`` as stdin and the
  two files as stdout/stderr, closes every other descriptor (the server's pipes), changes
  to the working directory and sets ``TMPDIR`` to it (so ``tempfile`` works inside it);
* the server kills the child's process group on the wall-clock timeout (``timeout_s``, an
  interval timer) and reports its exit status; the parent classifies the outcome.

Containment, in order (step 1 in the server, before any untrusted code; 2-3 in each child):

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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["Sandbox", "SandboxResult", "Status", "run_code", "run_many"]

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


# The server runs with `python -I -S -B -c`, stdin the job pipe, stdout the result pipe; it
# must be self-contained (stdlib only). A job: 10 ASCII digits giving the payload's length,
# then the payload: work dir, stdout path, stderr path, nonce, memory bytes, cpu seconds,
# fsize bytes, wall seconds and the program, NUL-separated. A result line: "<rc> <timed out>".
_SERVER = r"""
import os, posix, resource, signal, sys

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



def _child(root, out, err, nonce, mem, cpu, fsize, source):
    # The forked child: contain itself, then run the program; never returns.
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    posix.setsid()  # its own session and process group, killed as a whole
    for target, path, flags in ((0, b"/dev/null", posix.O_RDONLY),
                                (1, out, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC),
                                (2, err, posix.O_WRONLY | posix.O_CREAT | posix.O_TRUNC)):
        fd = posix.open(path, flags, 0o600)
        posix.dup2(fd, target)
        posix.close(fd)
    posix.closerange(3, 1 << 30)  # nothing of the server's (its job and result pipes) stays
    posix.chdir(root)
    _root = posix.getcwd()
    os.environ["TMPDIR"] = _root  # the server's environment is otherwise empty
    sys.stdin = None
    for lim, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CORE, 0),
                     (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_NPROC, 0)):
        try:
            resource.setrlimit(lim, (val, val))
        except (ValueError, OSError):
            pass
    posix.write(2, b"@@MERGELAB_SANDBOX_NETNS@@%d\n" % _netns)

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

    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        code = compile(source, "<solution>", "exec")
    except (SyntaxError, ValueError) as e:
        sys.stderr.write(_exception_text(e))
        sys.stderr.flush()
        posix._exit(102)
    del source
    try:
        exec(code, ns)
    except MemoryError:
        ns.clear()
        posix.write(2, b"MemoryError\n")
        posix._exit(103)
    except SystemExit as e:
        sys.stderr.write("exited early (SystemExit %r)\n" % (e.code,))
        sys.stderr.flush()
        posix._exit(105)
    except BaseException as e:
        try:
            sys.stderr.write(_exception_text(e))
            sys.stderr.flush()
        except BaseException:
            pass
        posix._exit(101 if isinstance(e, AssertionError) else 104)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:
        pass
    posix.write(1, ("\n@@MERGELAB_SANDBOX_OK@@" + nonce + "\n").encode())
    posix._exit(0)


def _read(n):
    chunks = []
    while n:
        b = posix.read(0, min(n, 1 << 16))
        if not b:
            posix._exit(0)  # the parent closed the job pipe
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


_current = [0, 0]  # the running child's pid, and whether the wall clock ran out


def _on_alarm(signum, frame):
    _current[1] = 1
    for kill in (posix.killpg, posix.kill):
        try:
            kill(_current[0], signal.SIGKILL)
        except OSError:
            pass


signal.signal(signal.SIGALRM, _on_alarm)
while True:
    fields = _read(int(_read(10))).split(b"\0", 8)
    root, out, err = fields[:3]
    nonce = fields[3].decode("ascii")
    mem, cpu, fsize = (int(v) for v in fields[4:7])
    wall = float(fields[7])
    source = fields[8].decode("utf-8", "replace")
    pid = posix.fork()
    if pid == 0:
        try:
            _child(root, out, err, nonce, mem, cpu, fsize, source)
        finally:
            posix._exit(100)
    _current[0], _current[1] = pid, 0
    signal.setitimer(signal.ITIMER_REAL, wall)
    try:
        posix.waitid(posix.P_PID, pid, posix.WEXITED | posix.WNOWAIT)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    try:  # whatever is left in its group, while its pid is still reserved
        posix.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    status = posix.waitpid(pid, 0)[1]
    rc = -posix.WTERMSIG(status) if posix.WIFSIGNALED(status) else posix.WEXITSTATUS(status)
    posix.write(1, b"%d %d\n" % (rc, _current[1]))
"""


def _tail(path: str, limit: int = _OUTPUT_TAIL_BYTES) -> str:
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - limit))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:_DETAIL_CHARS] if lines else ""


def _check_limits(timeout_s: float, memory_mb: int) -> None:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if memory_mb < 32:
        raise ValueError(f"memory_mb must be >= 32, got {memory_mb}")


class Sandbox:
    """A sandbox server: one contained interpreter (started on first use, restarted if it
    dies) that forks a fresh child per program. Use from one thread; close it (or use it as
    a context manager) to stop the server."""

    def __init__(self, *, timeout_s: float = 5.0, memory_mb: int = 256) -> None:
        _check_limits(timeout_s, memory_mb)
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            for stream in (proc.stdin, proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            proc.kill()
            proc.wait()

    def _server(self) -> subprocess.Popen:
        if self._proc is None or self._proc.poll() is not None:
            self.close()
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", "-c", _SERVER],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                cwd="/",
                env={},
                start_new_session=True,
                close_fds=True,
            )
        return self._proc

    def _exchange(self, payload: bytes) -> tuple[int, bool] | None:
        """Send one job; ``(return code, timed out)``, or ``None`` if the server died."""
        proc = self._server()
        # The server enforces the wall clock; this watchdog only guards against a server
        # that stops answering.
        watchdog = threading.Timer(self.timeout_s + 30, proc.kill)
        watchdog.daemon = True
        watchdog.start()
        try:
            proc.stdin.write(b"%010d" % len(payload) + payload)
            proc.stdin.flush()
            line = proc.stdout.readline().split()
        except OSError:
            line = []
        finally:
            watchdog.cancel()
        if len(line) != 2:
            self.close()
            return None
        return int(line[0]), line[1] == b"1"

    def run(self, program: str) -> SandboxResult:
        """Run ``program`` (a candidate solution followed by its asserts) in a fresh child
        and classify the outcome (see the module docstring for the containment layers and
        the meaning of each status). Never raises for anything the program does."""
        if not isinstance(program, str):
            raise TypeError(f"program must be a str, got {type(program).__name__}")
        if "\x00" in program:
            return SandboxResult(False, "error", "program contains a NUL byte")
        nonce = secrets.token_hex(16)
        cpu_s = max(1, math.ceil(self.timeout_s))
        job = tempfile.mkdtemp(prefix="mergelab-sandbox-")
        work, out, err = (os.path.join(job, n) for n in ("work", "stdout", "stderr"))
        try:
            os.mkdir(work, 0o700)
            fields = [os.fsencode(work), os.fsencode(out), os.fsencode(err), nonce.encode()]
            fields += [b"%d" % v for v in (self.memory_mb * 1024 * 1024, cpu_s, _FSIZE_BYTES)]
            fields += [repr(float(self.timeout_s)).encode(), program.encode("utf-8")]
            answer = self._exchange(b"\0".join(fields))
            stdout, stderr = _tail(out), _tail(err)
        finally:
            shutil.rmtree(job, ignore_errors=True)
        netns = "@@MERGELAB_SANDBOX_NETNS@@1" in stderr

        def result(status: Status, detail: str) -> SandboxResult:
            return SandboxResult(status == "passed", status, detail[:_DETAIL_CHARS], netns)

        if answer is None:
            return result("error", "the sandbox server stopped answering")
        rc, timed_out = answer
        blocked = [
            ln[len(_BLOCKED_MARK) :] for ln in stderr.splitlines() if ln.startswith(_BLOCKED_MARK)
        ]
        errors = "\n".join(
            ln for ln in stderr.splitlines() if not ln.startswith("@@MERGELAB_SANDBOX")
        )
        if timed_out:
            return result("timeout", f"wall-clock timeout after {self.timeout_s:g} s")
        if rc in (-signal.SIGXCPU, -signal.SIGKILL):
            return result("timeout", f"CPU time limit ({cpu_s} s) exceeded")
        if blocked:
            return result("blocked", f"blocked: {blocked[0]}")
        if rc == _EXIT_MEMORY:
            return result("memory", f"MemoryError (limit {self.memory_mb} MiB)")
        if rc == 0 and f"{_OK_MARK}{nonce}" in stdout:
            return result("passed", "all tests passed")
        if rc == _EXIT_ASSERT:
            return result("failed", _last_line(errors) or "AssertionError")
        if rc in (_EXIT_SYNTAX, _EXIT_EXCEPTION):
            return result("error", _last_line(errors) or "exception")
        if rc == _EXIT_SYSEXIT:
            return result("failed", _last_line(errors))
        if rc < 0:
            return result("error", f"killed by signal {signal.Signals(-rc).name}")
        return result("failed", f"exited with code {rc} before the tests finished")


def run_code(program: str, *, timeout_s: float = 5.0, memory_mb: int = 256) -> SandboxResult:
    """:meth:`Sandbox.run` of one program in a sandbox of its own."""
    with Sandbox(timeout_s=timeout_s, memory_mb=memory_mb) as sandbox:
        return sandbox.run(program)


def run_many(
    programs: Sequence[str],
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 256,
    workers: int | None = None,
) -> list[SandboxResult]:
    """:meth:`Sandbox.run` of every program, results in the programs' order: ``workers``
    (default: one per CPU) threads, each with its own sandbox server, take the next
    program as they finish one."""
    _check_limits(timeout_s, memory_mb)
    if not programs:
        return []
    n = min(len(programs), workers or len(os.sched_getaffinity(0)) or 1)
    results: list[SandboxResult | None] = [None] * len(programs)
    todo = iter(enumerate(programs))
    lock = threading.Lock()
    failures: list[BaseException] = []

    def work() -> None:
        try:
            with Sandbox(timeout_s=timeout_s, memory_mb=memory_mb) as sandbox:
                while not failures:
                    with lock:
                        item = next(todo, None)
                    if item is None:
                        return
                    results[item[0]] = sandbox.run(item[1])
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread below
            failures.append(e)

    threads = [threading.Thread(target=work, name=f"sandbox-{i}") for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]
    return results  # type: ignore[return-value]
