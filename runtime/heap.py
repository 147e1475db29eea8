"""Heap hygiene of a long-running server: no GC pauses or page faults under load, memory back
after unloads.

Three measured problems, each with its fix (see benchmarks/README.md):

- full garbage collections walked every long-lived torch and proto object of a loaded
  version, 80-95 ms with the event loop stopped about once a second under load: after each
  load, `freeze_long_lived` collects once and moves every live object out of the collector's
  reach (request garbage is still collected);
- every batch's large tensors (the ranker's concatenations, megabytes at 32 calls) came from
  pages glibc had just handed back to the OS, so the kernel faulted and zeroed them again on
  every batch (most of the worker's 20-120 thousand page faults a second at concurrency 64):
  `keep_batch_memory` makes the C heap keep and reuse them;
- freed tensors and FAISS arrays stayed in the process's resident set after an unload:
  `reclaim` frees what reference cycles still hold and returns free heap pages to the OS.

Called by the version manager on the event loop; process-wide by nature (a program embedding
the server gets its own objects frozen too, which is harmless for reference-counted memory).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import weakref
from typing import Any

logger = logging.getLogger(__name__)


def _load_libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only; musl and macOS lack it
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc()

# mallopt parameters of glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap, not their own mapping: glibc's 64-bit maximum,
# above any one tensor of a batch of the default size.
BATCH_MMAP_THRESHOLD_BYTES = 32 << 20
# Free memory at the top of a heap is kept up to this much instead of returned after each batch.
BATCH_TRIM_THRESHOLD_BYTES = 256 << 20


def keep_batch_memory() -> bool:
    """Lets the C heap keep freed batch memory for the next batch (glibc `mallopt`).

    By default glibc serves large blocks from fresh mappings and gives freed heap tops back to
    the OS, the more eagerly in a thread's own arena (the executor's): each batch's tensors are
    then new pages the kernel faults in and zeroes. Held instead, the resident set stays at the
    peak batch's working memory; `release_free_heap` still returns it after an unload.

    Returns:
        Whether the thresholds were set: not on a C library without `mallopt`, nor when the
        operator set glibc's malloc tunables (`GLIBC_TUNABLES`), which are left to win.
    """
    if _LIBC is None or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    return bool(
        _LIBC.mallopt(_M_MMAP_THRESHOLD, BATCH_MMAP_THRESHOLD_BYTES)
        and _LIBC.mallopt(_M_TRIM_THRESHOLD, BATCH_TRIM_THRESHOLD_BYTES)
    )


def release_free_heap() -> None:
    """Returns the C heap's free pages to the OS (glibc `malloc_trim`), a no-op elsewhere.

    Freed tensors, FAISS arrays and the executor thread's arena otherwise stay in the process's
    resident set, so RSS would not show that an unloaded version's memory was released.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def freeze_long_lived() -> None:
    """Collects garbage, then moves every live object out of the cycle collector's reach.

    A loaded version (and torch itself) leaves hundreds of thousands of long-lived objects in
    the oldest generation, and every full collection walks all of them. Frozen, they are
    skipped. The collection before freezing walks only what is not frozen yet (~0.1 s the first
    time).
    """
    gc.collect()
    gc.freeze()


def reclaim(released: weakref.ref[Any], what: str) -> None:
    """Frees an unloaded object (a servable) and gives its memory back to the OS.

    Args:
        released: a weak reference to the object, taken before the caller dropped its last
            strong reference.
        what: how to name it in the warning when it stays alive, e.g. "bundle movies v3".

    When reference cycles (batcher tasks, futures) still hold it, a full collection frees it
    first; as those objects may be frozen, everything is thawed for that collection, which
    blocks the event loop (~0.2 s with torch loaded), so it runs only when reference counting
    alone did not free the object.
    """
    if released() is not None:
        gc.unfreeze()
        freeze_long_lived()
    if released() is not None:
        logger.warning("%s: unloaded but still referenced; its memory is not freed", what)
    release_free_heap()
