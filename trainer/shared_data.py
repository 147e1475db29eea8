"""One encoding of the training data for all the ranks of a machine, shared through one mapping.

Each rank used to read and encode the whole data set itself (at 10M users x 1M items: ~7 min
and a 9.4 GiB peak per rank), so two ranks did not fit in 24 GiB. `recship train --nproc N`
now encodes once, in a process of its own that exits afterwards (its peak is gone before
training starts), and writes the result here; the ranks map the file read-only, so its pages
sit once in the page cache whatever N is.

The file is a pickle (protocol 5) whose arrays are stored out of band, each aligned to
`ALIGNMENT` bytes after the pickle itself, and handed back to `pickle.loads` as views of the
mapping: numpy arrays come back without a copy, read-only. Only the launcher of a run writes
it, into a temporary folder of its own, and only that run's ranks read it (a pickle is trusted
input: never point `read_shared` at a file from elsewhere).

Layout: `MAGIC`, an 8-byte little-endian header length, a JSON header
`{"pickle": [offset, length], "buffers": [[offset, length], ...]}`, then the bytes.
"""

from __future__ import annotations

import json
import mmap
import pickle
import struct
from pathlib import Path
from typing import Any

from recship.base.errors import InvalidInput
from recship.base.files import atomic_output

MAGIC = b"RECSHIP-SHARED-1\n"
#: Out-of-band buffers start at multiples of this (a cache line; numpy needs <= 64).
ALIGNMENT = 64


def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def write_shared(value: Any, path: Path) -> int:
    """Writes `value` to `path` (atomically) for `read_shared`; returns the file's size in bytes."""
    buffers: list[pickle.PickleBuffer] = []
    blob = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    views = [buffer.raw() for buffer in buffers]
    # Offsets are relative to the end of the header, whose length depends on them.
    spans, offset = [], len(blob)
    for view in views:
        start = _aligned(offset)
        spans.append([start, view.nbytes])
        offset = start + view.nbytes
    header = json.dumps({"pickle": [0, len(blob)], "buffers": spans}).encode()
    base = _aligned(len(MAGIC) + 8 + len(header))
    with atomic_output(path) as temp, open(temp, "wb") as out:
        out.write(MAGIC + struct.pack("<Q", len(header)) + header)
        out.write(b"\0" * (base - out.tell()))
        out.write(blob)
        for (start, _), view in zip(spans, views, strict=True):
            out.write(b"\0" * (base + start - out.tell()))
            out.write(view)
        size = out.tell()
    return size


def read_shared(path: Path) -> Any:
    """The value `write_shared` wrote, its arrays read-only views of a shared mapping.

    Raises:
        InvalidInput: the file is not one `write_shared` wrote.
    """
    with open(path, "rb") as file:
        mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    whole = memoryview(mapping)
    if bytes(whole[: len(MAGIC)]) != MAGIC:
        raise InvalidInput(f"{path}: not a shared training data file")
    (length,) = struct.unpack("<Q", whole[len(MAGIC) : len(MAGIC) + 8])
    header = json.loads(bytes(whole[len(MAGIC) + 8 : len(MAGIC) + 8 + length]))
    base = _aligned(len(MAGIC) + 8 + length)
    start, size = header["pickle"]
    buffers = [whole[base + offset : base + offset + n] for offset, n in header["buffers"]]
    return pickle.loads(whole[base + start : base + start + size], buffers=buffers)
