"""Correct programs that must pass in the isolated sandbox, the verdict rules around exiting
early, and the modes: the refusal without bubblewrap, the explicit weak opt-in, the
environment variable and describe()."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from evals import sandbox
from evals.sandbox import SandboxUnavailable, describe, run_code, run_many, set_mode

TESTS = "assert f(2) == 5\nassert f(-1) == 2\n"
F = "def f(x):\n    return x + 3\n"

CORRECT = [
    ("plain", F, TESTS),
    ("exit", F + "exit()\n", TESTS),
    ("quit", F + "quit()\n", TESTS),
    ("sys-exit-nonzero", F + "import sys\nsys.exit(3)\n", TESTS),
    ("main-guard-exit", F + "if __name__ == '__main__':\n    exit(0)\n", TESTS),
    ("input-eof", "try:\n    input()\nexcept EOFError:\n    pass\n" + F, TESTS),
    ("stdin-read", "import sys\nassert sys.stdin.read() == ''\n" + F, TESTS),
    (
        "temporary-directory",
        "import os, tempfile\nwith tempfile.TemporaryDirectory() as d:\n"
        "    open(os.path.join(d, 'x'), 'w').write('x')\n    os.mkdir(os.path.join(d, 'sub'))\n"
        "assert not os.path.exists(d)\n" + F,
        TESTS,
    ),
    (
        "rmtree-inside",
        "import os, shutil\nos.makedirs('a/b/c')\nopen('a/b/c/f', 'w').write('x')\n"
        "shutil.rmtree('a')\nassert not os.path.exists('a')\n" + F,
        TESTS,
    ),
    (
        "named-temporary-file",
        "import tempfile\nwith tempfile.NamedTemporaryFile('w+') as fh:\n"
        "    fh.write('hi')\n    fh.seek(0)\n    assert fh.read() == 'hi'\n" + F,
        TESTS,
    ),
    (
        "sqlite-memory",
        "import sqlite3\ndb = sqlite3.connect(':memory:')\ndb.execute('create table t(x)')\n"
        "db.execute('insert into t values (5)')\n"
        "def f(x):\n    return x + db.execute('select x from t').fetchone()[0] - 2\n",
        TESTS,
    ),
    (
        "sqlite-file-inside",
        "import sqlite3\nsqlite3.connect('db.sqlite').execute('create table t(x)')\n" + F,
        TESTS,
    ),
    (
        "pathlib-inside",
        "from pathlib import Path\nPath('p.txt').write_text('3')\n"
        "def f(x):\n    return x + int(Path('p.txt').read_text())\n",
        TESTS,
    ),
    (
        "stdlib-mix",
        "import collections, dataclasses, decimal, fractions, functools, hashlib, heapq, json\n"
        "import itertools, math, random, re, statistics, string, typing, zlib, datetime, enum\n"
        "P = collections.namedtuple('P', 'a b')\n@dataclasses.dataclass\nclass D:\n    x: int\n"
        "assert json.loads(json.dumps({'a': P(1, 2).b})) == {'a': 2}\n"
        "assert hashlib.sha256(zlib.compress(b'x')).hexdigest()\n" + F,
        TESTS,
    ),
    ("big-output", "print('x' * (8 << 20))\n" + F, TESTS),
    (
        "deep-recursion",
        "import sys\nsys.setrecursionlimit(5000)\n"
        "def g(n):\n    return 0 if n == 0 else 1 + g(n - 1)\nassert g(3000) == 3000\n" + F,
        TESTS,
    ),
    ("single-program", F + TESTS, ""),
    ("caught-exit-in-tests", F, "try:\n    exit()\nexcept SystemExit:\n    pass\n" + TESTS),
    (
        "threads",
        "import threading\nout = []\n"
        "ts = [threading.Thread(target=out.append, args=(i,)) for i in range(8)]\n"
        "for t in ts:\n    t.start()\nfor t in ts:\n    t.join()\n"
        "assert sorted(out) == list(range(8))\n" + F,
        TESTS,
    ),
    (
        "thread-pool",
        "from concurrent.futures import ThreadPoolExecutor\n"
        "with ThreadPoolExecutor(max_workers=8) as ex:\n"
        "    assert list(ex.map(abs, range(-20, 0))) == list(range(20, 0, -1))\n" + F,
        TESTS,
    ),
    (
        "zoneinfo",
        "import datetime, zoneinfo\n"
        "t = datetime.datetime(2024, 7, 1, 12, tzinfo=zoneinfo.ZoneInfo('Europe/Paris'))\n"
        "assert t.utcoffset() == datetime.timedelta(hours=2)\n"
        "assert zoneinfo.ZoneInfo('UTC').utcoffset(None) == datetime.timedelta(0)\n" + F,
        TESTS,
    ),
    (
        "getpass-pwd-grp",
        "import getpass, grp, os, pwd\nassert getpass.getuser() == 'nobody'\n"
        "assert pwd.getpwuid(os.getuid()).pw_name == 'nobody'\n"
        "assert grp.getgrgid(os.getgid()).gr_name == 'nogroup'\n"
        "assert 'root' not in open('/etc/passwd').read()\n" + F,
        TESTS,
    ),
]


@pytest.fixture(autouse=True)
def _no_mode(monkeypatch):
    monkeypatch.setattr(sandbox, "_mode", None)
    monkeypatch.delenv("MERGELAB_SANDBOX", raising=False)


def test_correct_programs_pass():
    assert len({c[0] for c in CORRECT}) == len(CORRECT) >= 15
    results = run_many([(s, t) for _, s, t in CORRECT], timeout_s=5.0)
    failed = [(c[0], r) for c, r in zip(CORRECT, results, strict=True) if not r.passed]
    assert not failed, failed


@pytest.mark.parametrize(
    "solution, tests, status",
    [
        (F + "exit()\n", "assert False\n", "failed"),  # the tests still run after exit()
        (F.replace("3", "4") + "quit()\n", TESTS, "failed"),
        (F, "exit()\n" + TESTS, "failed"),  # exiting during the tests is a failure
        (F + "exit()\n" + TESTS, "", "failed"),  # no separate tests: exiting may skip asserts
        (F + "import os\nos._exit(0)\n", TESTS, "failed"),
        (F + "assert False\n", TESTS, "failed"),
        (F + "x = (\n", TESTS, "error"),
        (F, "x = (\n", "error"),
        (F, "f(None)\n", "error"),
    ],
)
def test_exiting_early_never_skips_the_tests_into_a_pass(solution, tests, status):
    assert run_code(solution, tests).status == status


def test_set_mode_validates_and_wins_over_the_environment(monkeypatch):
    with pytest.raises(ValueError, match=r"`sandbox`.*isolated.*weak"):
        set_mode("strict")
    monkeypatch.setenv("MERGELAB_SANDBOX", "weak")
    assert describe()["mode"] == "weak"
    set_mode("isolated")
    assert describe()["mode"] == "isolated"
    monkeypatch.setattr(sandbox, "_mode", None)
    monkeypatch.setenv("MERGELAB_SANDBOX", "nope")
    with pytest.raises(ValueError, match="`sandbox`"):
        describe()


def test_describe_reports_a_working_bwrap():
    info = describe()
    assert info["mode"] == "isolated" and info["isolation"] is True and info["error"] is None
    assert Path(str(info["bwrap"])).name == "bwrap"
    assert str(info["bwrap_version"]).startswith("bubblewrap")


def _fake_bwrap(tmp_path: Path) -> Path:
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return fake


@pytest.mark.parametrize("bwrap", ["missing", "broken"])
def test_code_refuses_to_run_without_a_working_bwrap(bwrap, tmp_path, monkeypatch):
    if bwrap == "broken":
        _fake_bwrap(tmp_path)
        setpriv = shutil.which("setpriv")
        if setpriv:  # only bwrap is broken (a root caller also needs setpriv)
            (tmp_path / "setpriv").symlink_to(setpriv)
    monkeypatch.setenv("PATH", str(tmp_path))
    info = describe()
    assert info["isolation"] is False and "apt-get install bubblewrap" in str(info["error"])
    for call in (lambda: run_code(F, TESTS), lambda: run_many([F + TESTS])):
        with pytest.raises(SandboxUnavailable) as err:
            call()
        message = str(err.value)
        assert "apt-get install bubblewrap" in message and "user namespaces" in message
        assert "sandbox: weak" in message
        assert ("not found" in message) == (bwrap == "missing")


def test_an_old_bwrap_is_refused_with_the_version_it_needs(tmp_path, monkeypatch):
    """Ubuntu 22.04's bubblewrap 0.6.1 lacks --disable-userns (0.8) and --size (0.7): refused,
    saying so, rather than run with weaker isolation."""
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bubblewrap 0.6.1'\nexit 0\n")
    fake.chmod(0o755)
    setpriv = shutil.which("setpriv")
    if setpriv:
        (tmp_path / "setpriv").symlink_to(setpriv)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SandboxUnavailable) as err:
        run_code(F, TESTS)
    message = str(err.value)
    assert "bubblewrap >= 0.8" in message and "0.6.1" in message
    assert "apt-get install bubblewrap" in message and "sandbox: weak" in message
    assert sandbox._parse_version("bubblewrap 0.8.0") == (0, 8, 0)
    assert sandbox._parse_version("bubblewrap 0.11") == (0, 11)
    assert sandbox._parse_version("garbage") is None


def test_system_files_are_bound_read_only_when_present():
    argv = sandbox._bwrap_argv(shutil.which("bwrap") or "bwrap")
    binds = {argv[i + 2] for i, a in enumerate(argv) if a == "--ro-bind"}
    for path in ("/usr/share/zoneinfo", "/etc/ld.so.cache"):
        assert (path in binds) == Path(path).exists(), path
    data = {argv[i + 2] for i, a in enumerate(argv) if a == "--ro-bind-data"}
    assert data == {"/etc/passwd", "/etc/group"}
    assert not any(a.endswith("site-packages") for a in binds)


def test_weak_mode_is_an_explicit_opt_in_that_still_scores(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap at all
    set_mode("weak")
    assert describe()["mode"] == "weak"
    got = run_many(
        [(F, TESTS), (F, "assert f(0) == 4\n"), ("import socket\nsocket.socket()\n", "")]
    )
    assert [r.status for r in got] == ["passed", "failed", "blocked"]
    monkeypatch.setattr(sandbox, "_mode", None)
    monkeypatch.setenv("MERGELAB_SANDBOX", "weak")  # what lm-eval subprocesses inherit
    assert run_code(F, TESTS).passed
