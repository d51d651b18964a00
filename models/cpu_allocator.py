"""Host memory policy for the CPU path: freed memory stays in the process, and the large long-lived
buffers (the KV cache) sit on transparent huge pages.

Keep glibc from handing freed memory back to the OS between engine steps.

Every step allocates and frees the same few megabytes (gathered KV blocks, activations). With glibc's
defaults those chunks are mmapped or trimmed off the heap when freed, so the next step page-faults
them back in: we measured the batched KV gather at 16 sequences go from ~21 ms to ~2 ms per step once
trimming stops. Raising the thresholds once keeps the memory in the process for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import cache

import torch

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20       # glibc's ceiling on 64-bit systems
TRIM_THRESHOLD = 1 << 30

_configured = False


def keep_freed_memory() -> bool:
    """Apply once per process; returns False where the C library is not glibc."""
    global _configured
    if _configured or not sys.platform.startswith("linux"):
        return _configured
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    _configured = ok
    return ok


# Decode attention reads every sequence's blocks, scattered over a cache of hundreds of megabytes. On
# 4 KiB pages each block costs several TLB misses and page walks; on 2 MiB pages the cache's translations
# stay in the TLB. We measured the paged attention of a 32-sequence decode step 10% faster (AMD EPYC,
# transparent huge pages in `madvise` mode, the common default).
MADV_HUGEPAGE = 14
HUGE_PAGE = 2 * 2**20


@cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).madvise
    except (OSError, AttributeError, TypeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def zeros_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor whose whole 2 MiB pages the kernel is asked to back with huge pages.

    The advice must come before the first touch, so the tensor is allocated empty (untouched pages of a
    large allocation), advised, then zeroed. Where the advice is refused the tensor is the same, on
    normal pages."""
    tensor = torch.empty(shape, dtype=dtype)
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first = -(-start // HUGE_PAGE) * HUGE_PAGE
    madvise = _madvise()
    if madvise is not None and end - first >= HUGE_PAGE:
        madvise(first, (end - first) // HUGE_PAGE * HUGE_PAGE, MADV_HUGEPAGE)
    return tensor.zero_()
