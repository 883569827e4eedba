"""Shared fixtures: one tiny pool (base, two experts, a LoRA expert) and local tasks.

Every test process pins the CPU kernels first, as the console scripts do: MKL reads
``MKL_CBWR`` when it first runs, so without this an in-process training's floats would
depend on whether an earlier test in the same worker happened to import ``harness.cli``.
"""

from __future__ import annotations

from harness.kernels import pin_cpu_kernels

pin_cpu_kernels()  # before anything imports torch

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from core.numerics import one_thread  # noqa: E402
from tests.helpers.tiny_pool import build_pool, write_conf, write_tasks  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch single-threaded for the rest of the module (restored after it). Requested
    through ``pytest.mark.usefixtures``, it is set up before the module's other fixtures."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_pool(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Checkpoint dirs of the tiny pool, plus 'tasks' (lm-eval YAML dir) and 'conf'."""
    root = tmp_path_factory.mktemp("tiny_pool")
    dirs = build_pool(root / "models")
    dirs["tasks"] = write_tasks(root / "tasks")
    dirs["conf"] = write_conf(root / "conf", dirs, dirs["tasks"])
    return dirs
