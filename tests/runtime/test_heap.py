"""The C heap keeps a batch's freed tensors for the next batch (`heap.keep_batch_memory`)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# On a thread of its own (as the executor runs batches): one batch-sized block, allocated,
# written and freed, with glibc's counters around it. Prints how many fresh mappings it took
# and how much of it the heap keeps free afterwards.
BATCH = """
import ctypes, sys, threading
from recship.runtime import heap


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "kept":
    assert heap.keep_batch_memory()
size = int(sys.argv[2])
found = []


def batch():
    before = libc.mallinfo2()
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    during = libc.mallinfo2()
    libc.free(block)
    after = libc.mallinfo2()
    found.extend([during.hblks - before.hblks, after.fordblks - before.fordblks])


thread = threading.Thread(target=batch)
thread.start()
thread.join()
print(*found)
"""

# The ranker's joined rows at 32 calls of 100 candidates are megabytes; 20 MiB is a large batch.
BATCH_BYTES = 20 << 20


def one_batch(heap: str) -> tuple[int, int]:
    """(fresh mappings the block took, bytes the heap holds free after it)."""
    done = subprocess.run(
        [sys.executable, "-c", BATCH, heap, str(BATCH_BYTES)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    mapped, free = (int(word) for word in done.stdout.split())
    return mapped, free


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_freed_batch_block_stays_in_the_heap_for_the_next_batch() -> None:
    # By default glibc maps a block this large afresh and unmaps it when freed: the next batch
    # gets new pages that the kernel faults in and zeroes (how often that recurs depends on
    # glibc's adaptive thresholds and the batch sizes; the worker saw 70,000-134,000 page
    # faults a second in most fresh starts). Kept, it comes from the heap and stays there.
    assert one_batch("default") == (1, 0)
    mapped, free = one_batch("kept")
    assert mapped == 0
    assert free >= 0.9 * BATCH_BYTES  # the block, less what the new heap's own top took


def test_operator_tunables_win(monkeypatch: pytest.MonkeyPatch) -> None:
    from recship.runtime import heap

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072")
    assert not heap.keep_batch_memory()
