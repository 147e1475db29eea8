"""The C heap keeps a batch's freed tensors for the next batch (`heap.keep_batch_memory`)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# Batches of varying rows on a thread of its own (as the executor runs them), each
# allocating and freeing megabyte tensors like the ranker's concatenations; prints the
# page faults per batch after a warm-up.
BATCHES = """
import resource, sys, threading, torch
from recship.runtime import heap

if sys.argv[1] == "kept":
    assert heap.keep_batch_memory()
torch.set_num_threads(1)


def batches(count):
    for step in range(count):
        rows = 1500 + 37 * (step % 5)
        features = torch.randn(rows, 27 * 16)
        joined = torch.cat([features, features], dim=1)
        torch.bmm(joined.view(rows, 54, 16), joined.view(rows, 54, 16).transpose(1, 2))


faults = []


def run():
    batches(5)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    batches(30)
    faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 30)


thread = threading.Thread(target=run)
thread.start()
thread.join()
print(faults[0])
"""


def faults_per_batch(heap: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", BATCHES, heap], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return float(done.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_kept_batch_memory_is_not_faulted_in_again() -> None:
    default, kept = faults_per_batch("default"), faults_per_batch("kept")
    # A batch touches ~2,000 pages of tensors: by default most are fresh from the kernel.
    assert default > 300, default
    assert kept < default / 2, (kept, default)


def test_operator_tunables_win(monkeypatch: pytest.MonkeyPatch) -> None:
    from recship.runtime import heap

    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=131072")
    assert not heap.keep_batch_memory()
