"""Atomic publishing of bundle versions: stage, fsync, MANIFEST.json last, rename into place.

A version becomes visible in one step: the complete staging folder, MANIFEST.json included, is
renamed onto its numeric name. Readers (`published_versions`, the runtime's BundleStore) only
count numeric folders that hold MANIFEST.json, so a crash or `kill -9` at any moment leaves no
visible version, only a hidden `.staging-<uuid>` folder (or an empty claimed version folder) that
a later writer removes.

Version numbers are allocated under an exclusive `fcntl.flock` on `<repo>/<name>/.lock`, and a
number is claimed by `os.mkdir` of its folder, which fails when another publisher holds it, so
two concurrent publishers always get two different versions, even without the lock.

Example::

    with BundleWriter(repo, "movies") as staging:
        (staging.path / "query_tower.pt").write_bytes(data)
        ...
        ref = staging.publish(fill_manifest)   # fill_manifest(manifest) sets schema, index, ...
    print(ref.path)                            # <repo>/movies/<next version>
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from recship.base.errors import InvalidInput
from recship.base.files import fsync_directory
from recship.base.libraries import installed_version
from recship.bundle.checksums import scan_files
from recship.bundle.compat import current_library_versions
from recship.bundle.layout import (
    LOCK_FILENAME,
    MANIFEST_FILENAME,
    MAX_VERSION,
    SIGNATURE_FILENAME,
    STAGING_PREFIX,
    BundleRef,
    check_bundle_name,
    parse_version_name,
)
from recship.bundle.manifest import (
    FORMAT_VERSION,
    read_manifest,
    validate_manifest,
    write_manifest,
)
from recship.protos.v1 import manifest_pb2

# Staging folders nobody holds a lock on are removed once they are this old (seconds). The age
# guards the instant between a writer's mkdir and its flock of a new staging folder.
DEFAULT_STALE_STAGING_S = 600.0

ManifestFiller = Callable[[manifest_pb2.BundleManifest], None]
# Signs a complete staging folder (MANIFEST.json written) by writing its MANIFEST.sig, e.g.
# `lambda folder: sign_version(folder, key)` (recship.bundle.signature).
Signer = Callable[[Path], object]


class BundleWriter:
    """Stages one new version of a bundle and publishes it atomically.

    Entering the context creates `<repo>/<name>/.staging-<uuid>/` (creating the repository and
    bundle folders when missing) and returns a `StagedVersion`; the caller writes the bundle's
    files into `staged.path` and calls `staged.publish(...)`. Leaving the context by an
    exception, or without publishing, deletes the staging folder.

    Thread-safety: one writer per `with` block; several writers (threads or processes) may
    publish the same bundle at once and get distinct versions.

    Args:
        repo: Repository root folder.
        name: Bundle name (validated by `check_bundle_name`).
        stale_staging_s: Age after which other writers' abandoned staging folders are removed.

    Raises:
        InvalidInput: on entering, for an invalid name or a repository that cannot be written.
    """

    def __init__(
        self, repo: Path, name: str, *, stale_staging_s: float = DEFAULT_STALE_STAGING_S
    ) -> None:
        self.repo = Path(repo)
        self.name = check_bundle_name(name)
        self.bundle_dir = self.repo / name
        self.stale_staging_s = stale_staging_s
        self._staged: StagedVersion | None = None

    def __enter__(self) -> StagedVersion:
        try:
            self.bundle_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise _unwritable(self.repo, error) from None
        remove_abandoned_staging(self.bundle_dir, older_than_s=self.stale_staging_s)
        self._staged = StagedVersion._create(self.repo, self.name, self.bundle_dir)
        return self._staged

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._staged is not None:
            self._staged._close()
            self._staged = None


class StagedVersion:
    """A hidden staging folder holding one version's files until `publish` renames it into place.

    Created by `BundleWriter`; not thread-safe (one owner writes the files and publishes).
    The folder is exclusively flock-ed while this object lives, which tells other writers that
    it is in use.
    """

    def __init__(self, repo: Path, name: str, bundle_dir: Path, path: Path, lock_fd: int) -> None:
        self.repo = repo
        self.name = name
        self.bundle_dir = bundle_dir
        self.path = path
        self.published: BundleRef | None = None
        self._lock_fd: int | None = lock_fd

    @classmethod
    def _create(cls, repo: Path, name: str, bundle_dir: Path) -> StagedVersion:
        path = bundle_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        try:
            path.mkdir()
            lock_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as error:
            raise _unwritable(repo, error) from None
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        return cls(repo, name, bundle_dir, path, lock_fd)

    def publish(
        self, fill: ManifestFiller | None = None, *, sign: Signer | None = None
    ) -> BundleRef:
        """Publishes the staged files as the bundle's next version.

        Steps: hash every file (sha256, size); build the manifest (format, name, release id,
        creation time, creator, library versions, files) and let `fill` complete it; fsync every
        file and folder; under the bundle's lock, claim the next free version number, validate
        the manifest, write MANIFEST.json, sign the folder (with `sign`) and rename the staging
        folder onto the claim, so a signed version is published with its signature at once.

        Args:
            fill: Called once with the manifest before a version is allocated (its `version` is
                still 0); sets the model-specific fields (schema, entry points, index, quality,
                ...). It must not change name, version or files, nor write into `path`.
            sign: Called with the staging folder once MANIFEST.json is in it; writes
                MANIFEST.sig there (`recship.bundle.signature.sign_version`). None publishes
                an unsigned version.

        Returns:
            The published version.

        Raises:
            InvalidInput: the completed manifest is invalid, a staged file is not a regular
                file, or the repository cannot be written. Nothing is published then.
            ValueError: `publish` was already called, or MANIFEST.json was written by the caller.
        """
        if self.published is not None:
            raise ValueError(f"{self.published} was already published from this staging folder")
        for reserved in (MANIFEST_FILENAME, SIGNATURE_FILENAME):
            if (self.path / reserved).exists():
                raise ValueError(f"{reserved} is written by publish(), not by the caller")
        files = scan_files(self.path)
        manifest = manifest_pb2.BundleManifest(
            format_version=FORMAT_VERSION,
            name=self.name,
            release_id=str(uuid.uuid4()),
            created_by=f"recship {installed_version('recship') or 'unknown'}",
            libraries=current_library_versions(),
            files=files,
        )
        manifest.created_at.GetCurrentTime()
        if fill is not None:
            fill(manifest)
            if manifest.name != self.name or manifest.version != 0 or list(manifest.files) != files:
                raise ValueError("the manifest filler must not change name, version or files")
        _fsync_tree(self.path)
        try:
            with _bundle_lock(self.bundle_dir):
                ref = self._claim_and_rename(manifest, sign)
        except OSError as error:
            raise _unwritable(self.repo, error) from None
        self.published = ref
        return ref

    def _claim_and_rename(
        self, manifest: manifest_pb2.BundleManifest, sign: Signer | None
    ) -> BundleRef:
        """Allocates the version and moves the staging folder there; caller holds the lock."""
        remove_orphaned_claims(self.bundle_dir)
        version, claim = _claim_next_version(self.bundle_dir)
        try:
            manifest.version = version
            validate_manifest(
                manifest, name=self.name, version=version, source=f"manifest of {claim}"
            )
            write_manifest(self.path / MANIFEST_FILENAME, manifest)
            if sign is not None:
                sign(self.path)
            # rename(2) replaces the empty claimed folder in one step, and fails if it is not
            # empty, so the version appears complete or not at all.
            os.rename(self.path, claim)
        except BaseException:
            _remove_empty_dir(claim)
            (self.path / MANIFEST_FILENAME).unlink(missing_ok=True)
            (self.path / SIGNATURE_FILENAME).unlink(missing_ok=True)
            raise
        fsync_directory(self.bundle_dir)
        return BundleRef(self.name, version, claim)

    def _close(self) -> None:
        """Releases the staging lock and deletes the staging folder unless it was published."""
        if self.published is None:
            shutil.rmtree(self.path, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def republish(
    repo: Path,
    name: str,
    source: int,
    *,
    edit: Callable[[Path], None] | None = None,
    sign: Signer | None = None,
) -> BundleRef:
    """Publishes the files of `<repo>/<name>/<source>` again as the bundle's next version.

    The copy goes through `BundleWriter` like any packaged version (staging folder, checksums,
    MANIFEST.json last, rename): a real second version on disk with its own files, as an
    upgrade has. Its manifest is the source's but for what the writer sets (name, version,
    release id, creation, creator, libraries, files). `edit(staging_folder)` may change the
    copied files first; their checksums then match the changed files.
    """
    source_dir = Path(repo) / name / str(source)
    original = read_manifest(source_dir / MANIFEST_FILENAME)
    with BundleWriter(repo, name) as staged:
        for entry in original.files:
            target = staged.path / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source_dir / entry.path, target)
        if edit is not None:
            edit(staged.path)

        def fill(manifest: manifest_pb2.BundleManifest) -> None:
            merged = manifest_pb2.BundleManifest()
            merged.CopyFrom(original)
            for field in ("format_version", "name", "version", "release_id", "created_by"):
                setattr(merged, field, getattr(manifest, field))
            merged.created_at.CopyFrom(manifest.created_at)
            merged.libraries.CopyFrom(manifest.libraries)
            del merged.files[:]
            merged.files.extend(manifest.files)
            manifest.CopyFrom(merged)

        return staged.publish(fill, sign=sign)


def remove_abandoned_staging(bundle_dir: Path, *, older_than_s: float) -> list[Path]:
    """Deletes staging folders of dead writers: not flock-ed by anyone and older than the age.

    Returns:
        The folders removed.
    """
    removed = []
    now = time.time()
    for entry in _scandir(bundle_dir):
        if not entry.name.startswith(STAGING_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            if now - entry.stat(follow_symlinks=False).st_mtime < older_than_s:
                continue
            descriptor = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue  # removed meanwhile by another writer
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            continue  # a live writer holds it
        try:
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
        finally:
            os.close(descriptor)
    return removed


def remove_orphaned_claims(bundle_dir: Path) -> list[int]:
    """Deletes empty version folders left by publishers that died between claim and rename.

    Must be called with the bundle's lock held: a live publisher's claim exists only while it
    holds that lock. Non-empty folders without a manifest are left alone (not ours to delete).

    Returns:
        The version numbers freed.
    """
    freed = []
    for entry in _scandir(bundle_dir):
        number = parse_version_name(entry.name)
        if number is None or not entry.is_dir(follow_symlinks=False):
            continue
        if _remove_empty_dir(Path(entry.path)):
            freed.append(number)
    return sorted(freed)


def _claim_next_version(bundle_dir: Path) -> tuple[int, Path]:
    """Claims one more than the highest numeric folder by creating it; skips taken numbers.

    Raises:
        InvalidInput: the next number would exceed `MAX_VERSION` (nothing is claimed).
    """
    taken = [parse_version_name(entry.name) for entry in _scandir(bundle_dir)]
    version = max((number for number in taken if number is not None), default=0) + 1
    while True:
        if version > MAX_VERSION:
            raise InvalidInput(
                f"{bundle_dir}: no version number left (the largest is {MAX_VERSION})"
            )
        claim = bundle_dir / str(version)
        try:
            claim.mkdir()
        except FileExistsError:
            version += 1
            continue
        return version, claim


@contextmanager
def _bundle_lock(bundle_dir: Path) -> Iterator[None]:
    """Holds the exclusive publish lock of one bundle (released by the kernel if we die)."""
    descriptor = os.open(bundle_dir / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _fsync_tree(root: Path) -> None:
    """fsyncs every file and folder under `root`, folders after their contents."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            descriptor = os.open(Path(folder) / name, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        fsync_directory(Path(folder))


def _remove_empty_dir(path: Path) -> bool:
    try:
        path.rmdir()
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.ENOTDIR):
            return False
        raise
    return True


def _scandir(folder: Path) -> list[os.DirEntry[str]]:
    try:
        return list(os.scandir(folder))
    except FileNotFoundError:
        return []


def _unwritable(repo: Path, error: OSError) -> InvalidInput:
    reason = error.strerror or str(error)
    where = f" ({error.filename})" if error.filename else ""
    return InvalidInput(f"cannot write to bundle repository {repo}: {reason}{where}")
