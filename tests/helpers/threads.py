"""Single-threaded torch for tests on the shared 2-core machine."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch single-threaded, then restore: on a shared 2-core machine, tiny ops with
    2 intra-op threads slow down several-fold under load from other processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
