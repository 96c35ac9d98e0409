"""This process's resident memory, now and at its peak: what the memory budget, the bench's
memory block, the scale bench and ``scripts/measure_memory.py`` all read, the same way; and
handing freed heap memory back to the OS."""
from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

import psutil

_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform.startswith("linux") else None


def resident_bytes() -> int:
    """Resident set size now (psutil: the same figure on Linux, macOS and Windows)."""
    return psutil.Process().memory_info().rss


def peak_resident_bytes() -> int:
    """Peak resident set size so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``; elsewhere nothing).
    glibc keeps freed blocks once its adaptive mmap threshold has risen to their size: loading
    the models left 0.17 GiB of them in the heap, and each precompute batch's document KVs
    (~20 MB each in fp32) another ~0.9 GB over the shipped corpus without a trim per batch."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
