"""Float-environment pins for computations whose bits depend on the thread count."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one intra-op thread (then restore the count). LAPACK's SVD and
    eigensolvers split their work by thread, so their bits change with the thread count;
    under this pin they do not (on one build of torch and its BLAS)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
