"""sha256 and size of every file of a version, and the check of a version against its manifest.

The manifest lists every file but itself with its sha256 and size; `verify_files` compares the
folder with that list (missing, extra, changed, not a regular file, unsafe path).
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from recship.base.errors import InvalidInput
from recship.bundle.layout import MANIFEST_FILENAME
from recship.protos.v1 import manifest_pb2

_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class FileDigest:
    """Checksum and size of one file's contents."""

    sha256: str
    size_bytes: int


def file_digest(path: Path) -> FileDigest:
    """sha256 and size of a file, read in 1 MiB chunks so that any size fits in memory."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return FileDigest(sha256=digest.hexdigest(), size_bytes=size)


def _walk_files(version_dir: Path) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every non-directory entry under `version_dir`, sorted by
    relative path, except the top-level MANIFEST.json. Symbolic links are listed, not followed."""
    found = []
    for root, dirs, files in os.walk(version_dir, followlinks=False):
        for name in files + [d for d in dirs if Path(root, d).is_symlink()]:
            path = Path(root) / name
            relative = path.relative_to(version_dir).as_posix()
            if relative != MANIFEST_FILENAME:
                found.append((relative, path))
    return sorted(found)


def scan_files(version_dir: Path) -> list[manifest_pb2.FileEntry]:
    """FileEntry (path, sha256, size) for every file under `version_dir` except MANIFEST.json.

    Sorted by path. Bundles hold regular files only, so anything else is refused.

    Raises:
        InvalidInput: a symbolic link, socket or other non-regular file is present.
    """
    entries = []
    for relative, path in _walk_files(version_dir):
        if not stat.S_ISREG(path.lstat().st_mode):
            raise InvalidInput(f"{path}: not a regular file; a bundle may hold regular files only")
        digest = file_digest(path)
        entries.append(
            manifest_pb2.FileEntry(
                path=relative, sha256=digest.sha256, size_bytes=digest.size_bytes
            )
        )
    return entries


def verify_files(version_dir: Path, manifest: manifest_pb2.BundleManifest) -> list[str]:
    """Checks the files of a version against the manifest's `files` list.

    Args:
        version_dir: The version directory.
        manifest: Its parsed manifest.

    Returns:
        One line per problem, each starting with the file's path relative to `version_dir`:
        missing, not a regular file, size or sha256 mismatch, or present but not listed.
        An empty list means every file is exactly as recorded.
    """
    problems: list[str] = []
    listed: set[str] = set()
    for entry in manifest.files:
        listed.add(entry.path)
        if not is_safe_relative_path(entry.path):
            problems.append(f"{entry.path}: unsafe path in the manifest")
            continue
        path = version_dir / entry.path
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            problems.append(f"{entry.path}: missing")
            continue
        if not stat.S_ISREG(mode):
            problems.append(f"{entry.path}: not a regular file")
            continue
        digest = file_digest(path)
        if digest.size_bytes != entry.size_bytes:
            problems.append(
                f"{entry.path}: size {digest.size_bytes} bytes, the manifest says "
                f"{entry.size_bytes}"
            )
        elif digest.sha256 != entry.sha256:
            problems.append(
                f"{entry.path}: sha256 {digest.sha256[:12]}... does not match the manifest's "
                f"{entry.sha256[:12]}..."
            )
    for relative, _ in _walk_files(version_dir):
        if relative not in listed:
            problems.append(f"{relative}: present but not listed in the manifest")
    return problems


def is_safe_relative_path(path: str) -> bool:
    """True for a normalised relative posix path inside the version directory."""
    if not path or "\\" in path or "\x00" in path:
        return False
    pure = PurePosixPath(path)
    if pure.is_absolute() or pure.as_posix() != path:
        return False
    return all(part not in ("", ".", "..") for part in pure.parts)
