"""Process-wide tuning shared by the node (``ehrnode run``) and the ``ehr`` CLI.

glibc's malloc adapts its thresholds as a process runs: once a block of size S served by
``mmap`` is freed, blocks up to S come from the heap, and free memory at the top of the
heap beyond 2 S is handed back to the kernel. With the 64-256 KiB buffers a stream of
ciphertext goes through (each socket read, each chunk hashed, written and relayed), the
top of the heap is given back and faulted in again, page by zeroed page, all the time:
perf put the page faults and the zeroing at an eighth of the machine's CPU while a
1 GiB attachment was replicated. Fixed thresholds keep that memory in the process: at
most 64 MiB of free heap, and blocks under 32 MiB (glibc's largest setting) from the heap.
"""

from __future__ import annotations

import ctypes
import gc

# From glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 64 * 1024 * 1024
MMAP_THRESHOLD = 32 * 1024 * 1024


def tune_malloc() -> bool:
    """Fix glibc malloc's trim and mmap thresholds; False where there is no glibc
    ``mallopt`` (another libc, another system) or it refuses."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )


def tune_gc() -> None:
    """Collect the young generation less often and keep what start-up built out of every
    collection. A node holds many small long-lived objects (pending transactions, caches),
    ``ehr import`` tens of megabytes of parsed bundles, and neither makes many reference
    cycles: at the default threshold (700) the collector ran every few hundred objects a
    bundle's parse made, and each older collection walked every bundle still held."""
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


# Names a folder: ``ehrnode run`` times its stages there (``ehrnode.bench.nodetimes``).
STAGE_TIMES_ENV = "EHR_STAGE_TIMES"
