"""The bundle manifest on disk: JSON I/O, file checksums, schema checks and library versions.

A published version is `<repo>/<name>/<version>/` holding its files and `MANIFEST.json`, the
`recship.v1.BundleManifest` protobuf in protobuf's JSON mapping. The packager writes it (see
`recship.packager.writer`) and the runtime reads it (see `recship.runtime.store`); both use this
module so that what one writes the other accepts.

Everything here is a plain function over paths and protobuf messages, without shared state, so
any function may be called from several threads at once.

Example::

    manifest = read_manifest(version_dir / MANIFEST_FILENAME)
    validate_manifest(manifest, name="movies", version=3)
    problems = verify_files(version_dir, manifest)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import stat
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath

from google.protobuf import json_format

from recship.protos.v1 import manifest_pb2
from recship.runtime.errors import InvalidInput, NotFound
from recship.runtime.files import write_bytes_atomic

# The manifest format this code writes and the newest it reads.
FORMAT_VERSION = 1
MANIFEST_FILENAME = "MANIFEST.json"
# Prefix of the hidden folders the writer stages versions in; readers skip them.
STAGING_PREFIX = ".staging-"

# Bundle names become folder names and appear in requests: keep them portable and unambiguous.
_NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,127}$")
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
_CHUNK_BYTES = 1 << 20

# Sub-messages every published manifest has (the bundle format of DESIGN.md).
REQUIRED_MESSAGES = ("created_at", "schema", "index", "golden", "quality", "libraries")

# Distributions that may provide each library, CPU build first.
LIBRARY_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "torchrec": ("torchrec",),
    "fbgemm_gpu": ("fbgemm-gpu-cpu", "fbgemm-gpu"),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11"),
    "numpy": ("numpy",),
    "recship": ("recship",),
}


@dataclass(frozen=True, order=True)
class BundleRef:
    """One published bundle version, like TF Serving's ServableId.

    Attributes:
        name: Bundle name (the folder under the repository).
        version: Positive version number (the numeric folder under the bundle).
        path: The version directory, `<repo>/<name>/<version>`.
    """

    name: str
    version: int
    path: Path

    def __str__(self) -> str:
        return f"{self.name}/{self.version}"


@dataclass(frozen=True)
class FileDigest:
    """Checksum and size of one file's contents."""

    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class Compatibility:
    """Whether a bundle's recorded library versions fit the libraries installed here.

    Attributes:
        errors: Mismatches that make the bundle unsafe to load (e.g. a different torch minor).
        warnings: Mismatches that may change results slightly (e.g. another faiss release).
    """

    errors: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors


# --- repository layout -----------------------------------------------------------------------


def check_bundle_name(name: str) -> str:
    """Returns `name` if it is a valid bundle name, else raises InvalidInput.

    A name starts with a letter and holds only letters, digits, '.', '_' and '-' (at most 128),
    so it is a safe folder name everywhere and never mistaken for a version number.
    """
    if not _NAME_PATTERN.match(name):
        raise InvalidInput(
            f"invalid bundle name {name!r}: use a letter followed by letters, digits, '.', '_' "
            "or '-' (at most 128 characters)"
        )
    return name


def parse_version_name(folder_name: str) -> int | None:
    """The version number a folder name denotes ("3" -> 3), or None for any other name.

    Only canonical positive integers count: "03", "0", "-1" and ".staging-..." are not versions.
    """
    if not folder_name.isascii() or not folder_name.isdigit():
        return None
    number = int(folder_name)
    if number <= 0 or str(number) != folder_name:
        return None
    return number


def published_versions(bundle_dir: Path) -> list[int]:
    """Versions published under `bundle_dir`, ascending.

    A version is published when its numeric folder holds a regular `MANIFEST.json`: the writer
    renames a complete folder into place, so anything else (a staging folder, a folder a crashed
    writer claimed, a half-copied folder) is not a version. Returns [] when `bundle_dir` does not
    exist.
    """
    versions: list[int] = []
    try:
        entries = list(os.scandir(bundle_dir))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for entry in entries:
        number = parse_version_name(entry.name)
        if number is None or not entry.is_dir(follow_symlinks=False):
            continue
        if _is_regular_file(Path(entry.path) / MANIFEST_FILENAME):
            versions.append(number)
    return sorted(versions)


def _is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


# --- JSON I/O --------------------------------------------------------------------------------


def manifest_to_json(manifest: manifest_pb2.BundleManifest) -> str:
    """The manifest as stable JSON: proto field names, sorted keys, 2-space indent, final newline.

    The same message always gives the same bytes, so manifests diff cleanly.
    """
    text = json_format.MessageToJson(
        manifest, preserving_proto_field_name=True, indent=2, sort_keys=True
    )
    return text + "\n"


def manifest_from_json(text: str, source: str = MANIFEST_FILENAME) -> manifest_pb2.BundleManifest:
    """Parses manifest JSON, rejecting unknown fields and formats newer than this code reads.

    Args:
        text: The JSON document.
        source: What to call the document in error messages (usually its path).

    Raises:
        InvalidInput: not JSON, not an object, a newer format_version, or not a BundleManifest.
    """
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidInput(f"{source}: not valid JSON: {error}") from None
    if not isinstance(document, dict):
        raise InvalidInput(f"{source}: expected a JSON object, found {type(document).__name__}")
    # Check the format first: a newer writer may add fields this code would call unknown.
    declared = document.get("format_version", 0)
    known = isinstance(declared, int | str) and str(declared).isdigit()
    if known and int(declared) > FORMAT_VERSION:
        raise InvalidInput(
            f"{source}: format_version {declared} is newer than this recship reads "
            f"({FORMAT_VERSION}); upgrade recship"
        )
    manifest = manifest_pb2.BundleManifest()
    try:
        json_format.ParseDict(document, manifest)
    except json_format.ParseError as error:
        raise InvalidInput(f"{source}: not a valid BundleManifest: {error}") from None
    return manifest


def write_manifest(path: Path, manifest: manifest_pb2.BundleManifest) -> None:
    """Writes the manifest as JSON atomically: temp file in the same folder, fsync, os.replace.

    A reader sees either the old file or the complete new one, never a partial write.
    """
    write_bytes_atomic(path, manifest_to_json(manifest).encode("utf-8"))


def read_manifest(path: Path) -> manifest_pb2.BundleManifest:
    """Reads and parses a MANIFEST.json file (no schema checks; see `validate_manifest`).

    Raises:
        NotFound: the file does not exist.
        InvalidInput: it cannot be read or parsed; the message names the file.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFound(f"{path}: no such manifest") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInput(f"{path}: cannot read the manifest: {error}") from None
    return manifest_from_json(text, source=str(path))


# --- checksums -------------------------------------------------------------------------------


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
        if not _is_safe_relative_path(entry.path):
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


def _is_safe_relative_path(path: str) -> bool:
    """True for a normalised relative posix path inside the version directory."""
    if not path or "\\" in path or "\x00" in path:
        return False
    pure = PurePosixPath(path)
    if pure.is_absolute() or pure.as_posix() != path:
        return False
    return all(part not in ("", ".", "..") for part in pure.parts)


# --- schema checks ---------------------------------------------------------------------------


def validate_manifest(
    manifest: manifest_pb2.BundleManifest,
    *,
    name: str | None = None,
    version: int | None = None,
    source: str = MANIFEST_FILENAME,
) -> None:
    """Checks that a manifest is complete and consistent before it is published or loaded.

    Structural checks only (no file access): the format version is known; name and version are
    set and equal the folder's (when given); the required fields and sub-messages are set;
    `files` lists unique, safe relative paths with well-formed checksums; every file the manifest
    refers to (entry points, index, item features, golden set) is in `files`; the quality gate
    passed; the index dimension equals the retrieval dimension.

    Args:
        manifest: The manifest to check.
        name: The bundle folder's name, if the manifest is read from a repository.
        version: The version folder's number, likewise.
        source: What to call the manifest in the error message (usually its path).

    Raises:
        InvalidInput: one line naming `source` and every problem found.
    """
    problems = _manifest_problems(manifest, name, version)
    if problems:
        raise InvalidInput(f"{source}: invalid manifest: " + "; ".join(problems))


def _manifest_problems(
    manifest: manifest_pb2.BundleManifest, name: str | None, version: int | None
) -> list[str]:
    problems: list[str] = []
    if manifest.format_version == 0:
        problems.append("format_version is not set")
    elif manifest.format_version > FORMAT_VERSION:
        problems.append(
            f"format_version {manifest.format_version} is newer than this recship reads "
            f"({FORMAT_VERSION})"
        )
    if not manifest.name:
        problems.append("name is not set")
    elif not _NAME_PATTERN.match(manifest.name):
        problems.append(f"name {manifest.name!r} is not a valid bundle name")
    elif name is not None and manifest.name != name:
        problems.append(f"name {manifest.name!r} does not match its folder {name!r}")
    if manifest.version <= 0:
        problems.append(f"version must be a positive integer, found {manifest.version}")
    elif version is not None and manifest.version != version:
        problems.append(f"version {manifest.version} does not match its folder {version}")
    problems.extend(_release_id_problems(manifest.release_id))
    for field in REQUIRED_MESSAGES:
        if not manifest.HasField(field):
            problems.append(f"{field} is not set")
    if manifest.HasField("libraries") and not manifest.libraries.torch:
        problems.append("libraries.torch is not set")
    if manifest.HasField("quality") and not manifest.quality.passed:
        problems.append("quality.passed is false: a bundle that failed its quality gate")
    listed, file_problems = _file_list_problems(manifest)
    problems.extend(file_problems)
    problems.extend(_referenced_file_problems(manifest, listed))
    if manifest.HasField("index") and manifest.index.type == manifest_pb2.INDEX_TYPE_UNSPECIFIED:
        problems.append("index.type is not set")
    if (
        manifest.HasField("index")
        and manifest.HasField("schema")
        and manifest.schema.retrieval_dim
        and manifest.index.dim != manifest.schema.retrieval_dim
    ):
        problems.append(
            f"index.dim {manifest.index.dim} differs from schema.retrieval_dim "
            f"{manifest.schema.retrieval_dim}"
        )
    return problems


def _release_id_problems(release_id: str) -> list[str]:
    if not release_id:
        return ["release_id is not set"]
    try:
        uuid.UUID(release_id)
    except ValueError:
        return [f"release_id {release_id!r} is not a UUID"]
    return []


def _file_list_problems(manifest: manifest_pb2.BundleManifest) -> tuple[set[str], list[str]]:
    problems: list[str] = []
    listed: set[str] = set()
    if not manifest.files:
        problems.append("files is empty")
    for position, entry in enumerate(manifest.files):
        where = f"files[{position}]"
        if not _is_safe_relative_path(entry.path):
            problems.append(f"{where}.path {entry.path!r} is not a relative path inside the bundle")
        elif entry.path == MANIFEST_FILENAME:
            problems.append(f"{where} lists {MANIFEST_FILENAME} itself")
        elif entry.path in listed:
            problems.append(f"{where}.path {entry.path!r} is listed twice")
        if not _SHA256_PATTERN.match(entry.sha256):
            problems.append(f"{where}.sha256 of {entry.path!r} is not 64 lowercase hex digits")
        if entry.size_bytes < 0:
            problems.append(f"{where}.size_bytes of {entry.path!r} is negative")
        listed.add(entry.path)
    return listed, problems


def _referenced_file_problems(manifest: manifest_pb2.BundleManifest, listed: set[str]) -> list[str]:
    problems: list[str] = []

    def check(field: str, file: str) -> None:
        if not file:
            problems.append(f"{field} is not set")
        elif file not in listed:
            problems.append(f"{field} {file!r} is not listed in files")

    if not manifest.entry_points:
        problems.append("entry_points is empty")
    seen: set[tuple[str, int]] = set()
    for position, entry_point in enumerate(manifest.entry_points):
        where = f"entry_points[{position}]"
        if not entry_point.name:
            problems.append(f"{where}.name is not set")
        if entry_point.format == manifest_pb2.ENTRY_POINT_FORMAT_UNSPECIFIED:
            problems.append(f"{where}.format is not set")
        key = (entry_point.name, entry_point.format)
        if key in seen:
            format_name = manifest_pb2.EntryPointFormat.Name(entry_point.format)
            problems.append(f"{where} repeats entry point {entry_point.name!r} in {format_name}")
        seen.add(key)
        check(f"{where}.file", entry_point.file)
    for field in ("index", "item_features", "golden"):
        if manifest.HasField(field):
            check(f"{field}.file", getattr(manifest, field).file)
    return problems


# --- library versions ------------------------------------------------------------------------


def installed_version(library: str) -> str:
    """Installed version of one of LIBRARY_DISTRIBUTIONS' libraries, or "" when absent.

    Reads package metadata only, so nothing heavy (torch, faiss) is imported.
    """
    for distribution in LIBRARY_DISTRIBUTIONS[library]:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return ""


def current_library_versions() -> manifest_pb2.LibraryVersions:
    """Versions of python, torch, torchrec, fbgemm_gpu, faiss, numpy and recship installed here.

    A library that is not installed is recorded as "".
    """
    versions = manifest_pb2.LibraryVersions(python=platform.python_version())
    for library in LIBRARY_DISTRIBUTIONS:
        setattr(versions, library, installed_version(library))
    return versions


def _major_minor(version: str) -> tuple[int, int] | None:
    match = re.match(r"^(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _public(version: str) -> str:
    """The version without its local build tag ("2.13.0+cpu" -> "2.13.0")."""
    return version.split("+", 1)[0]


# Libraries whose major.minor must match: the scripted graphs call their operators by schema.
_STRICT_LIBRARIES = ("torch", "fbgemm_gpu")


def check_compatible(
    built_with: manifest_pb2.LibraryVersions, current: manifest_pb2.LibraryVersions
) -> Compatibility:
    """Compares the library versions a bundle was built with to the ones installed here.

    Rules: torch and fbgemm_gpu must agree on major.minor (exported graphs and the fbgemm
    operators they call change between minors); a different torchrec minor, or any different
    faiss release (HNSW search differs between versions), is a warning. A library the bundle
    did not record is not checked. The CPU/CUDA build tag ("+cpu") is ignored.

    Returns:
        The errors and warnings, each one line naming the library and both versions.
    """
    errors: list[str] = []
    warnings: list[str] = []
    for library in _STRICT_LIBRARIES:
        built, here = getattr(built_with, library), getattr(current, library)
        if not built:
            continue
        if not here:
            errors.append(f"{library} {built} built this bundle but is not installed here")
        elif _major_minor(built) != _major_minor(here):
            errors.append(
                f"{library} {here} is installed but the bundle was built with {built}; "
                "major.minor must match"
            )
    if built_with.torchrec and current.torchrec:
        if _major_minor(built_with.torchrec) != _major_minor(current.torchrec):
            warnings.append(
                f"torchrec {current.torchrec} is installed, the bundle was built with "
                f"{built_with.torchrec}"
            )
    elif built_with.torchrec:
        warnings.append(f"torchrec {built_with.torchrec} built this bundle but is not installed")
    if built_with.faiss:
        if not current.faiss:
            errors.append(f"faiss {built_with.faiss} built this bundle but is not installed here")
        elif _public(built_with.faiss) != _public(current.faiss):
            warnings.append(
                f"faiss {current.faiss} is installed, the index was built with "
                f"{built_with.faiss}; approximate search results may differ slightly"
            )
    return Compatibility(errors=tuple(errors), warnings=tuple(warnings))
