"""Heap hygiene of a long-running server: no GC pauses under load, memory back after unloads.

Two measured problems, each with its fix (see benchmarks/README.md):

- full garbage collections walked every long-lived torch and proto object of a loaded
  version, 80-95 ms with the event loop stopped about once a second under load: after each
  load, `freeze_long_lived` collects once and moves every live object out of the collector's
  reach (request garbage is still collected);
- freed tensors and FAISS arrays stayed in the process's resident set after an unload:
  `reclaim` frees what reference cycles still hold and returns free heap pages to the OS.

Called by the version manager on the event loop; process-wide by nature (a program embedding
the server gets its own objects frozen too, which is harmless for reference-counted memory).
"""

from __future__ import annotations

import ctypes
import gc
import logging
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
