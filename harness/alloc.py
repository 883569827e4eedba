"""Keep freed tensor memory inside the process while a merge runs (glibc only).

glibc serves every allocation above its mmap threshold (at most 32 MB) with a fresh
``mmap`` and returns it to the kernel on ``free``; a merge allocates and frees tensors of
the same large sizes for every weight matrix, so each one costs page faults and zeroing
(the bulk of a streaming merge's system time). :func:`reuse_freed_memory` turns mmap
allocations off and raises the trim threshold for the duration, so freed blocks stay in
the heap and the next tensor of that size reuses them; afterwards the default policy is
restored and ``malloc_trim`` hands the free heap back. Results do not change (the same
operations on the same values); peak memory is what the merge holds at once, plus
fragmentation. Elsewhere (musl, macOS) it does nothing. Python's cyclic garbage
collector is paused for the block as well: the merge creates no reference cycles, and
each collection would walk every object of the loaded libraries, thousands of times.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4


@cache
def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None
    return libc


@contextmanager
def reuse_freed_memory() -> Iterator[None]:
    """Within the block, freed memory is kept for reuse instead of unmapped."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        with _heap_kept():
            yield
    finally:
        if collecting:
            gc.enable()


@contextmanager
def _heap_kept() -> Iterator[None]:
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        # glibc's dynamic thresholds stop adapting once set: set them where they settle
        # for a process that frees large blocks (mmap threshold at its 32 MB maximum).
        libc.mallopt(M_MMAP_MAX, 65536)
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 64 << 20)
        libc.malloc_trim(0)
