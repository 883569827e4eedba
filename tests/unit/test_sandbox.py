"""evals.sandbox.run_code: outcomes are classified right and misbehaving programs are contained.

No test sends network traffic: every network attempt below must be stopped by the sandbox
before a socket exists (and the sandbox has no network anyway). The red-team attack list is
in test_sandbox_attacks.py, correct programs and the modes in test_sandbox_modes.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from evals import sandbox
from evals.sandbox import Sandbox, SandboxResult, run_code, run_many

SOLUTION = "def f(x):\n    return x + 3\n"
TESTS = "\nassert f(0) == 3\nassert f(2) == 5\nassert f(-1) == 2\n"


def _run(program: str, **kwargs) -> SandboxResult:
    kwargs.setdefault("timeout_s", 5.0)
    return run_code(program, **kwargs)


def test_correct_solution_passes():
    res = _run(SOLUTION + TESTS)
    assert res == SandboxResult(True, "passed", "all tests passed", res.network_isolated)


def test_wrong_solution_fails():
    res = _run("def f(x):\n    return x + 4\n" + TESTS)
    assert (res.passed, res.status) == (False, "failed")
    assert "AssertionError" in res.detail


@pytest.mark.parametrize(
    "program, needle",
    [
        ("def f(x):\n    return x +\n" + TESTS, "SyntaxError"),
        ("def f(x):\n    return y\n" + TESTS, "NameError"),
        ("def f(x):\n    return x.upper()\n" + TESTS, "AttributeError"),
        ("def f(x):\n\treturn x\n        return 1\n", "Error"),  # IndentationError
        ("import json\njson.loads('{')\n", "json.decoder.JSONDecodeError: Expecting"),
        # an exception whose str() fails is still an error, with its name
        (
            "class E(Exception):\n    def __str__(self):\n        raise ValueError\nraise E()\n",
            "E: ",
        ),
    ],
)
def test_errors(program, needle):
    res = _run(program)
    assert (res.passed, res.status) == (False, "error")
    assert needle in res.detail


def test_stopping_early_is_not_a_pass():
    for early in ("import sys\nsys.exit(0)\n", "import os\nos._exit(0)\n", "raise SystemExit\n"):
        res = _run(SOLUTION + early + "assert False\n")
        assert (res.passed, res.status) == (False, "failed"), early


def test_output_is_allowed_and_discarded():
    assert _run("print('hello')\n" + SOLUTION + TESTS).passed
    assert _run("import sys\nsys.stdout.write('x' * (64 << 20))\n" + SOLUTION + TESTS).passed
    res = _run("open('big', 'wb').write(b'x' * (4 << 20))\n")  # 4 MiB > the 1 MiB file limit
    assert not res.passed and res.status == "error" and "too large" in res.detail


def test_infinite_loop_times_out():
    start = time.monotonic()
    res = _run("while True:\n    pass\n", timeout_s=1.0)
    assert (res.passed, res.status) == (False, "timeout")
    assert time.monotonic() - start < 4.0


def test_sleeping_program_times_out_on_the_wall_clock():
    res = _run("import time\ntime.sleep(30)\n", timeout_s=0.5)
    assert res.status == "timeout" and "wall-clock" in res.detail


@pytest.mark.parametrize("mode", ["isolated", "weak"])
def test_closing_the_output_pipe_does_not_escape_the_wall_clock(mode, monkeypatch):
    """A program that closes its descriptors (the result channel's EOF comes early) and then
    sleeps is still killed at the wall clock, in both modes."""
    monkeypatch.setattr(sandbox, "_mode", mode)
    got: list[SandboxResult] = []
    program = "import os, time\nos.closerange(0, 256)\ntime.sleep(1e9)\n"
    start = time.monotonic()
    t = threading.Thread(target=lambda: got.append(_run(program, timeout_s=1.0)), daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), f"{mode}: the run outlived its wall clock"
    assert got[0].status == "timeout" and "wall-clock" in got[0].detail, got
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(
    "program",
    [
        "x = bytearray(10 ** 10)\n",
        "x = []\nwhile True:\n    x.append(' ' * 10 ** 6)\n",
    ],
)
def test_memory_bomb_is_contained(program):
    res = _run(program, memory_mb=128)
    assert (res.passed, res.status) == (False, "memory")


@pytest.mark.parametrize(
    "program, event",
    [
        (
            "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\n"
            "s.connect(('127.0.0.1', 9))\n",
            "socket",
        ),
        ("import socket\nsocket.create_connection(('example.com', 80), timeout=1)\n", "socket"),
        ("import socket\nsocket.create_connection(('93.184.215.14', 80), timeout=1)\n", "socket"),
        ("import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)\n", ""),
    ],
)
def test_network_is_blocked_before_connecting(program, event):
    res = _run(program)
    assert (res.passed, res.status) == (False, "blocked"), res
    assert event in res.detail


def test_caught_violation_is_still_reported():
    program = "try:\n    import socket\n    socket.socket()\nexcept Exception:\n    pass\n"
    res = _run(program + SOLUTION + TESTS)
    assert (res.passed, res.status) == (False, "blocked")


def test_write_outside_the_sandbox_is_blocked(tmp_path: Path):
    target = tmp_path / "pwned.txt"
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    attempts = [
        f"open({str(target)!r}, 'w').write('x')\n",
        f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n",
        f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')\n",
        f"import os\nos.chdir({str(tmp_path)!r})\nopen('pwned.txt', 'a')\n",
        f"open('../../' * 20 + {str(target)[1:]!r}, 'w')\n",
        f"import os\nos.remove({str(victim)!r})\n",
        f"import os\nos.rename({str(victim)!r}, 'stolen.txt')\n",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
        f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w')\n",
        f"import os\nos.chmod({str(victim)!r}, 0o777)\n",
    ]
    for program in attempts:
        res = _run(program)
        # blocked by the hook, or failing because the host path does not exist in the
        # sandbox (tmp_path lies under /tmp, which inside is the sandbox's own tmpfs)
        assert not res.passed and res.status in ("blocked", "error"), (program, res)
        assert not target.exists(), program
        assert victim.read_text() == "precious", program


def test_files_inside_the_sandbox_are_fine_and_no_host_directory_is_used(monkeypatch):
    import evals.sandbox as sandbox

    def no_host_dir(*args, **kwargs):
        raise AssertionError("the isolated sandbox must not need a host temporary directory")

    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", no_host_dir)
    program = (
        "import os, tempfile\n"
        "open('scratch.txt', 'w').write('hi')\n"
        "assert open('scratch.txt').read() == 'hi'\n"
        "os.mkdir('d')\nos.rename('scratch.txt', 'd/s.txt')\nos.remove('d/s.txt')\n"
        "with tempfile.TemporaryFile() as fh:\n    fh.write(b'x')\n"
        "assert os.getcwd() == '/tmp'\n"
    )
    assert _run(program + "open('left-behind.txt', 'w').write('x')\n").passed
    assert _run("import os\nassert not os.path.exists('left-behind.txt')\n").passed


@pytest.mark.parametrize(
    "program",
    [
        "import subprocess\nsubprocess.run(['echo', 'hi'])\n",
        "import os\nos.system('echo hi')\n",
        "import os\nos.fork()\n",
        "import os\nos.execv('/bin/echo', ['echo', 'hi'])\n",
        "import os\nos.posix_spawn('/bin/echo', ['echo'], {})\n",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()\n",
        "import pty\npty.fork()\n",
        "import os, signal\nos.kill(os.getppid(), signal.SIGTERM)\n",
    ],
)
def test_process_creation_is_blocked(program):
    res = _run(program)
    assert (res.passed, res.status) == (False, "blocked"), res


def test_escapes_via_ctypes_and_the_hook_are_blocked():
    for program in (
        "import ctypes\nctypes.CDLL(None).system(b'echo hi')\n",
        "import gc\n"
        "hook = [o for o in gc.get_objects() if getattr(o, '__name__', '') ==\n"
        "        '_mergelab_sandbox_hook'][0]\n"
        "hook.__kwdefaults__ = {}\n",
        "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n",
    ):
        res = _run(program)
        assert (res.passed, res.status) == (False, "blocked"), (program, res)


def test_environment_is_empty_and_isolated():
    program = (
        "import os, sys\n"
        # Python's own C-locale coercion may add LC_CTYPE and bwrap sets PWD; nothing of the
        # parent's leaks, and TMPDIR is the work directory
        "assert set(os.environ) - {'LC_CTYPE', 'PWD'} == {'TMPDIR'}, dict(os.environ)\n"
        "assert os.environ['TMPDIR'] == os.getcwd()\n"
        "assert 'tempfile' not in sys.modules and 'traceback' not in sys.modules\n"
        "assert sys.flags.isolated and sys.flags.no_site\n"
        "assert not any('site-packages' in p for p in sys.path)\n"
    )
    assert _run(program).passed


def test_argument_validation():
    with pytest.raises(TypeError):
        run_code(b"print(1)")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        run_code("pass", timeout_s=0)
    assert run_code("a\x00b").status == "error"


def test_each_program_runs_in_a_fresh_interpreter():
    """Nothing one program does to its interpreter or files reaches the next; only stdin,
    stdout, stderr and the result channel are open (4: listdir's own)."""
    box = Sandbox(timeout_s=5.0)
    assert box.run("import builtins\nbuiltins.leak = 1\nopen('f', 'w')\n").passed
    assert box.run(
        "import builtins, os\nassert not hasattr(builtins, 'leak')\n"
        "assert not os.path.exists('f')\n"
    ).passed
    # (the /etc/passwd and /etc/group data pipes are closed by bwrap before the program)
    fds = "import os\nfds = sorted(int(f) for f in os.listdir('/proc/self/fd'))\n"
    assert box.run(fds + "assert fds == [0, 1, 2, 3, 4], fds\n").passed


def test_run_many_keeps_the_order_and_classifies_each():
    programs = [SOLUTION + TESTS, "x = (\n", "assert 1 == 2\n", "while True:\n    pass\n"] * 3
    got = run_many(programs, timeout_s=1.0, workers=3)
    assert [r.status for r in got] == ["passed", "error", "failed", "timeout"] * 3
    assert run_many([], timeout_s=1.0) == []


def test_run_many_runs_workers_concurrently(monkeypatch):
    """All four fake runs must be in flight at once to pass the barrier (else it times out);
    a (solution, tests) pair is passed on as two arguments."""
    barrier = threading.Barrier(4, timeout=10)
    threads: set[str] = set()

    def fake_run(self, program, tests=""):
        threads.add(threading.current_thread().name)
        barrier.wait()
        return SandboxResult(True, "passed", program + tests)

    monkeypatch.setattr(sandbox.Sandbox, "run", fake_run)
    got = run_many([str(i) if i % 2 else (str(i), "t") for i in range(8)], workers=4)
    assert [r.detail for r in got] == [str(i) if i % 2 else f"{i}t" for i in range(8)]
    assert len(threads) == 4
