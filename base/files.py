"""Crash-safe file writes shared by the trainer, the packager and the runtime.

Nothing recship writes is ever half written: every file goes to a temporary name beside its
destination, is fsynced, made world-readable (servers may run as another user than the
packager) and renamed into place, and the folder entry is fsynced too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

FILE_MODE = 0o644
#: Overrides the cache root (`default_cache_dir`).
CACHE_ENV = "RECSHIP_CACHE"

# How a file of untrusted provenance is opened: never through a symbolic link (O_NOFOLLOW), and
# without blocking on a FIFO or device (O_NONBLOCK); `open_regular` then refuses anything that
# is not a regular file, so checking and reading see the same inode.
_SAFE_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


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


class NotARegularFile(OSError):
    """A path names a symbolic link, FIFO, socket, device or folder where a file was expected."""


def open_regular(path: Path) -> tuple[int, os.stat_result]:
    """Opens a regular file for reading without following a link or blocking on a FIFO.

    Returns:
        (file descriptor, its fstat); the caller closes the descriptor.

    Raises:
        FileNotFoundError: nothing is there.
        NotARegularFile: a symbolic link, FIFO, socket, device or folder is there.
        OSError: it cannot be opened.
    """
    try:
        descriptor = os.open(path, _SAFE_OPEN_FLAGS)
    except OSError as error:
        if error.errno == errno.ELOOP:  # the last component is a symbolic link
            raise NotARegularFile(f"{path}: a symbolic link") from None
        raise
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
        os.close(descriptor)
        raise NotARegularFile(f"{path}: not a regular file")
    return descriptor, info


def read_regular_file(path: Path, max_bytes: int) -> bytes:
    """The contents of a regular file of at most `max_bytes` bytes (see `open_regular`).

    The size is checked before anything is read, and at most `max_bytes + 1` bytes are read, so
    a file that grows meanwhile cannot make the caller read more.

    Raises:
        FileNotFoundError, NotARegularFile, OSError: as `open_regular`.
        ValueError: the file is larger than `max_bytes`.
    """
    descriptor, info = open_regular(path)
    try:
        if info.st_size > max_bytes:
            raise ValueError(f"{info.st_size} bytes, more than the {max_bytes} allowed")
        with os.fdopen(descriptor, "rb", closefd=False) as handle:
            data = handle.read(max_bytes + 1)
    finally:
        os.close(descriptor)
    if len(data) > max_bytes:
        raise ValueError(f"more than the {max_bytes} bytes allowed")
    return data


def default_cache_dir() -> Path:
    """The cache root: $RECSHIP_CACHE, else `.cache/recship` in the repository (or the cwd).

    The repository is the source checkout recship runs from (an editable install); an installed
    copy uses the current directory instead. Fetched data sets and native builds live there.
    """
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    checkout = Path(__file__).resolve().parents[1]
    pyproject = checkout / "pyproject.toml"
    if pyproject.is_file() and 'name = "recship"' in pyproject.read_text(encoding="utf-8"):
        return checkout / ".cache" / "recship"
    return Path.cwd() / ".cache" / "recship"
