"""The README's quick start: ``mergelab`` with no overrides and no variables set prints
exactly the task-arithmetic table the README shows (zoo seed 0, built or reused from the
zoo cache; the cell itself is recomputed in a fresh runs directory)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.e2e]
README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- quickstart-output: tests/e2e/test_readme.py compares the next block -->"


def _table(text: str) -> list[str]:
    return [ln.strip() for ln in text.splitlines() if re.match(r"^\s*\| mergelab_", ln)]


def readme_table() -> list[str]:
    text = README.read_text()
    assert MARKER in text, f"README.md lost its marker {MARKER!r}"
    block = text.split(MARKER, 1)[1].split("```", 2)[1]
    rows = _table(block)
    assert rows, "README.md: no score rows after the quick-start marker"
    return rows


def test_mergelab_with_no_variables_prints_the_readme_table(tmp_path):
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path))}
    if "MERGELAB_CACHE" in os.environ:  # where the zoo cache lives, not a numeric setting
        env["MERGELAB_CACHE"] = os.environ["MERGELAB_CACHE"]
    proc = subprocess.run(
        [shutil.which("mergelab") or "mergelab"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _table(proc.stdout) == readme_table(), proc.stdout[-3000:]
