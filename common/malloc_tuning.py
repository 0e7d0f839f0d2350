"""glibc malloc settings for processes that move megabyte-sized messages many times a second.

Every gradient and every answer allocates a few buffers of the tensor's size (gRPC slices, the protobuf
message, the decoded and encoded bytes) and frees them a moment later. With glibc's defaults a freed
chunk at the top of the heap is handed back to the kernel (trim threshold 128 KiB, raised only by
glibc's dynamic heuristic, which these alternating sizes keep resetting) and big chunks come from fresh
`mmap`s, so every message pays page faults and zeroing for each of its buffers again. Measured on the
2-core bench machine (ResNet20, 1.1 MB tensors; bench/results/throughput.md): one parse + decode +
OrMo update + encode + serialize took 5.4-7.2 ms with the defaults and 1.8-2.1 ms with the settings
below, the same work.

`tune_malloc()` fixes the mmap threshold at 32 MiB (the most glibc's own dynamic threshold would reach on
64-bit; larger buffers are still mapped, and unmapped when freed) and keeps up to `trim_threshold` bytes of
freed heap for reuse instead of returning them at once. Cost: the process keeps up to that much freed
memory mapped. No effect (and no error) with another C library. `PS_MALLOC_TUNING=0` turns it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "tune_malloc"]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD: int = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: buffers above it stay mmapped
TRIM_THRESHOLD: int = 256 << 20


def tune_malloc(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Apply the settings to this process; True when glibc accepted both."""
    if os.environ.get("PS_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "no", "off"):
        logger.debug("malloc tuning off (PS_MALLOC_TUNING)")
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        logger.debug("malloc tuning skipped: no glibc mallopt")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    logger.debug("malloc tuning: mmap threshold %d, trim threshold %d, accepted: %s", mmap_threshold,
                 trim_threshold, ok)
    return ok
