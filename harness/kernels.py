"""CPU kernel choice that does not change with the machine.

torch, MKL and oneDNN pick vectorised kernels by CPU (AVX2, AVX-512...), and the kernels
round differently. :data:`KERNEL_ENV` caps all three at AVX2, which every x86 CPU of the
last decade has, so the same weights score the same on any of them. The variables are
read when torch loads: :func:`pin_cpu_kernels` must run before ``import torch`` (the
console scripts call it first; the zoo's build children get them in their environment).
"""

from __future__ import annotations

import os

KERNEL_ENV = {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pin_cpu_kernels() -> None:
    """Set :data:`KERNEL_ENV` where the user has not set the variable already."""
    for key, value in KERNEL_ENV.items():
        os.environ.setdefault(key, value)
