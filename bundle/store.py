"""BundleStore: lists and validates the published versions in a bundle repository.

The store is the runtime's *source* (in TF Serving's terms): it says which versions exist and
whether one is safe to load; the loader and the version manager decide what to do with them.
A version exists only once the packager has renamed it into place with its MANIFEST.json (see
`recship.bundle.writer`), so the store never sees a partly written version; it still checks
every byte against the manifest, because files can be damaged after publishing.

Example::

    store = BundleStore(Path("/srv/bundles"))
    latest = store.list_versions("movies")[-1]
    validated = store.validate("movies", latest)   # raises on any problem
    load(validated.ref.path, validated.manifest)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from recship.base.errors import InvalidInput, NotFound
from recship.bundle.checksums import verify_files
from recship.bundle.compat import check_compatible, current_library_versions
from recship.bundle.layout import (
    MANIFEST_FILENAME,
    BundleRef,
    check_bundle_name,
    is_bundle_name,
    published_versions,
)
from recship.bundle.manifest import read_manifest, validate_manifest
from recship.protos.v1 import manifest_pb2


@dataclass(frozen=True)
class ValidatedVersion:
    """A published version that passed every check, with its parsed manifest.

    Attributes:
        ref: The version.
        manifest: Its manifest; treat as read-only (it is not copied for each reader).
        warnings: Library differences that do not prevent loading (e.g. another faiss release).
    """

    ref: BundleRef
    manifest: manifest_pb2.BundleManifest
    warnings: tuple[str, ...] = ()


class BundleStore:
    """Read-only view of a bundle repository `<repo>/<name>/<version>/`.

    Thread-safety: every method reads the file system afresh and keeps no mutable state, so any
    number of threads may call any method at once, also while a packager publishes into the same
    repository. Published versions are immutable; a version deleted by hand while it is being
    validated fails validation with NotFound or InvalidInput.

    Args:
        repo: Repository root folder.
        libraries: The library versions to check bundles against; defaults to the ones installed
            in this process (`current_library_versions()`).
    """

    def __init__(self, repo: Path, *, libraries: manifest_pb2.LibraryVersions | None = None):
        self._repo = Path(repo)
        self._libraries = manifest_pb2.LibraryVersions()
        self._libraries.CopyFrom(libraries if libraries is not None else current_library_versions())

    @property
    def repo(self) -> Path:
        return self._repo

    def list_bundles(self) -> list[str]:
        """Names of the bundles with at least one published version, sorted.

        Raises:
            NotFound: the repository folder does not exist.
        """
        try:
            entries = list(os.scandir(self._repo))
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"bundle repository {self._repo} does not exist") from None
        names = []
        for entry in entries:
            if not entry.is_dir() or not is_bundle_name(entry.name):
                continue
            if published_versions(Path(entry.path)):
                names.append(entry.name)
        return sorted(names)

    def list_versions(self, name: str) -> list[int]:
        """Published versions of bundle `name`, ascending (possibly empty).

        Staging folders, claimed-but-empty folders and numeric folders without MANIFEST.json
        are not versions and are left out.

        Raises:
            InvalidInput: `name` is not a valid bundle name.
            NotFound: the repository has no folder for `name`.
        """
        bundle_dir = self._repo / check_bundle_name(name)
        if not bundle_dir.is_dir():
            raise NotFound(f"no bundle {name!r} in repository {self._repo}")
        return published_versions(bundle_dir)

    def ref(self, name: str, version: int) -> BundleRef:
        """The reference of a published version.

        Raises:
            InvalidInput: `name` is not a valid bundle name.
            NotFound: the bundle or the version is not published.
        """
        versions = self.list_versions(name)
        if version not in versions:
            published = ", ".join(map(str, versions)) or "none"
            raise NotFound(
                f"bundle {name!r} has no published version {version} (published: {published})"
            )
        return BundleRef(name, version, self._repo / name / str(version))

    def validate(self, name: str, version: int, *, checksums: bool = True) -> ValidatedVersion:
        """Checks a published version before it may be loaded.

        Parses MANIFEST.json, checks its schema (including that name and version match the
        folders), re-hashes every file against the manifest (unless `checksums` is False, e.g.
        for a quick listing) and compares the recorded library versions with this host's.

        Returns:
            The version and its manifest, with any non-fatal library warnings.

        Raises:
            NotFound: the bundle or the version is not published.
            InvalidInput: the manifest is unreadable or invalid, a file is missing, damaged or
                unexpected (the message names each file), or the libraries are incompatible.
        """
        ref = self.ref(name, version)
        manifest_path = ref.path / MANIFEST_FILENAME
        manifest = read_manifest(manifest_path)
        validate_manifest(manifest, name=name, version=version, source=str(manifest_path))
        if checksums:
            problems = verify_files(ref.path, manifest)
            if problems:
                raise InvalidInput(f"bundle {ref} failed its file check: " + "; ".join(problems))
        compatibility = check_compatible(manifest.libraries, self._libraries)
        if not compatibility.ok:
            raise InvalidInput(
                f"bundle {ref} cannot be loaded with the libraries installed here: "
                + "; ".join(compatibility.errors)
            )
        return ValidatedVersion(ref=ref, manifest=manifest, warnings=compatibility.warnings)

    def validate_latest(self, name: str, *, checksums: bool = True) -> ValidatedVersion:
        """`validate` of the newest published version of bundle `name`.

        Raises:
            NotFound: the bundle does not exist or has no published version.
            InvalidInput: as `validate`.
        """
        versions = self.list_versions(name)
        if not versions:
            raise NotFound(f"bundle {name!r} in {self._repo} has no published version")
        return self.validate(name, versions[-1], checksums=checksums)
