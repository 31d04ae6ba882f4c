"""Training on CPU without page faults on every step.

glibc's malloc serves each allocation above 32 MB from its own mmap and unmaps it when freed, so a training step
that builds large logits and activations touches all of that memory as fresh pages again, step after step: the
kernel zeroes and maps them one 4 KiB page at a time (benchmarks/host_memory.py measures what that costs a
distillation step of SmolLM2). Serving large
allocations from malloc's heap and keeping freed memory there (what jemalloc or tcmalloc do by default) removes
that; resident memory stays near its peak, which a training process reaches on every step anyway.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt(3) parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
LARGEST_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: free memory above 2 GiB at the heap's top still goes back


def keep_freed_memory() -> bool:
    """Make this process's malloc serve every allocation from its heap and keep what is freed, for the rest of the
    process's life; True when it took effect, False where the C library is not glibc (nothing changes)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc: musl's mallopt accepts and ignores these
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, LARGEST_TRIM_THRESHOLD))
