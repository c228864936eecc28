"""The C allocator's settings for a daemon that holds data sets of up to a few MiB.

Every C-STORE of a CT image (512x512x16 bit, ~0.5 MiB) allocates its fragments and frees them
a moment later. glibc's defaults return the top of the heap to the kernel as soon as more
than its trim threshold is free there (dynamically about twice the largest block it has
recently freed, so ~1-2 MiB here), so the next instance faults the same pages in again: 30-45
minor page faults per CT instance in dicomd (bench/store_steps.py, faults from /proc), each
a zero-filled page, and on a virtual machine whose host reclaims idle guest memory each can
cost a host fault too. That doubled dicomd's CPU per CT instance in some benchmark runs
(0.9 against 2.0 ms, bench/RESULTS.md) while DCMTK's storescp, which reuses its buffers,
took under one fault per instance.

So the daemon fixes both thresholds at start-up (``mallopt``, the same knobs as
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=...``):
blocks under ``MMAP_THRESHOLD`` come from the heap, and the heap keeps up to
``TRIM_THRESHOLD`` of free memory for the next data sets instead of handing it back. With
them dicomd takes ~7 faults per CT instance (the index's page cache growing). The price: after a
burst, up to ``TRIM_THRESHOLD`` of freed memory stays in the process's RSS. An administrator
who sets any ``glibc.malloc`` tunable in ``GLIBC_TUNABLES`` keeps their own settings.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_malloc"]

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Above the largest block the daemon allocates often (a data set held in memory is at most
# store.INLINE_MAX, 1 MiB; uvloop reads at most 256 KiB at a time).
MMAP_THRESHOLD = 4 << 20
TRIM_THRESHOLD = 64 << 20


def tune_malloc() -> bool:
    """Set the thresholds; False where that is not possible or not wanted (not glibc, or
    the administrator's own ``GLIBC_TUNABLES``)."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # musl has a mallopt that does nothing and returns 0: reported as not tuned.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
