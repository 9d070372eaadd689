"""Process-level memory policy shared by the trainer and the reader's worker processes."""

from __future__ import annotations

import sys

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory for reuse: blocks up to 1 GiB come from the heap
    instead of a fresh mmap each, and the heap's free top is returned to the system only
    beyond 1 GiB. By default glibc maps every block over its (adaptive, ≤ 32 MB) threshold
    afresh and trims the heap's top, so each training step page-faults its large activations
    and the attention probabilities back in (35K–84K minor faults per GenCI ML-1M step of
    128 samples; measured in README "Speed"), and a reader its batch buffers and decoded row
    groups. PyTorch's CPU allocator has no cache of its own, so this is where the reuse has
    to come from. Returns False where it does not apply (not glibc); affects only this
    process (the reader's workers call it themselves: build_loader(keep_freed_memory=True)).
    """
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):   # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES) and mallopt(_M_TRIM_THRESHOLD,
                                                                    _KEEP_BYTES))
