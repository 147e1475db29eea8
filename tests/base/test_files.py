"""Atomic writes: all or nothing, world-readable, and nothing left behind on failure."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from recship.base.files import atomic_output, write_bytes_atomic


def test_written_file_replaces_the_old_one_whole_and_is_readable(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "file.bin"
    write_bytes_atomic(target, b"old")
    write_bytes_atomic(target, b"new contents")
    assert target.read_bytes() == b"new contents"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_a_failing_writer_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    write_bytes_atomic(target, b"old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_output(target) as temp:
        temp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_temp_name_keeps_the_requested_suffix(tmp_path: Path) -> None:
    with atomic_output(tmp_path / "items.npz", ".npz") as temp:
        assert temp.suffix == ".npz" and temp.parent == tmp_path
        temp.write_bytes(b"x")
    assert (tmp_path / "items.npz").read_bytes() == b"x"
