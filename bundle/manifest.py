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

import numpy as np
from google.protobuf import json_format

from recship.base.errors import InvalidInput, NotFound, clip, untrusted
from recship.base.files import NotARegularFile, read_regular_file, write_bytes_atomic
from recship.bundle.checksums import is_safe_relative_path
from recship.bundle.layout import MANIFEST_FILENAME, RESERVED_FILENAMES, is_bundle_name
from recship.protos.v1 import manifest_pb2

# The manifest format this code writes and the newest it reads.
FORMAT_VERSION = 1
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
# Bounds on MANIFEST.json, checked before it is parsed: a real manifest is tens of kilobytes and
# nests about 5 levels deep; anything far beyond is not a manifest.
MAX_MANIFEST_BYTES = 8 * 1024 * 1024
MAX_JSON_DEPTH = 32
#: The deepest top_k / retrieve_k a server answers by default (`recship serve`'s limit); the
#: packager chooses a bundle's default retrieve_k within it.
DEFAULT_MAX_TOP_K = 1000
#: QualityReport.metrics keys of the end-to-end measurement start with this (e.g.
#: "end_to_end/recommend@100/recall@10", "end_to_end/popularity/ndcg@10").
END_TO_END_PREFIX = "end_to_end/"
# JSON strings, so that brackets inside them are not counted as nesting.
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')

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
        InvalidInput: not JSON, nested deeper than `MAX_JSON_DEPTH`, not an object, a newer
            format_version, or not a BundleManifest.
    """
    depth = json_depth(text.encode("utf-8", errors="replace"))
    if depth > MAX_JSON_DEPTH:
        raise InvalidInput(
            f"{source}: JSON nested {depth} levels deep, more than the {MAX_JSON_DEPTH} a "
            "manifest may have"
        )
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as error:
        raise InvalidInput(f"{source}: not valid JSON: {clip(str(error), 160)}") from None
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
    except (json_format.ParseError, RecursionError, ValueError, TypeError) as error:
        raise InvalidInput(
            f"{source}: not a valid BundleManifest: {clip(str(error), 200)}"
        ) from None
    return manifest


def json_depth(data: bytes) -> int:
    """How deeply `data` (JSON text) nests arrays and objects, without parsing it.

    Strings are skipped, so brackets inside them do not count. Linear time and no recursion,
    so it is safe to run on any input before `json.loads` (whose recursion it guards).
    """
    structure = np.frombuffer(_JSON_STRING.sub(b"", data), dtype=np.uint8)
    if structure.size == 0:
        return 0
    opens = (structure == ord("[")) | (structure == ord("{"))
    closes = (structure == ord("]")) | (structure == ord("}"))
    steps = opens.astype(np.int64) - closes.astype(np.int64)
    return int(max(np.cumsum(steps).max(), 0))


def write_manifest(path: Path, manifest: manifest_pb2.BundleManifest) -> None:
    """Writes the manifest as JSON atomically: temp file in the same folder, fsync, os.replace.

    A reader sees either the old file or the complete new one, never a partial write.
    """
    write_bytes_atomic(path, manifest_to_json(manifest).encode("utf-8"))


def read_manifest(path: Path) -> manifest_pb2.BundleManifest:
    """Reads and parses a MANIFEST.json file (no schema checks; see `validate_manifest`).

    The file must be a regular file (not a link, FIFO or device) of at most
    `MAX_MANIFEST_BYTES`; its size is checked before a byte is read.

    Raises:
        NotFound: the file does not exist.
        InvalidInput: it is not a regular file, too large, or cannot be read or parsed; the
            message names the file.
    """
    try:
        data = read_regular_file(path, MAX_MANIFEST_BYTES)
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise NotFound(f"{path}: no such manifest") from None
    except NotARegularFile as error:
        raise InvalidInput(str(error)) from None
    except ValueError as error:  # too large, or not UTF-8 (UnicodeDecodeError)
        reason = "not UTF-8" if isinstance(error, UnicodeDecodeError) else str(error)
        raise InvalidInput(f"{path}: cannot read the manifest: {reason}") from None
    except OSError as error:
        raise InvalidInput(f"{path}: cannot read the manifest: {error.strerror}") from None
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
        problems.append(f"name {untrusted(manifest.name)} is not a valid bundle name")
    elif name is not None and manifest.name != name:
        problems.append(f"name {untrusted(manifest.name)} does not match its folder {name!r}")
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
    problems.extend(schema_problems(manifest))
    return problems


def _release_id_problems(release_id: str) -> list[str]:
    if not release_id:
        return ["release_id is not set"]
    try:
        uuid.UUID(release_id)
    except ValueError:
        return [f"release_id {untrusted(release_id)} is not a UUID"]
    return []


def _file_list_problems(manifest: manifest_pb2.BundleManifest) -> tuple[set[str], list[str]]:
    problems: list[str] = []
    listed: set[str] = set()
    if not manifest.files:
        problems.append("files is empty")
    for position, entry in enumerate(manifest.files):
        where = f"files[{position}]"
        path = untrusted(entry.path)
        if not is_safe_relative_path(entry.path):
            problems.append(f"{where}.path {path} is not a relative path inside the bundle")
        elif entry.path in RESERVED_FILENAMES:
            problems.append(f"{where} lists {entry.path}, which the manifest never lists")
        elif entry.path in listed:
            problems.append(f"{where}.path {path} is listed twice")
        if not _SHA256_PATTERN.match(entry.sha256):
            problems.append(f"{where}.sha256 of {path} is not 64 lowercase hex digits")
        if entry.size_bytes < 0:
            problems.append(f"{where}.size_bytes of {path} is negative")
        listed.add(entry.path)
    return listed, problems


def _referenced_file_problems(manifest: manifest_pb2.BundleManifest, listed: set[str]) -> list[str]:
    problems: list[str] = []

    def check(field: str, file: str) -> None:
        if not file:
            problems.append(f"{field} is not set")
        elif file not in listed:
            problems.append(f"{field} {untrusted(file)} is not listed in files")

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
            problems.append(
                f"{where} repeats entry point {untrusted(entry_point.name)} in {format_name}"
            )
        seen.add(key)
        check(f"{where}.file", entry_point.file)
    for field in ("index", "item_features", "golden", "user_features", "transforms"):
        if manifest.HasField(field):
            check(f"{field}.file", getattr(manifest, field).file)
    return problems


# The model each entry point runs (bundle/FORMAT.md, entry points).
ENTRY_POINT_MODELS = {
    "query_tower": manifest_pb2.MODEL_ROLE_RETRIEVAL,
    "ranker": manifest_pb2.MODEL_ROLE_RANKING,
}


def schema_problems(manifest: manifest_pb2.BundleManifest) -> list[str]:
    """The manifest's declared shapes checked against each other (no file access).

    Every count and size the runtime trusts must agree everywhere the manifest states it: item
    counts (schema, index, item table), each feature's cardinality against the table it looks
    up, the entry points' feature orders against the schema's features and sides, the dense
    feature split, the golden set, and the resources against the files. The files themselves
    are checked against these numbers when they are read (`recship.bundle.index`,
    `.item_features`, `.golden`, `.entrypoints`).

    Returns:
        One line per problem; empty when consistent.
    """
    if not manifest.HasField("schema"):
        return []
    schema = manifest.schema
    problems: list[str] = []
    if schema.num_items <= 0:
        problems.append(f"schema.num_items must be > 0, found {schema.num_items}")
    if schema.retrieval_dim <= 0:
        problems.append("schema.retrieval_dim is not set")
    features: dict[str, manifest_pb2.SparseFeatureSpec] = {}
    for feature in schema.sparse_features:
        name = untrusted(feature.name)
        if feature.name in features:
            problems.append(f"schema feature {name} is listed twice")
        features[feature.name] = feature
        if feature.cardinality <= 0:
            problems.append(f"schema feature {name}: cardinality must be > 0")
        if feature.side == manifest_pb2.FEATURE_SIDE_UNSPECIFIED:
            problems.append(f"schema feature {name}: side is not set")
    table_of: dict[int, dict[str, manifest_pb2.TableSpec]] = {}
    seen_tables: set[tuple[int, str]] = set()
    for table in schema.tables:
        key = (table.model, table.name)
        label = untrusted(table.name)
        if key in seen_tables:
            problems.append(f"schema table {label} is listed twice for its model")
        seen_tables.add(key)
        if table.num_embeddings <= 0 or table.embedding_dim <= 0:
            problems.append(f"schema table {label}: num_embeddings and embedding_dim must be > 0")
        for feature_name in table.feature_names:
            if feature_name not in features:
                problems.append(
                    f"schema table {label} names unknown feature {untrusted(feature_name)}"
                )
            elif feature_name in table_of.setdefault(table.model, {}):
                problems.append(
                    f"schema feature {untrusted(feature_name)} has two tables in one model"
                )
            table_of[table.model][feature_name] = table
    for feature in features.values():
        for role in feature.used_by:
            table = table_of.get(role, {}).get(feature.name)
            if table is None:
                problems.append(
                    f"schema feature {untrusted(feature.name)} is used by "
                    f"{manifest_pb2.ModelRole.Name(role)} but no table of that model looks it up"
                )
            elif feature.cardinality > table.num_embeddings:
                problems.append(
                    f"schema feature {untrusted(feature.name)}: cardinality {feature.cardinality} "
                    f"exceeds the {table.num_embeddings} rows of table {untrusted(table.name)}"
                )
    item_id = features.get(schema.item_id_feature)
    if item_id is None or item_id.side != manifest_pb2.FEATURE_SIDE_ITEM:
        problems.append(
            f"schema.item_id_feature {untrusted(schema.item_id_feature)} is not an item feature"
        )
    elif item_id.cardinality < schema.num_items:
        problems.append(
            f"schema.item_id_feature cardinality {item_id.cardinality} is below "
            f"schema.num_items {schema.num_items}"
        )
    if schema.query_dense_count > len(schema.dense_features):
        problems.append(
            f"schema.query_dense_count {schema.query_dense_count} exceeds the "
            f"{len(schema.dense_features)} dense features"
        )
    problems.extend(_component_problems(manifest, features))
    problems.extend(_entry_point_feature_problems(manifest, features))
    return problems


def _component_problems(
    manifest: manifest_pb2.BundleManifest, features: dict[str, manifest_pb2.SparseFeatureSpec]
) -> list[str]:
    schema = manifest.schema
    problems: list[str] = []
    if manifest.HasField("index") and not 0 < manifest.index.num_vectors <= schema.num_items:
        problems.append(
            f"index.num_vectors {manifest.index.num_vectors} is not in [1, schema.num_items "
            f"{schema.num_items}]"
        )
    if manifest.HasField("serving") and manifest.HasField("index"):
        default_k = manifest.serving.retrieve_k
        if default_k > manifest.index.num_vectors:
            problems.append(
                f"serving.retrieve_k {default_k} exceeds the index's "
                f"{manifest.index.num_vectors} vectors"
            )
    if manifest.HasField("item_features"):
        table = manifest.item_features
        if table.num_items != schema.num_items:
            problems.append(
                f"item_features.num_items {table.num_items} differs from schema.num_items "
                f"{schema.num_items}"
            )
        item_dense = list(schema.dense_features[schema.query_dense_count :])
        if list(table.dense_features) != item_dense:
            problems.append("item_features.dense_features differ from the schema's item-side ones")
        for name in table.sparse_features:
            feature = features.get(name)
            if feature is None or feature.side != manifest_pb2.FEATURE_SIDE_ITEM:
                problems.append(f"item_features stores {untrusted(name)}, not an item feature")
    if manifest.HasField("user_features"):
        table = manifest.user_features
        user_dense = list(schema.dense_features[: schema.query_dense_count])
        if list(table.dense_features) != user_dense:
            problems.append("user_features.dense_features differ from the schema's query-side ones")
        if table.num_users < 1:
            problems.append("user_features.num_users must be >= 1")
        key = features.get(schema.user_id_feature)
        if key is None or key.side != manifest_pb2.FEATURE_SIDE_QUERY:
            problems.append("user_features needs schema.user_id_feature, a query-side feature")
        elif key.cardinality < table.num_users:
            problems.append(
                f"user_features.num_users {table.num_users} exceeds the "
                f"{key.cardinality} ids of {untrusted(key.name)}"
            )
        for name in table.sparse_features:
            feature = features.get(name)
            if feature is None or feature.side != manifest_pb2.FEATURE_SIDE_QUERY:
                problems.append(f"user_features stores {untrusted(name)}, not a query feature")
    if manifest.HasField("golden"):
        golden = manifest.golden
        if golden.examples < 1:
            problems.append("golden.examples must be >= 1")
        if not (0 <= golden.atol < float("inf") and 0 <= golden.rtol < float("inf")):
            problems.append("golden.atol and golden.rtol must be finite and >= 0")
    if manifest.HasField("resources"):
        total = sum(entry.size_bytes for entry in manifest.files)
        if manifest.resources.host_bytes < total:
            problems.append(
                f"resources.host_bytes {manifest.resources.host_bytes} is below the "
                f"{total} bytes of the files"
            )
        if any(count < 0 for count in manifest.resources.device_bytes):
            problems.append("resources.device_bytes holds a negative count")
    return problems


def _entry_point_feature_problems(
    manifest: manifest_pb2.BundleManifest, features: dict[str, manifest_pb2.SparseFeatureSpec]
) -> list[str]:
    problems: list[str] = []
    names = {entry.name for entry in manifest.entry_points}
    for required in ENTRY_POINT_MODELS:
        if manifest.entry_points and required not in names:
            problems.append(f"entry point {required} is missing")
    stored = set(manifest.item_features.sparse_features)
    for position, entry in enumerate(manifest.entry_points):
        where = f"entry_points[{position}]"
        model = ENTRY_POINT_MODELS.get(entry.name)
        if model is None:
            problems.append(f"{where}: unknown entry point {untrusted(entry.name)}")
            continue
        order = list(entry.sparse_feature_order)
        if not order or len(set(order)) != len(order):
            problems.append(f"{where}.sparse_feature_order is empty or repeats a feature")
        sides = []
        for name in order:
            feature = features.get(name)
            if feature is None:
                problems.append(f"{where} takes unknown feature {untrusted(name)}")
                continue
            if model not in feature.used_by:
                problems.append(f"{where} takes {untrusted(name)}, which its model does not use")
            sides.append(feature.side)
            if feature.side == manifest_pb2.FEATURE_SIDE_ITEM and name not in stored:
                problems.append(f"{where} takes item feature {untrusted(name)}, not stored")
        if entry.name == "query_tower" and any(s != manifest_pb2.FEATURE_SIDE_QUERY for s in sides):
            problems.append(f"{where}: the query tower takes only query-side features")
        if sides != sorted(sides):  # FEATURE_SIDE_QUERY (1) before FEATURE_SIDE_ITEM (2)
            problems.append(f"{where}: query-side features must come before item-side ones")
    return problems
