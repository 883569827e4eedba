"""Run model-written Python (a candidate solution, then its hidden tests) in an OS sandbox.

Untrusted code never runs in the calling process. Each program gets a fresh interpreter,
``python -I -S -B -c RUNNER`` (isolated mode: no ``PYTHON*`` variables, no site or user
packages, no ``.pyc`` writes), started for that program alone; the solution and the tests
go in over its stdin, and its result comes back over its stdout, a pipe (no host file or
directory is used per program, so a killed harness leaks nothing). Two modes
(:func:`set_mode`, else the ``MERGELAB_SANDBOX`` environment variable, else
``"isolated"``):

``isolated`` (the default): the interpreter runs under bubblewrap (``bwrap``), one
sandbox per program (a per-worker server would let one program tamper with the next):

* new user, pid, network, ipc, uts, mount and (where possible) cgroup namespaces, no
  further user namespaces (``--disable-userns``), no capabilities (``--cap-drop ALL``),
  uid/gid :data:`SANDBOX_UID` inside, a cleared environment, ``--new-session`` (no
  terminal injection) and ``--die-with-parent``;
* the file system is a read-only view of only the interpreter (its executable, shared
  library and standard library, with ``site-packages`` hidden) and the system's shared
  library directories (``/lib``, ``/lib64``, ``/usr/lib``, ``/usr/lib64``: the C library
  and what the stdlib's extension modules link against), ``/usr/share/zoneinfo``
  (``zoneinfo``) and ``/etc/ld.so.cache`` when present (the loader finds a shared
  libpython outside its default paths, e.g. in ``/usr/local/lib``, through it; the
  library file itself is bound, not its directory, which holds ``site-packages``), an
  ``/etc/passwd`` and ``/etc/group`` naming only :data:`SANDBOX_UID` (``getpass``,
  ``pwd``, ``grp``; written into a pipe per run, ``--ro-bind-data``), a fresh ``/proc``
  (only the sandbox's processes) and a read-only ``/dev``; the only writable place is a
  private tmpfs at ``/tmp`` (the working directory and ``TMPDIR``) of :data:`DISK_BYTES`;
* the outer uid is not root either: a caller running as root starts ``bwrap`` as
  :data:`SANDBOX_UID` through ``setpriv`` (util-linux), so a namespace escape would land
  as "nobody", not root. When an interpreter directory is not traversable by that uid
  (e.g. ``/root/.pyenv`` under a 0700 ``/root``; ``bwrap`` resolves bind sources as its
  caller), a first, root-run ``bwrap`` (a private mount namespace only, running nothing
  but ``setpriv``) masks the closed directory with a tmpfs holding read-only binds of just
  those paths, then drops to :data:`SANDBOX_UID` and starts the real sandbox;
* resource limits, soft = hard, set by the runner before any untrusted code:
  ``RLIMIT_AS`` (``memory_mb``; a memory bomb gets ``MemoryError``), ``RLIMIT_CPU``
  (``ceil(timeout_s)``), ``RLIMIT_FSIZE`` (:data:`FILE_BYTES` per file), ``RLIMIT_CORE``
  0, ``RLIMIT_NOFILE`` 64 and ``RLIMIT_NPROC`` :data:`NPROC` (the uid is not root, so it
  binds; it counts threads too, so it cannot be 1 without breaking correct programs that
  use ``threading`` or a thread pool: a fork bomb that gets past the audit hook is held to
  that many processes, inside the pid namespace, until the wall clock kills it);
* the wall clock (``timeout_s``, counted from the launch) is enforced from outside: the
  launcher's process group is killed (SIGKILL), which takes the sandbox's pid 1, and so
  its whole pid namespace and every process the program started, down with it. The group
  is also killed after a normal exit, for whatever of the launcher chain remains. The
  deadline holds whatever the program does with its output: after the result pipe's end
  of file the launcher is waited for only for the time left.

Cost: one ``bwrap`` and one interpreter start per program, some 20-40 ms of CPU (1,200
short programs took ~45 s on two busy cores, against ~5 s for the earlier design's children
forked from a warm server). A per-worker server would be cheaper but would share one
sandbox, and its uid, between programs.

Whether it works is checked once per process and ``bwrap`` path (a trivial program run
through it, ~30 ms). Where ``bwrap`` is missing, older than 0.8 (``--disable-userns``
needs 0.8, ``--size`` 0.7; Ubuntu 22.04 ships 0.6.1: refused, never run with less
isolation), or user namespaces are disabled, code runs refuse with
:class:`SandboxUnavailable` (how to install, or how to opt in to ``weak``).

``weak`` (explicit opt-in; mergelab's earlier design): the same runner without bubblewrap,
with an empty environment and its own session, a host temporary directory (removed
afterwards) as working directory, a network namespace where the kernel allows one,
the same rlimits (``RLIMIT_NPROC`` 0, which does not bind root; for another uid it counts
all of that uid's processes, so threads fail there too) and the audit hook below
as the main barrier. Not a boundary against hostile code: no pid namespace, so a program
that gets past the hook can signal or read any process the harness's uid can.

In both modes an **audit hook** (``sys.addaudithook``) is a second layer: it raises
:class:`PermissionError` for, and reports, sockets and DNS, process creation and
signals, ``_posixsubprocess``/``ctypes``, ``gc.get_objects``/``get_referrers``/
``get_referents``, adding audit hooks, ``setrlimit``, ``chmod``/``chown``, links, and
writes, removals and renames outside the working directory (``dir_fd`` arguments are
resolved through ``/proc/self/fd``; ``sqlite3`` may use memory or the working directory).
Everything it reads is bound into its positional defaults and immutable (tuples,
frozensets, builtins), so nothing can empty its tables in place; path arguments are
converted to exact ``str`` with ``str.encode``/``bytes.decode``, never through the
argument's own (overridable) methods. A ``__fspath__`` that answers differently on its
second call can still fool it; in ``isolated`` mode the kernel, not the hook, decides.

**Semantics.** The runner executes the solution, then the tests, as ``__main__`` (a fresh
module: ``import __main__`` reaches the program's namespace, not the runner's). stdin is
``/dev/null`` (``input()`` raises ``EOFError``); stdout and stderr are discarded; ``exit``
and ``quit`` exist as with ``site``. ``SystemExit`` (``exit()``, ``quit()``,
``sys.exit()``) in the solution ends its top-level code and **the tests still run**;
during the tests, or for a program given without separate tests, it is ``"failed"``.
``os._exit`` or a signal ends the process before the runner reports: ``"failed"``. So
exiting early never skips the tests into a pass.

Result: :class:`SandboxResult` with ``status``:

* ``"passed"``: the runner finished the tests and reported so, and the sandbox exited 0;
* ``"failed"``: an ``AssertionError``, or the program stopped before the tests finished;
* ``"error"``: a syntax error or any other exception (``NameError``, ``TypeError``...);
* ``"timeout"``: the wall clock or the CPU limit ran out;
* ``"memory"``: ``MemoryError`` (the address-space limit was hit);
* ``"blocked"``: the audit hook stopped something (reported even if the program caught the
  ``PermissionError``).

**What a hostile program can still fake.** The verdict is the runner's report, read from
the sandbox's stdout; there is no secret (nonce) to find in memory, and the program's own
output goes nowhere, so printing a mark, reading anything, or ``os._exit(0)`` before the
tests never yields a pass. But the tests run in the same interpreter as the solution, so a
program written to cheat *this* runner can: write the runner's report line to its own
stdout descriptor and exit; make the asserts vacuous (objects whose ``__eq__`` is always
true, shadowing the tests' names); or, through an interpreter memory-safety bug, rewrite
the runner or the hook. Deciding pass/fail outside the interpreter would need the tests to
run in a separate process that sees only serialised return values (changing what HumanEval
/ MBPP tests can express). What no program can do, in ``isolated`` mode: read the
harness's environment, files or memory, reach any network, write outside its tmpfs,
outlive its run, signal or trace another process, or change another program's verdict.
"""

from __future__ import annotations

import functools
import math
import os
import select
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "MODES",
    "Sandbox",
    "SandboxResult",
    "SandboxUnavailable",
    "Status",
    "current_mode",
    "describe",
    "run_code",
    "run_many",
    "set_mode",
]

Status = Literal["passed", "failed", "timeout", "memory", "blocked", "error"]
MODES = ("isolated", "weak")
SANDBOX_UID = 65534  # "nobody": the uid inside the sandbox, and outside when the caller is root
FILE_BYTES = 1 << 20
DISK_BYTES = 16 << 20
_DETAIL_CHARS = 500
_CHANNEL_BYTES = 64 * 1024
_ENV_VAR = "MERGELAB_SANDBOX"
_INSTALL_HINT = (
    "Install bubblewrap >= 0.8 with `apt-get install bubblewrap` (Debian 12, Ubuntu 24.04; "
    "older releases ship older versions: use backports or build it from source; the kernel "
    "must allow unprivileged user "
    "namespaces: sysctl user.max_user_namespaces > 0, and kernel.unprivileged_userns_clone=1 "
    "where that setting exists), or opt in to the weaker audit-hook sandbox with the config "
    "option `sandbox: weak` (or MERGELAB_SANDBOX=weak)."
)
MIN_BWRAP = (0, 8)  # --disable-userns (0.8), --size (0.7)
NPROC = 32  # RLIMIT_NPROC inside the isolated sandbox: threads and a thread pool, not a bomb
# read-only system files a correct program may need, bound when present: time zones
# (zoneinfo) and the dynamic loader's cache (a shared libpython outside the default paths,
# e.g. under /usr/local/lib, is found through it)
_SYSTEM_FILES = ("/usr/share/zoneinfo", "/etc/ld.so.cache")
_PASSWD = f"nobody:x:{SANDBOX_UID}:{SANDBOX_UID}:nobody:/tmp:/nonexistent\n".encode()
_GROUP = f"nogroup:x:{SANDBOX_UID}:\n".encode()
_PASSWD_FD, _GROUP_FD = "@passwd-fd@", "@group-fd@"  # replaced by a pipe's fd per run
_mode: str | None = None
_AUDIT_HOOK = True  # tests turn it off to show that the OS layer alone contains attacks


class SandboxUnavailable(RuntimeError):
    """``isolated`` mode was asked for but bubblewrap cannot run here."""


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one :meth:`Sandbox.run`. ``passed`` is ``status == "passed"``; ``detail``
    is a short human-readable reason; ``network_isolated`` says whether the program had no
    network (always true in ``isolated`` mode)."""

    passed: bool
    status: Status
    detail: str
    network_isolated: bool = False


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"config option `sandbox` must be 'isolated' or 'weak', got {mode!r}")
    return mode


def set_mode(mode: str) -> None:
    """Choose the sandbox mode for this process (wins over ``MERGELAB_SANDBOX``)."""
    global _mode
    _mode = _check_mode(mode)


def current_mode() -> str:
    """:func:`set_mode`'s choice, else ``MERGELAB_SANDBOX``, else ``"isolated"``."""
    return _mode or _check_mode(os.environ.get(_ENV_VAR) or "isolated")


# The runner: run with `python -I -S -B -c _RUNNER MODE MEM CPU FSIZE NPROC HOOK`, stdin the job
# ("<solution bytes> <tests bytes>\n" then both), stdout the result channel: lines
# "<status>\t<detail>", "blocked\t<event>", "netns\t<0|1>". Stdlib only.
_RUNNER = r"""
import posix, resource, sys


def _exception_text(e):
    # the last line of traceback.format_exception_only, built by hand (importing traceback
    # costs about as much as the rest of the start-up)
    cls = type(e)
    name = cls.__qualname__
    if cls.__module__ not in ("builtins", "__main__"):
        name = cls.__module__ + "." + name
    try:
        msg = str(e.msg if isinstance(e, SyntaxError) else e)
    except BaseException:
        msg = "<exception str() failed>"
    return name + (": " + msg if msg else "")


def _read_job():
    header = b""
    while not header.endswith(b"\n"):
        c = posix.read(0, 1)
        if not c:
            posix._exit(3)
        header += c
    sizes = [int(v) for v in header.split()]
    data = bytearray()
    while len(data) < sum(sizes):
        chunk = posix.read(0, 1 << 16)
        if not chunk:
            posix._exit(3)
        data += chunk
    return (bytes(data[: sizes[0]]).decode("utf-8", "replace"),
            bytes(data[sizes[0]:]).decode("utf-8", "replace"))


def _netns():
    # weak mode only: a network namespace where the kernel allows one (root, or unprivileged
    # user namespaces), then ctypes is dropped again
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.unshare(0x40000000) == 0 or libc.unshare(0x10000000 | 0x40000000) == 0
    except Exception:
        ok = False
    for m in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[m]
    return ok


def _hook_factory(chan, root):
    blocked_events = frozenset((
        "subprocess.Popen", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
        "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill", "os.startfile",
        "resource.setrlimit", "resource.prlimit", "os.chmod", "os.chown", "os.chflags",
        "os.lchflags", "os.lchmod", "os.lchown", "os.link", "os.symlink", "os.setxattr",
        "os.removexattr", "webbrowser.open", "sys.remote_exec", "pty.spawn",
        "sys.addaudithook", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
        "os.setns", "os.unshare",
    ))
    # (event, indices of its path arguments, indices of its dir_fd arguments); tuples and
    # frozensets only: nothing the hook reads can be changed in place
    path_events = (
        ("os.remove", (0,), (1,)), ("os.rmdir", (0,), (1,)), ("os.mkdir", (0,), (2,)),
        ("os.rename", (0, 1), (2, 3)), ("os.truncate", (0,), ()), ("os.utime", (0,), (3,)),
        ("os.mkfifo", (0,), (2,)), ("os.mknod", (0,), (3,)), ("shutil.rmtree", (0,), (1,)),
        ("sqlite3.connect", (0,), ()),
    )
    path_names = frozenset(e[0] for e in path_events)
    imports = frozenset(("ctypes", "_ctypes", "_posixsubprocess", "_dbm", "_gdbm", "dbm",
                         "_posixshmem", "_multiprocessing"))
    write_flags = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND

    def _mergelab_sandbox_hook(
            event, args, _blocked=blocked_events, _prefixes=("socket.", "ctypes."),
            _imports=imports, _path_events=path_events, _path_names=path_names,
            _wflags=write_flags, _root=root, _chan=chan, _getcwd=posix.getcwd,
            _fspath=posix.fspath, _readlink=posix.readlink, _write=posix.write,
            _encode=str.encode, _decode=bytes.decode, _isinstance=isinstance, _str=str,
            _bytes=bytes, _int=int, _len=len, _repr=repr, _any=any, _Error=PermissionError,
            _default_fds=(None, -1, -100), _function=type(_exception_text),
            _protected=frozenset(("__code__", "__defaults__", "__kwdefaults__"))):
        def exact(p):
            # an exact str whatever subclass p is (its own methods are never called)
            try:
                p = _fspath(p)
            except Exception:
                return None
            if _isinstance(p, _str):
                p = _encode(p, "utf-8", "surrogateescape")
            return _decode(p, "utf-8", "surrogateescape")

        def inside(p, base=None):
            if _isinstance(p, _int):
                return True  # an already-open descriptor
            p = exact(p)
            if p is None or p.startswith("file:"):
                return False
            if p == ":memory:" or p == "":
                return True  # sqlite3's in-memory and temporary databases
            if not p.startswith("/"):
                p = (base if base is not None else _getcwd()) + "/" + p
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
        if event in _blocked or event.startswith(_prefixes):
            reason = event
        elif event == "import":
            if args[0] in _imports:
                reason = "import " + exact(args[0])
        elif event == "open":
            path, mode, flags = args[0], args[1], args[2]
            if mode is None:  # os.open: its dir_fd is not audited, so only paths inside
                if not inside(path):
                    reason = "os.open " + _repr(exact(path))
            elif ((_isinstance(flags, _int) and flags & _wflags)
                  or (_isinstance(mode, _str) and _any(c in mode for c in "wax+"))):
                if not inside(path):
                    reason = "open for writing " + _repr(exact(path))
        elif event == "object.__setattr__" or event == "object.__delattr__":
            if (_isinstance(args[0], _function) and args[1] in _protected
                    and args[0].__code__.co_name == "_mergelab_sandbox_hook"):
                reason = "modifying the sandbox's audit hook"
        elif event in _path_names:
            for name, idx, fd_idx in _path_events:
                if name != event:
                    continue
                base = None
                for i in fd_idx:
                    if i < _len(args) and args[i] not in _default_fds:
                        try:
                            base = _readlink("/proc/self/fd/%d" % args[i])
                        except Exception:
                            reason = event + " with an unknown dir_fd"
                for i in idx:
                    if reason is None and i < _len(args) and not inside(args[i], base):
                        reason = event + " " + _repr(exact(args[i]))
        if reason is not None:
            try:
                _write(_chan, ("\nblocked\t" + reason.replace("\n", " ")[:300]
                               + "\n").encode("utf-8", "replace"))
            except Exception:
                pass
            raise _Error("blocked by the mergelab sandbox: " + reason)

    return _mergelab_sandbox_hook


def _main():
    weak = sys.argv[1] == "weak"
    mem, cpu, fsize, nproc, hook = (int(v) for v in sys.argv[2:7])
    solution, tests = _read_job()
    chan = posix.dup(1)  # the result channel: the pipe the parent reads
    null = posix.open("/dev/null", posix.O_RDWR)
    for fd in (0, 1, 2):  # the program's stdin is at EOF; its output is discarded
        posix.dup2(null, fd)
    posix.close(null)
    if weak:
        posix.write(chan, b"\nnetns\t%d\n" % _netns())
    root = posix.getcwd()
    import os
    os.environ["TMPDIR"] = root
    for lim, val in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu),
                     (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_CORE, 0),
                     (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_NPROC, nproc)):
        try:
            resource.setrlimit(lim, (val, val))
        except (ValueError, OSError):
            pass

    # bound now: the program may replace builtins and module attributes before the runner
    # reports (it cannot rebind these locals)
    def report(status, detail, _write=posix.write, _exit=posix._exit, _str=str):
        try:
            _write(chan, ("\n" + status + "\t" + _str(detail).replace("\n", " ")[:500]
                          + "\n").encode("utf-8", "replace"))
        finally:
            _exit(0)

    def _exit(code=None):
        raise SystemExit(code)

    import builtins
    builtins.exit = builtins.quit = _exit  # as site.py would add them
    main = type(sys)("__main__")  # the program's own __main__, not the runner's globals
    sys.modules["__main__"] = main
    ns = main.__dict__
    ns["__builtins__"] = builtins
    sys.dont_write_bytecode = True
    if hook:
        sys.addaudithook(_hook_factory(chan, root))
    has_tests = bool(tests.strip())
    try:
        codes = (compile(solution, "<solution>", "exec"), compile(tests, "<tests>", "exec"))
    except (SyntaxError, ValueError) as e:
        report("error", _exception_text(e))
    del solution, tests
    run = exec
    for part, code in enumerate(codes):
        try:
            run(code, ns)
        except SystemExit as e:
            # exit()/quit()/sys.exit() end the solution's top-level code and the hidden tests
            # still run; during the tests (or with no separate tests) it is a failure
            if part == 1 or not has_tests:
                report("failed", "exited before the tests finished (SystemExit %r)" % (e.code,))
        except MemoryError:
            ns.clear()
            report("memory", "MemoryError")
        except AssertionError as e:
            report("failed", _exception_text(e))
        except BaseException as e:
            report("error", _exception_text(e))
    report("passed", "all tests passed")


_main()
"""


def _needs_mask(path: str) -> str | None:
    """The highest ancestor directory of ``path`` that :data:`SANDBOX_UID` cannot traverse
    (no execute bit for others), or None."""
    parts = path.split("/")[1:-1]
    for i in range(1, len(parts) + 1):
        d = "/" + "/".join(parts[:i])
        if not os.stat(d).st_mode & stat.S_IXOTH:
            return d
    return None


def _interpreter_paths() -> tuple[str, list[str], list[str]]:
    """The interpreter's executable, the paths to bind for it (executable, shared library,
    standard library), and the directories to hide inside those (site-packages)."""
    exe = os.path.realpath(sys.executable)
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    paths = [exe, stdlib]
    libdir, soname = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")
    if sysconfig.get_config_var("Py_ENABLE_SHARED") and libdir and soname:
        lib = os.path.join(libdir, soname)
        if os.path.exists(lib):
            paths.append(lib)
    hidden = [p for p in (os.path.join(stdlib, "site-packages"),) if os.path.isdir(p)]
    return exe, paths, hidden


def _bwrap_argv(bwrap: str) -> list[str]:
    """The command line up to and including the interpreter (see the module docstring)."""
    exe, paths, hidden = _interpreter_paths()
    inner = [
        bwrap,
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--die-with-parent",
        "--new-session",
        "--cap-drop",
        "ALL",
        "--uid",
        str(SANDBOX_UID),
        "--gid",
        str(SANDBOX_UID),
        "--clearenv",
        "--hostname",
        "sandbox",
    ]
    for d in ("/lib", "/lib64", "/usr/lib", "/usr/lib64"):
        if os.path.islink(d):
            inner += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            inner += ["--ro-bind", d, d]
    for p in paths:
        inner += ["--ro-bind", p, p]
    for f in _SYSTEM_FILES:
        if os.path.exists(f):
            inner += ["--ro-bind", f, f]
    # a minimal /etc/passwd and /etc/group naming only the sandbox's uid (getpass.getuser,
    # pwd, grp); the data goes in over a pipe per run (see _execute)
    inner += ["--ro-bind-data", _PASSWD_FD, "/etc/passwd"]
    inner += ["--ro-bind-data", _GROUP_FD, "/etc/group"]
    for h in hidden:
        inner += ["--tmpfs", h, "--remount-ro", h]
    inner += [
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--remount-ro",
        "/dev",
        "--size",
        str(DISK_BYTES),
        "--perms",
        "0700",
        "--tmpfs",
        "/tmp",
        "--chdir",
        "/tmp",
        "--remount-ro",
        "/",
        exe,
    ]
    if os.getuid() != 0:
        return inner
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise SandboxUnavailable(
            "running as root needs `setpriv` (util-linux) to start bubblewrap as an "
            f"unprivileged uid. {_INSTALL_HINT}"
        )
    masks: dict[str, list[str]] = {}
    for p in paths:
        top = _needs_mask(p)
        if top is not None:
            masks.setdefault(top, []).append(p)
    outer = [bwrap, "--dev-bind", "/", "/", "--die-with-parent"] if masks else []
    for top, under in masks.items():
        outer += ["--perms", "0755", "--tmpfs", top]
        made = {top}
        for p in under:
            parts = p[len(top) + 1 :].split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = top + "/" + "/".join(parts[:i])
                if d not in made:
                    made.add(d)
                    outer += ["--perms", "0755", "--dir", d]
            outer += ["--ro-bind", p, p]
    ids = str(SANDBOX_UID)
    return outer + [setpriv, "--reuid", ids, "--regid", ids, "--clear-groups", "--"] + inner


@functools.lru_cache(maxsize=8)
def _launcher(bwrap: str | None) -> tuple[list[str], str]:
    """``(argv prefix, bwrap version)`` of a working isolated sandbox, checked once by
    running a trivial program through it; :class:`SandboxUnavailable` otherwise."""
    if bwrap is None:
        raise SandboxUnavailable(f"bubblewrap (`bwrap`) was not found on PATH. {_INSTALL_HINT}")
    try:
        version = subprocess.run(
            [bwrap, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.strip()
        argv = _bwrap_argv(bwrap)
    except (OSError, subprocess.SubprocessError) as e:
        raise SandboxUnavailable(f"{bwrap} cannot run ({e}). {_INSTALL_HINT}") from e
    found = _parse_version(version)
    if found is not None and found < MIN_BWRAP:
        raise SandboxUnavailable(
            f"{bwrap} is {version}; the isolated sandbox needs bubblewrap >= 0.8 "
            f"(--disable-userns, --size). {_INSTALL_HINT}"
        )
    probe = _execute(argv, "isolated", "import os\nassert os.getuid() != 0\n", "", 10.0, 64)
    if probe.status != "passed":
        raise SandboxUnavailable(
            f"{bwrap} ({version}) cannot start a sandbox here ({probe.detail}). {_INSTALL_HINT}"
        )
    return argv, version


def _parse_version(text: str) -> tuple[int, ...] | None:
    """``(0, 8, 0)`` from ``bwrap --version``'s ``bubblewrap 0.8.0``; None if unreadable."""
    for word in text.split():
        parts = word.split(".")
        if len(parts) >= 2 and all(p.isdigit() for p in parts):
            return tuple(int(p) for p in parts)
    return None


def _bwrap_path() -> str | None:
    return shutil.which("bwrap")


def describe() -> dict[str, object]:
    """What ``result.json`` records: the mode, bwrap's path and version, whether the
    isolated sandbox works here (and why not)."""
    bwrap = _bwrap_path()
    info: dict[str, object] = {
        "mode": current_mode(),
        "bwrap": bwrap,
        "bwrap_version": None,
        "isolation": False,
        "error": None,
    }
    try:
        info["bwrap_version"] = _launcher(bwrap)[1]
        info["isolation"] = True
    except SandboxUnavailable as e:
        info["error"] = str(e)
    return info


def _parse(channel: bytes) -> tuple[str | None, str, list[str], bool]:
    """(last status, its detail, blocked events, network namespace) from the channel."""
    status, detail, blocked, netns = None, "", [], False
    for line in channel.decode("utf-8", "replace").splitlines():
        kind, _, text = line.partition("\t")
        if kind == "blocked":
            blocked.append(text)
        elif kind == "netns":
            netns = text == "1"
        elif kind in ("passed", "failed", "error", "memory"):
            status, detail = kind, text
    return status, detail, blocked, netns


def _execute(
    argv: list[str], mode: str, solution: str, tests: str, timeout_s: float, memory_mb: int
) -> SandboxResult:
    """Run one job through ``argv`` (an interpreter, possibly behind bwrap) and classify."""
    cpu_s = max(1, math.ceil(timeout_s))
    weak = mode == "weak"
    cmd = argv + [
        "-I",
        "-S",
        "-B",
        "-c",
        _RUNNER,
        mode,
        str(memory_mb * 1024 * 1024),
        str(cpu_s),
        str(FILE_BYTES),
        "0" if weak else str(NPROC),
        "1" if _AUDIT_HOOK else "0",
    ]
    src, tst = solution.encode("utf-8", "surrogatepass"), tests.encode("utf-8", "surrogatepass")
    job = b"%d %d\n" % (len(src), len(tst)) + src + tst
    work = tempfile.mkdtemp(prefix="mergelab-sandbox-") if weak else "/"
    timed_out = False
    channel = bytearray()
    data_fds = []
    try:
        try:
            for token, data in ((_PASSWD_FD, _PASSWD), (_GROUP_FD, _GROUP)):
                if token in cmd:
                    r, w = os.pipe()  # a few bytes: fit the pipe's buffer, no writer thread
                    data_fds.append(r)
                    try:
                        os.write(w, data)
                    finally:
                        os.close(w)
                    cmd[cmd.index(token)] = str(r)
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                cwd=work,
                env={},
                start_new_session=True,
                close_fds=True,
                pass_fds=data_fds,
            )
        finally:
            for fd in data_fds:
                os.close(fd)
        deadline = time.monotonic() + timeout_s

        def feed() -> None:
            try:
                proc.stdin.write(job)
                proc.stdin.close()
            except OSError:
                pass

        threading.Thread(target=feed, daemon=True).start()
        out = proc.stdout.fileno()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            if not _readable(out, left):
                continue
            chunk = os.read(out, 1 << 16)
            if not chunk:
                break
            channel += chunk
            del channel[:-_CHANNEL_BYTES]
        if not timed_out:
            # its output is closed (it exited, or closed the pipe and goes on): wait for the
            # exit only for the time left, without reaping it (its pid, and so its process
            # group's id, stays reserved for the kill below until proc.wait)
            timed_out = not _exited_by(proc.pid, deadline)
        try:  # whatever of the launcher chain is still there; the sandbox's pid 1 takes the rest
            os.killpg(proc.pid, 9)
        except OSError:
            pass
        rc = proc.wait()
        proc.stdout.close()
    finally:
        if weak:
            shutil.rmtree(work, ignore_errors=True)
    status, detail, blocked, netns = _parse(bytes(channel))
    netns = netns or not weak

    def result(s: Status, d: str) -> SandboxResult:
        return SandboxResult(s == "passed", s, d[:_DETAIL_CHARS], netns)

    if timed_out:
        return result("timeout", f"wall-clock timeout after {timeout_s:g} s")
    if rc in (-24, -9, 128 + 24, 128 + 9):  # SIGXCPU / SIGKILL, direct or through bwrap
        return result("timeout", f"CPU time limit ({cpu_s} s) exceeded")
    if blocked:
        return result("blocked", f"blocked: {blocked[0]}")
    if status == "memory":
        return result("memory", f"MemoryError (limit {memory_mb} MiB)")
    if status == "passed" and rc == 0:
        return result("passed", "all tests passed")
    if status in ("failed", "error"):
        return result(status, detail or status)  # type: ignore[arg-type]
    if status is None and rc == 0:
        return result("failed", "exited before the tests finished")
    tail = bytes(channel).decode("utf-8", "replace").strip().splitlines()
    return result(
        "failed",
        f"exited with code {rc} before the tests finished" + (f": {tail[-1]}" if tail else ""),
    )


def _readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def _exited_by(pid: int, deadline: float) -> bool:
    """Whether child ``pid`` has exited (left unreaped) by ``deadline`` (monotonic)."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while True:
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if pidfd is not None:
                _readable(pidfd, left)  # readable once it exits
            else:
                time.sleep(min(left, 0.01))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _check_limits(timeout_s: float, memory_mb: int) -> None:
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if memory_mb < 32:
        raise ValueError(f"memory_mb must be >= 32, got {memory_mb}")


Job = str | tuple[str, str]


class Sandbox:
    """Runs programs one at a time with fixed limits, each in a sandbox of its own (see the
    module docstring); the mode is read when the sandbox is made. Nothing stays running
    between programs, so there is nothing to close."""

    def __init__(self, *, timeout_s: float = 5.0, memory_mb: int = 256) -> None:
        _check_limits(timeout_s, memory_mb)
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        self.mode = current_mode()
        self._argv = (
            _launcher(_bwrap_path())[0]
            if self.mode == "isolated"
            else [os.path.realpath(sys.executable)]
        )

    def run(self, program: str, tests: str = "") -> SandboxResult:
        """Run ``program`` (the candidate solution) then ``tests`` (its hidden asserts; may
        be empty when ``program`` holds both) and classify the outcome. Never raises for
        anything the program does."""
        for name, value in (("program", program), ("tests", tests)):
            if not isinstance(value, str):
                raise TypeError(f"{name} must be a str, got {type(value).__name__}")
        if "\x00" in program or "\x00" in tests:
            return SandboxResult(False, "error", "program contains a NUL byte")
        return _execute(self._argv, self.mode, program, tests, self.timeout_s, self.memory_mb)


def run_code(
    program: str, tests: str = "", *, timeout_s: float = 5.0, memory_mb: int = 256
) -> SandboxResult:
    """:meth:`Sandbox.run` of one program."""
    return Sandbox(timeout_s=timeout_s, memory_mb=memory_mb).run(program, tests)


def run_many(
    programs: Sequence[Job],
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 256,
    workers: int | None = None,
) -> list[SandboxResult]:
    """:meth:`Sandbox.run` of every program (a str, or ``(solution, tests)``), results in the
    programs' order: ``workers`` (default: one per CPU) threads take the next program as
    they finish one. Raises :class:`SandboxUnavailable` before running anything if the
    isolated sandbox cannot run."""
    _check_limits(timeout_s, memory_mb)
    if not programs:
        return []
    sandbox = Sandbox(timeout_s=timeout_s, memory_mb=memory_mb)
    n = min(len(programs), workers or len(os.sched_getaffinity(0)) or 1)
    results: list[SandboxResult | None] = [None] * len(programs)
    todo = iter(enumerate(programs))
    lock = threading.Lock()
    failures: list[BaseException] = []

    def work() -> None:
        try:
            while not failures:
                with lock:
                    item = next(todo, None)
                if item is None:
                    return
                job = item[1]
                results[item[0]] = sandbox.run(*((job,) if isinstance(job, str) else job))
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
