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
from recship.bundle.checksums import check_file_hashes, check_file_list
from recship.bundle.compat import check_compatible, current_library_versions
from recship.bundle.layout import (
    MANIFEST_FILENAME,
    SIGNATURE_FILENAME,
    BundleRef,
    check_bundle_name,
    is_bundle_name,
    published_versions,
    why_not_published,
)
from recship.bundle.manifest import read_manifest, validate_manifest
from recship.protos.v1 import manifest_pb2

#: How a server's log and `recship verify` flag a version published with --no-quality-gate.
UNGATED_WARNING = "UNGATED: published with --no-quality-gate, its quality was never measured"


@dataclass(frozen=True)
class ValidatedVersion:
    """A published version that passed every check, with its parsed manifest.

    Attributes:
        ref: The version.
        manifest: Its manifest; treat as read-only (it is not copied for each reader).
        warnings: Library differences that do not prevent loading (e.g. another faiss release),
            a signature that was not checked because no public key is configured, or a
            bundle published without a quality gate (`UNGATED_WARNING`).
        signed: True when MANIFEST.sig was verified against the store's public key.
    """

    ref: BundleRef
    manifest: manifest_pb2.BundleManifest
    warnings: tuple[str, ...] = ()
    signed: bool = False


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
        public_key: PEM public key that verifies MANIFEST.sig (`recship.bundle.signature`);
            None leaves signatures unchecked.
        require_signature: refuse versions without a signature that verifies with
            `public_key` (which is then required).

    Raises:
        InvalidInput: `require_signature` without `public_key`, or an unusable key.
    """

    def __init__(
        self,
        repo: Path,
        *,
        libraries: manifest_pb2.LibraryVersions | None = None,
        public_key: Path | None = None,
        require_signature: bool = False,
    ):
        self._repo = Path(repo)
        self._libraries = manifest_pb2.LibraryVersions()
        self._libraries.CopyFrom(libraries if libraries is not None else current_library_versions())
        if require_signature and public_key is None:
            raise InvalidInput("requiring signatures needs a public key to check them with")
        if public_key is not None:
            from recship.bundle.signature import check_public_key

            check_public_key(public_key)
        self._public_key = None if public_key is None else Path(public_key)
        self._require_signature = require_signature

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
            published = ", ".join(map(str, versions[-10:])) or "none"
            why = why_not_published(self._repo / name, str(version))
            raise NotFound(
                f"bundle {name!r} has no published version {str(version)[:40]}: {why} "
                f"(published: {published})"
            )
        return BundleRef(name, version, self._repo / name / str(version))

    def validate(self, name: str, version: int, *, checksums: bool = True) -> ValidatedVersion:
        """Checks a published version before it may be loaded: the one validation of recship.

        The server runs it before it loads a version and `recship verify` before its own
        checks; nothing is deserialized before it passes. In order, each step reading no more
        than the previous ones bounded:

        1. MANIFEST.json: a regular file of bounded size and nesting, parsed strictly, its
           structure and every declared count and shape consistent (`validate_manifest`);
           name and version equal the folders'.
        2. The folder against `files` without reading a file (`check_file_list`): safe paths,
           regular files only (no links, FIFOs, devices), each exactly its listed size,
           nothing unlisted.
        3. The signature, when one is required or a public key is configured and MANIFEST.sig
           is present (`recship.bundle.signature.verify_signature`).
        4. Every file's sha256, reading no file beyond its listed size (`check_file_hashes`).
        5. The libraries that built the bundle against this host's.

        With `checksums` False (a quick listing, `recship inspect`) steps 3 and 4 are skipped.
        The readers check each file's contents against the manifest as they load it, and its
        header before they deserialize anything: `read_index(spec, num_items=...)` (header,
        allocation bounded by the file, ids), `read_item_features(manifest)` (stored `.npy`
        members whose shapes fit their bytes, no object arrays, then every array),
        `read_golden` + `check_golden_shapes`, and `load_entry_point` (no zip bomb) +
        `check_embedding_tables`. The runtime's loader and `recship verify` call them alike.

        Returns:
            The version and its manifest, with any non-fatal warnings.

        Raises:
            NotFound: the bundle or the version is not published.
            InvalidInput: the manifest is unreadable or invalid, a file is missing, damaged or
                unexpected (the message names each file), the signature is missing or does not
                verify, a file disagrees with the manifest, or the libraries are incompatible.
        """
        ref = self.ref(name, version)
        manifest_path = ref.path / MANIFEST_FILENAME
        manifest = read_manifest(manifest_path)
        validate_manifest(manifest, name=name, version=version, source=str(manifest_path))
        problems = check_file_list(ref.path, manifest)
        if problems:
            raise InvalidInput(f"bundle {ref} failed its file check: " + "; ".join(problems))
        warnings: list[str] = []
        signed = False
        if checksums:
            signed = self._check_signature(ref, warnings)
            problems = check_file_hashes(ref.path, manifest)
            if problems:
                raise InvalidInput(f"bundle {ref} failed its file check: " + "; ".join(problems))
        compatibility = check_compatible(manifest.libraries, self._libraries)
        if not compatibility.ok:
            raise InvalidInput(
                f"bundle {ref} cannot be loaded with the libraries installed here: "
                + "; ".join(compatibility.errors)
            )
        warnings.extend(compatibility.warnings)
        if manifest.quality.ungated:
            warnings.append(UNGATED_WARNING)
        return ValidatedVersion(ref=ref, manifest=manifest, warnings=tuple(warnings), signed=signed)

    def _check_signature(self, ref: BundleRef, warnings: list[str]) -> bool:
        """Applies the signature policy; True when MANIFEST.sig verified."""
        present = (ref.path / SIGNATURE_FILENAME).exists()
        if self._public_key is None:
            if present:
                warnings.append(f"{SIGNATURE_FILENAME} present but not checked (no public key)")
            return False
        if not present:
            if self._require_signature:
                raise InvalidInput(
                    f"bundle {ref} is unsigned ({SIGNATURE_FILENAME} is missing) and signatures "
                    "are required"
                )
            warnings.append("unsigned")
            return False
        from recship.bundle.signature import verify_signature

        try:
            verify_signature(ref.path, self._public_key)
        except InvalidInput as error:
            raise InvalidInput(f"bundle {ref} failed its signature check: {error}") from None
        return True

    @property
    def public_key(self) -> Path | None:
        return self._public_key

    @property
    def require_signature(self) -> bool:
        return self._require_signature

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
