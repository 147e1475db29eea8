"""MANIFEST.json: the `recship.v1.BundleManifest` message as JSON, and its structural checks.

The packager writes it last when it publishes a version (`recship.bundle.writer`); the store
reads and validates it (`recship.bundle.store`). Both use this module so that what one writes
the other accepts. Plain functions over paths and messages, safe to call from any thread.

Example::

    manifest = read_manifest(version_dir / MANIFEST_FILENAME)
    validate_manifest(manifest, name="movies", version=3)
"""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

from google.protobuf import json_format

from recship.base.errors import InvalidInput, NotFound
from recship.base.files import write_bytes_atomic
from recship.bundle.checksums import is_safe_relative_path
from recship.bundle.layout import MANIFEST_FILENAME, is_bundle_name
from recship.protos.v1 import manifest_pb2

# The manifest format this code writes and the newest it reads.
FORMAT_VERSION = 1
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")

# Sub-messages every published manifest has (the bundle format of DESIGN.md).
REQUIRED_MESSAGES = ("created_at", "schema", "index", "golden", "quality", "libraries")


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
    elif not is_bundle_name(manifest.name):
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
        if not is_safe_relative_path(entry.path):
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
