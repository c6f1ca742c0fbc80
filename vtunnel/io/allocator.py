"""The C allocator's thresholds, set once when a program starts.

glibc's ``malloc`` serves a request of :data:`DEFAULT_MMAP_THRESHOLD` or more from a fresh mapping, and gives the
free memory at the top of its heap back to the kernel once more than twice that is free (both thresholds move up
by themselves as large blocks come and go). A tunnel moves data in buffers of up to a MiB (a read from a socket,
what a KCP session hands over, a run of frames): a burst that holds a few of them at once and then lets them go
leaves several MiB free at the top of the heap, which is given back, and the next burst takes it again from the
kernel, which maps and zeroes it a page fault per 4 KiB. Measured over kcp:// on loopback (1,000 MiB through one
stream): the receiving server took 150,000 to 870,000 page faults per transfer with the defaults and about 10,400
(those of its start) with the thresholds below, at half the CPU and twice the rate; its peak memory was the same.

:func:`keep_freed_memory` fixes the mapping threshold at :data:`MMAP_THRESHOLD` (a buffer of a tunnel comes from
the heap) and gives the top of the heap back only beyond :data:`TRIM_THRESHOLD` of free memory: a process keeps
at most that much it freed for its next burst. The price is memory per idle tunnel: about 5 KB more over tcp://
and 2 KB over kcp:// (a block the heap now serves, partly touched, where a mapping held untouched pages); memory
per idle stream is the same. Other C libraries are left as they are.
"""

from __future__ import annotations

import ctypes
import os
from typing import Final

__all__ = ["DEFAULT_MMAP_THRESHOLD", "MMAP_THRESHOLD", "TRIM_THRESHOLD", "keep_freed_memory"]

#: glibc's own mapping threshold, before it moves
DEFAULT_MMAP_THRESHOLD: Final = 128 * 1024
#: requests below this come from the heap (a tunnel's largest buffers are about a MiB)
MMAP_THRESHOLD: Final = 4 * 1024 * 1024
#: the free memory at the top of the heap that is kept rather than given back to the kernel
TRIM_THRESHOLD: Final = 16 * 1024 * 1024

# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD: Final = -1
_M_MMAP_THRESHOLD: Final = -3


def keep_freed_memory() -> bool:
    """Set glibc's thresholds (see the module); whether they are set (False: another C library, or refused)."""
    try:
        libc_version = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):  # not a name this system knows: not glibc
        return False
    if not libc_version:
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
