"""sha256 and size of every file of a version, and the check of a version against its manifest.

The manifest lists every file but itself and the signature (`MANIFEST.sig`) with its sha256 and
size; `check_file_list` compares the folder with that list without reading any file (missing,
extra, not a regular file, unsafe path, wrong size), and `check_file_hashes` then hashes each
file, reading no more bytes than the manifest declares. `verify_files` runs both.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from recship.base.errors import InvalidInput, shown
from recship.base.files import NotARegularFile, open_regular
from recship.bundle.layout import RESERVED_FILENAMES, SIGNATURE_FILENAME
from recship.protos.v1 import manifest_pb2

_CHUNK_BYTES = 1 << 20
# A version folder holds a handful of files in at most a few sub-folders; a walk stops at these
# bounds, so a folder of a million entries or a deep tree cannot stall or crash a reader.
MAX_ENTRIES = 10_000
MAX_DEPTH = 8
# The signature is a small JSON document (a few kilobytes).
MAX_SIGNATURE_BYTES = 1 << 20


@dataclass(frozen=True)
class FileDigest:
    """Checksum and size of one file's contents."""

    sha256: str
    size_bytes: int


def file_digest(path: Path, max_bytes: int | None = None) -> FileDigest:
    """sha256 and size of a regular file, read in 1 MiB chunks so that any size fits in memory.

    The file is opened without following a symbolic link or blocking on a FIFO, and refused
    unless it is a regular file. With `max_bytes`, reading stops after `max_bytes + 1` bytes,
    so a file larger than expected (or growing) costs no more than the expected size to detect.

    Raises:
        NotARegularFile: `path` is a link, FIFO, device, socket or folder.
        OSError: it cannot be read.
    """
    digest = hashlib.sha256()
    size = 0
    limit = None if max_bytes is None else max_bytes + 1
    descriptor, _ = open_regular(path)
    with os.fdopen(descriptor, "rb") as handle:
        while limit is None or size < limit:
            want = _CHUNK_BYTES if limit is None else min(_CHUNK_BYTES, limit - size)
            chunk = handle.read(want)
            if not chunk:
                break
            digest.update(chunk)
            size += len(chunk)
    return FileDigest(sha256=digest.hexdigest(), size_bytes=size)


def _walk_files(version_dir: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """Every non-folder entry under `version_dir` except MANIFEST.json and MANIFEST.sig.

    Returns:
        ((relative posix path, path) sorted by relative path, problems). Symbolic links are
        listed, never followed; the walk is iterative and bounded (`MAX_ENTRIES`, `MAX_DEPTH`),
        and what lies beyond the bounds is reported as a problem, not walked.
    """
    found: list[tuple[str, Path]] = []
    problems: list[str] = []
    pending: list[tuple[Path, int]] = [(Path(version_dir), 0)]
    entries = 0
    while pending:
        folder, depth = pending.pop()
        try:
            listing = list(os.scandir(folder))
        except OSError as error:
            problems.append(
                f"{folder.relative_to(version_dir)}: cannot be listed ({error.strerror})"
            )
            continue
        for entry in listing:
            entries += 1
            if entries > MAX_ENTRIES:
                problems.append(f"more than {MAX_ENTRIES} entries in the version folder")
                return sorted(found), problems
            path = Path(entry.path)
            relative = path.relative_to(version_dir).as_posix()
            if entry.is_dir(follow_symlinks=False):
                if depth + 1 >= MAX_DEPTH:
                    problems.append(f"{shown(relative)}: folders nested deeper than {MAX_DEPTH}")
                else:
                    pending.append((path, depth + 1))
                continue
            if depth == 0 and relative in RESERVED_FILENAMES:
                continue
            found.append((relative, path))
    return sorted(found), problems


def scan_files(version_dir: Path) -> list[manifest_pb2.FileEntry]:
    """FileEntry (path, sha256, size) for every file under `version_dir` except the manifest
    and the signature.

    Sorted by path. Bundles hold regular files only, so anything else is refused.

    Raises:
        InvalidInput: a symbolic link, socket or other non-regular file is present, or the
            folder is larger or deeper than a version may be.
    """
    found, problems = _walk_files(version_dir)
    if problems:
        raise InvalidInput(f"{version_dir}: " + "; ".join(problems))
    entries = []
    for relative, path in found:
        try:
            digest = file_digest(path)
        except NotARegularFile:
            raise InvalidInput(
                f"{path}: not a regular file; a bundle may hold regular files only"
            ) from None
        entries.append(
            manifest_pb2.FileEntry(
                path=relative, sha256=digest.sha256, size_bytes=digest.size_bytes
            )
        )
    return entries


def check_file_list(version_dir: Path, manifest: manifest_pb2.BundleManifest) -> list[str]:
    """Checks the folder against the manifest's `files` list without reading any file.

    Every listed file must have a safe relative path and be a regular file (checked with lstat:
    a symbolic link, FIFO or device never is) of exactly the listed size; nothing unlisted may
    be present except MANIFEST.json and MANIFEST.sig, which must be regular files too (the
    signature at most `MAX_SIGNATURE_BYTES`).

    Returns:
        One line per problem, each starting with the file's path relative to `version_dir`.
    """
    problems: list[str] = []
    listed: set[str] = set()
    for entry in manifest.files:
        listed.add(entry.path)
        name = shown(entry.path)
        if not is_safe_relative_path(entry.path):
            problems.append(f"{name}: unsafe path in the manifest")
            continue
        path = version_dir / entry.path
        try:
            info = path.lstat()
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        except OSError as error:
            problems.append(f"{name}: cannot be read ({error.strerror})")
            continue
        if not stat.S_ISREG(info.st_mode):
            problems.append(f"{name}: not a regular file ({_kind(info.st_mode)})")
        elif info.st_size != entry.size_bytes:
            problems.append(
                f"{name}: size {info.st_size} bytes, the manifest says {entry.size_bytes}"
            )
    found, walk_problems = _walk_files(version_dir)
    problems.extend(walk_problems)
    for relative, _ in found:
        if relative not in listed:
            problems.append(f"{shown(relative)}: present but not listed in the manifest")
    for reserved in sorted(RESERVED_FILENAMES):
        try:
            info = (version_dir / reserved).lstat()
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(info.st_mode):
            problems.append(f"{reserved}: not a regular file ({_kind(info.st_mode)})")
        elif reserved == SIGNATURE_FILENAME and info.st_size > MAX_SIGNATURE_BYTES:
            problems.append(f"{reserved}: {info.st_size} bytes, at most {MAX_SIGNATURE_BYTES}")
    return problems


def check_file_hashes(version_dir: Path, manifest: manifest_pb2.BundleManifest) -> list[str]:
    """Hashes every listed file and compares it with the manifest's sha256 and size.

    Call it after `check_file_list` found no problem: each file is read through `file_digest`
    with the listed size as the bound, so no file costs more than its declared size to read.

    Returns:
        One line per file whose contents differ from the manifest.
    """
    problems: list[str] = []
    for entry in manifest.files:
        name = shown(entry.path)
        if not is_safe_relative_path(entry.path):
            problems.append(f"{name}: unsafe path in the manifest")
            continue
        try:
            digest = file_digest(version_dir / entry.path, max_bytes=entry.size_bytes)
        except NotARegularFile:
            problems.append(f"{name}: not a regular file")
            continue
        except FileNotFoundError:
            problems.append(f"{name}: missing")
            continue
        except OSError as error:
            problems.append(f"{name}: cannot be read ({error.strerror})")
            continue
        if digest.size_bytes != entry.size_bytes:
            problems.append(
                f"{name}: size {digest.size_bytes} bytes read, the manifest says {entry.size_bytes}"
            )
        elif digest.sha256 != entry.sha256:
            problems.append(
                f"{name}: sha256 {digest.sha256[:12]}... does not match the manifest's "
                f"{entry.sha256[:12]}..."
            )
    return problems


def verify_files(version_dir: Path, manifest: manifest_pb2.BundleManifest) -> list[str]:
    """Checks the files of a version against the manifest's `files` list.

    `check_file_list` first (paths, kinds, sizes, unlisted files: no file is read), then, only
    if that found nothing, `check_file_hashes`.

    Args:
        version_dir: The version directory.
        manifest: Its parsed manifest.

    Returns:
        One line per problem, each starting with the file's path relative to `version_dir`:
        missing, not a regular file, size or sha256 mismatch, or present but not listed.
        An empty list means every file is exactly as recorded.
    """
    problems = check_file_list(version_dir, manifest)
    if problems:
        return problems
    return check_file_hashes(version_dir, manifest)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device or other special file"


def is_safe_relative_path(path: str) -> bool:
    """True for a normalised relative posix path inside the version directory."""
    if not path or len(path) > 1024 or "\\" in path or "\x00" in path:
        return False
    pure = PurePosixPath(path)
    if pure.is_absolute() or pure.as_posix() != path:
        return False
    return all(part not in ("", ".", "..") for part in pure.parts)
