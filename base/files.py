"""Crash-safe file writes shared by the trainer, the packager and the runtime.

Nothing recship writes is ever half written: every file goes to a temporary name beside its
destination, is fsynced, made world-readable (servers may run as another user than the
packager) and renamed into place, and the folder entry is fsynced too.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

FILE_MODE = 0o644


def fsync_directory(directory: Path) -> None:
    """Makes the entries of `directory` (created, renamed files) durable."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_output(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a temporary path beside `path` to write; publishes it there when the block succeeds.

    On success the temporary file is fsynced, given mode 0644 and renamed onto `path` (replacing
    any old file in one step), and the folder is fsynced. On any exception it is removed and
    `path` is left as it was. The folder is created when missing.

    Args:
        path: destination.
        suffix: suffix of the temporary name, for writers that infer a format from it.

    Example::

        with atomic_output(bundle / "items.faiss") as temp:
            faiss.write_index(index, str(temp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(descriptor)
    temp = Path(name)
    try:
        yield temp
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(temp, FILE_MODE)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    fsync_directory(path.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Writes `data` to `path` through `atomic_output`."""
    with atomic_output(path) as temp:
        temp.write_bytes(data)
