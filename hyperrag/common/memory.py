"""This process's resident memory, now and at its peak: what the memory budget, the bench's
memory block, the scale bench and ``scripts/measure_memory.py`` all read, the same way."""
from __future__ import annotations

import resource
import sys

import psutil


def resident_bytes() -> int:
    """Resident set size now (psutil: the same figure on Linux, macOS and Windows)."""
    return psutil.Process().memory_info().rss


def peak_resident_bytes() -> int:
    """Peak resident set size so far (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
