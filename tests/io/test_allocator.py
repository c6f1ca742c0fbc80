"""The C allocator keeps what a burst of large buffers freed: the next burst faults no page in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vtunnel.io.allocator import MMAP_THRESHOLD, TRIM_THRESHOLD, keep_freed_memory

BURSTS = 200
BURST = 4  # buffers of 1 MiB held at once by each burst
PAGE = os.sysconf("SC_PAGESIZE")

# a first large block comes and goes (glibc's thresholds move up to it by themselves), then bursts that each hold a
# few MiB of buffers and let them go, as a tunnel's reads and deliveries do; prints the page faults the bursts took
_BURSTS = f"""
import resource, sys
from vtunnel.io.allocator import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
first = bytes(1 << 20)
del first
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({BURSTS}):
    held = [bytes(1 << 20) for _ in range({BURST})]
    del held
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _BURSTS, mode], capture_output=True, text=True, timeout=60, check=True
    )
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not os.confstr("CS_GNU_LIBC_VERSION"), reason="glibc's allocator only")
def test_bursts_of_large_buffers_fault_their_pages_in_once() -> None:
    one_burst = BURST * (1 << 20) // PAGE
    kept = _faults("kept")
    assert kept < 2 * one_burst  # the first burst's pages, and nothing per burst after it
    # with glibc's own thresholds the heap's top is given back after each burst and faulted in again
    assert _faults("default") > 10 * one_burst


def test_the_thresholds_are_set_where_glibc_runs_and_keep_a_tunnels_buffers_on_the_heap() -> None:
    assert MMAP_THRESHOLD >= 2 * (1 << 20)  # a tunnel's largest buffers are about a MiB
    assert TRIM_THRESHOLD >= 2 * MMAP_THRESHOLD
    assert keep_freed_memory() == bool(os.confstr("CS_GNU_LIBC_VERSION"))
