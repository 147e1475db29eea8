"""MANIFEST.json I/O, checksums, schema validation and library compatibility, on real files."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import stat
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pytest

from recship.base.errors import InvalidInput, NotFound
from recship.bundle.checksums import check_file_list, file_digest, scan_files, verify_files
from recship.bundle.compat import check_compatible, current_library_versions
from recship.bundle.layout import (
    MANIFEST_FILENAME,
    BundleRef,
    check_bundle_name,
    parse_version_name,
    published_versions,
)
from recship.bundle.manifest import (
    FORMAT_VERSION,
    manifest_from_json,
    manifest_to_json,
    read_manifest,
    validate_manifest,
    write_manifest,
)
from recship.protos.v1 import manifest_pb2

FILES = {
    "query_tower.pt": b"query tower bytes",
    "ranker.pt": b"ranker bytes" * 10,
    "items.faiss": b"\x00\x01index",
    "golden/inputs.npz": b"golden inputs",
    "item_features.npz": b"features",
}


def _write_files(version_dir: Path) -> None:
    for relative, data in FILES.items():
        path = version_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _valid_manifest(
    version_dir: Path, name: str = "movies", version: int = 3
) -> manifest_pb2.BundleManifest:
    """A complete manifest for the files of `_write_files`."""
    manifest = manifest_pb2.BundleManifest(
        format_version=FORMAT_VERSION,
        name=name,
        version=version,
        release_id="0b8f6c1e-3c55-4c43-8d38-2f0a1d6b9e11",
        created_by="recship test",
        libraries=current_library_versions(),
        files=scan_files(version_dir),
    )
    manifest.created_at.FromSeconds(1_790_000_000)
    manifest.schema.retrieval_dim = 16
    manifest.schema.num_items = 100
    for entry_point in ("query_tower", "ranker"):
        manifest.entry_points.add(
            name=entry_point,
            format=manifest_pb2.ENTRY_POINT_FORMAT_TORCHSCRIPT,
            file=f"{entry_point}.pt",
        )
    manifest.index.file = "items.faiss"
    manifest.index.type = manifest_pb2.INDEX_TYPE_HNSW
    manifest.index.dim = 16
    manifest.index.search_params["efSearch"] = 128
    manifest.item_features.file = "item_features.npz"
    manifest.golden.file = "golden/inputs.npz"
    manifest.quality.passed = True
    _FILL_SCHEMA[0](manifest, 100, 16)
    return manifest


# tests/bundle/conftest.py's `fill_schema`, installed by the autouse fixture below.
_FILL_SCHEMA: list = []


@pytest.fixture(autouse=True)
def _schema(schema_filler) -> None:
    _FILL_SCHEMA[:] = [schema_filler]


@pytest.fixture
def version_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "movies" / "3"
    folder.mkdir(parents=True)
    _write_files(folder)
    return folder


def test_json_round_trip_is_stable_and_uses_proto_field_names(version_dir: Path) -> None:
    manifest = _valid_manifest(version_dir)
    text = manifest_to_json(manifest)
    assert manifest_to_json(manifest_from_json(text)) == text
    assert manifest_from_json(text) == manifest
    document = json.loads(text)
    assert document["format_version"] == FORMAT_VERSION
    assert "size_bytes" in document["files"][0]
    assert list(document) == sorted(document)
    assert text.endswith("}\n")


def test_write_manifest_is_atomic_and_readable_by_others(version_dir: Path) -> None:
    manifest = _valid_manifest(version_dir)
    path = version_dir / MANIFEST_FILENAME
    write_manifest(path, manifest)
    manifest.quality.metrics["auc"] = 0.8
    write_manifest(path, manifest)
    assert read_manifest(path) == manifest
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not [p.name for p in version_dir.iterdir() if p.name.endswith(".tmp")]


def test_read_manifest_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / MANIFEST_FILENAME
    with pytest.raises(NotFound, match="no such manifest"):
        read_manifest(path)
    path.write_text('{"format_version": 1, "name": "movies"')
    with pytest.raises(InvalidInput, match=rf"{path}: not valid JSON"):
        read_manifest(path)
    path.write_text("[1, 2]")
    with pytest.raises(InvalidInput, match="expected a JSON object, found list"):
        read_manifest(path)
    path.write_text('{"format_version": 1, "nmae": "movies"}')
    with pytest.raises(InvalidInput, match=r"not a valid BundleManifest.*nmae"):
        read_manifest(path)
    path.write_text('{"format_version": 7, "future_field": {}}')
    with pytest.raises(InvalidInput, match="format_version 7 is newer than this recship reads"):
        read_manifest(path)


def test_file_digest_streams_large_files(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 5)
    path = tmp_path / "blob"
    path.write_bytes(data)
    digest = file_digest(path)
    assert digest.sha256 == hashlib.sha256(data).hexdigest()
    assert digest.size_bytes == len(data)


def test_scan_files_lists_every_file_but_the_manifest(version_dir: Path) -> None:
    (version_dir / MANIFEST_FILENAME).write_text("{}")
    entries = scan_files(version_dir)
    assert [entry.path for entry in entries] == sorted(FILES)
    for entry in entries:
        assert entry.sha256 == hashlib.sha256(FILES[entry.path]).hexdigest()
        assert entry.size_bytes == len(FILES[entry.path])


def test_scan_files_refuses_symlinks(version_dir: Path) -> None:
    (version_dir / "link.pt").symlink_to(version_dir / "ranker.pt")
    with pytest.raises(InvalidInput, match=r"link\.pt: not a regular file"):
        scan_files(version_dir)


def test_verify_files_accepts_an_intact_version(version_dir: Path) -> None:
    manifest = _valid_manifest(version_dir)
    write_manifest(version_dir / MANIFEST_FILENAME, manifest)
    assert verify_files(version_dir, manifest) == []


def test_verify_files_names_each_bad_file(version_dir: Path) -> None:
    manifest = _valid_manifest(version_dir)
    # Same size, one flipped bit: only the checksum can tell.
    ranker = version_dir / "ranker.pt"
    data = bytearray(ranker.read_bytes())
    data[7] ^= 0x01
    ranker.write_bytes(bytes(data))
    (version_dir / "query_tower.pt").write_bytes(b"short")
    (version_dir / "items.faiss").unlink()
    (version_dir / "golden" / "extra.bin").write_bytes(b"?")
    manifest.files.add(path="../outside", sha256="0" * 64, size_bytes=1)
    problems = verify_files(version_dir, manifest)
    # The file list is checked first, without reading a file; hashing waits until it is clean.
    assert len(problems) == 4, problems
    by_file = {problem.split(":")[0]: problem for problem in problems}
    assert "size 5 bytes, the manifest says 17" in by_file["query_tower.pt"]
    assert by_file["items.faiss"] == "items.faiss: missing"
    assert "not listed in the manifest" in by_file["golden/extra.bin"]
    assert "unsafe path" in by_file["../outside"]
    assert check_file_list(version_dir, manifest) == problems

    (version_dir / "golden" / "extra.bin").unlink()
    (version_dir / "items.faiss").write_bytes(FILES["items.faiss"])
    (version_dir / "query_tower.pt").write_bytes(FILES["query_tower.pt"])
    del manifest.files[-1]
    (problem,) = verify_files(version_dir, manifest)
    assert problem.startswith("ranker.pt: sha256")


def test_valid_manifest_passes_validation(version_dir: Path) -> None:
    validate_manifest(_valid_manifest(version_dir), name="movies", version=3)


Mutation = Callable[[manifest_pb2.BundleManifest], None]

INVALID_CASES: list[tuple[str, Mutation, str]] = [
    ("no format", lambda m: m.ClearField("format_version"), "format_version is not set"),
    ("new format", lambda m: setattr(m, "format_version", 9), "format_version 9 is newer"),
    ("no name", lambda m: m.ClearField("name"), "name is not set"),
    ("other name", lambda m: setattr(m, "name", "books"), "'books' does not match its folder"),
    ("bad name", lambda m: setattr(m, "name", "../x"), "not a valid bundle name"),
    ("no version", lambda m: m.ClearField("version"), "version must be a positive integer"),
    ("other version", lambda m: setattr(m, "version", 4), "version 4 does not match its folder 3"),
    ("no release", lambda m: m.ClearField("release_id"), "release_id is not set"),
    ("bad release", lambda m: setattr(m, "release_id", "abc"), "release_id 'abc' is not a UUID"),
    ("no time", lambda m: m.ClearField("created_at"), "created_at is not set"),
    ("no schema", lambda m: m.ClearField("schema"), "schema is not set"),
    ("no libraries", lambda m: m.ClearField("libraries"), "libraries is not set"),
    ("no torch", lambda m: m.libraries.ClearField("torch"), "libraries.torch is not set"),
    ("no golden", lambda m: m.ClearField("golden"), "golden is not set"),
    ("gate failed", lambda m: setattr(m.quality, "passed", False), "quality.passed is false"),
    ("no files", lambda m: m.ClearField("files"), "files is empty"),
    (
        "duplicate file",
        lambda m: m.files.append(m.files[0]),
        "files[5].path 'golden/inputs.npz' is listed twice",
    ),
    (
        "bad sha",
        lambda m: setattr(m.files[1], "sha256", "ABC"),
        "files[1].sha256 of 'item_features.npz' is not 64 lowercase hex digits",
    ),
    (
        "absolute path",
        lambda m: setattr(m.files[0], "path", "/etc/passwd"),
        "files[0].path '/etc/passwd' is not a relative path",
    ),
    (
        "manifest listed",
        lambda m: setattr(m.files[0], "path", MANIFEST_FILENAME),
        f"files[0] lists {MANIFEST_FILENAME}, which the manifest never lists",
    ),
    ("no entry points", lambda m: m.ClearField("entry_points"), "entry_points is empty"),
    (
        "unlisted entry point",
        lambda m: setattr(m.entry_points[1], "file", "ranker.pt2"),
        "entry_points[1].file 'ranker.pt2' is not listed in files",
    ),
    (
        "no format",
        lambda m: m.entry_points[0].ClearField("format"),
        "entry_points[0].format is not set",
    ),
    (
        "repeated entry point",
        lambda m: m.entry_points.append(m.entry_points[0]),
        "entry_points[2] repeats entry point 'query_tower' in ENTRY_POINT_FORMAT_TORCHSCRIPT",
    ),
    (
        "unlisted index",
        lambda m: setattr(m.index, "file", "other.faiss"),
        "index.file 'other.faiss' is not listed in files",
    ),
    ("no index type", lambda m: m.index.ClearField("type"), "index.type is not set"),
    (
        "dims differ",
        lambda m: setattr(m.index, "dim", 8),
        "index.dim 8 differs from schema.retrieval_dim 16",
    ),
    (
        "no item features file",
        lambda m: m.item_features.ClearField("file"),
        "item_features.file is not set",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [(mutate, message) for _, mutate, message in INVALID_CASES],
    ids=[case for case, _, _ in INVALID_CASES],
)
def test_invalid_manifest_is_rejected_precisely(
    version_dir: Path, mutate: Mutation, message: str
) -> None:
    manifest = _valid_manifest(version_dir)
    mutate(manifest)
    with pytest.raises(InvalidInput) as caught:
        validate_manifest(manifest, name="movies", version=3, source="movies/3/MANIFEST.json")
    text = str(caught.value)
    assert text.startswith("movies/3/MANIFEST.json: invalid manifest: ")
    assert message in text
    assert "\n" not in text


def test_validation_reports_every_problem_at_once(version_dir: Path) -> None:
    manifest = _valid_manifest(version_dir)
    manifest.ClearField("release_id")
    manifest.ClearField("golden")
    with pytest.raises(InvalidInput, match="release_id is not set; golden is not set"):
        validate_manifest(manifest)


def test_current_library_versions_come_from_package_metadata() -> None:
    import faiss

    versions = current_library_versions()
    assert versions.python == platform.python_version()
    assert versions.torch == metadata.version("torch")
    assert versions.torchrec == metadata.version("torchrec")
    assert versions.numpy == metadata.version("numpy")
    assert versions.faiss == faiss.__version__
    assert versions.recship == metadata.version("recship")
    fbgemm = [d for d in ("fbgemm-gpu-cpu", "fbgemm-gpu") if _installed(d)]
    assert fbgemm and versions.fbgemm_gpu == metadata.version(fbgemm[0])


def _installed(distribution: str) -> bool:
    try:
        metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def _libraries(**overrides: str) -> manifest_pb2.LibraryVersions:
    base = {
        "python": "3.11.7",
        "torch": "2.13.0+cpu",
        "torchrec": "1.8.0",
        "fbgemm_gpu": "1.8.0",
        "faiss": "1.15.1",
        "numpy": "2.4.6",
        "recship": "0.1.0",
    }
    base.update(overrides)
    return manifest_pb2.LibraryVersions(**base)


# (what the bundle was built with, what is installed, expected errors, expected warnings)
COMPATIBILITY_TABLE = [
    ({}, {}, [], []),
    ({"torch": "2.13.0+cu126"}, {"torch": "2.13.1+cpu"}, [], []),
    ({}, {"torch": "2.14.0"}, ["torch 2.14.0 is installed but the bundle was built with"], []),
    ({}, {"fbgemm_gpu": "1.9.0"}, ["fbgemm_gpu 1.9.0 is installed"], []),
    ({}, {"fbgemm_gpu": ""}, ["fbgemm_gpu 1.8.0 built this bundle but is not installed"], []),
    ({}, {"torchrec": "1.9.0"}, [], ["torchrec 1.9.0 is installed"]),
    ({}, {"torchrec": "1.8.1"}, [], []),
    ({}, {"faiss": "1.15.2"}, [], ["faiss 1.15.2 is installed, the index was built with 1.15.1"]),
    ({}, {"faiss": ""}, ["faiss 1.15.1 built this bundle but is not installed"], []),
    ({"fbgemm_gpu": ""}, {"fbgemm_gpu": "1.9.0"}, [], []),
    ({}, {"python": "3.12.1", "numpy": "2.5.0"}, [], []),
]


@pytest.mark.parametrize(("built", "here", "errors", "warnings"), COMPATIBILITY_TABLE)
def test_check_compatible(
    built: dict[str, str], here: dict[str, str], errors: list[str], warnings: list[str]
) -> None:
    result = check_compatible(_libraries(**built), _libraries(**here))
    assert len(result.errors) == len(errors) and len(result.warnings) == len(warnings), result
    for expected, found in zip(errors, result.errors, strict=True):
        assert expected in found
    for expected, found in zip(warnings, result.warnings, strict=True):
        assert expected in found
    assert result.ok == (not errors)


@pytest.mark.parametrize(
    ("folder", "expected"),
    [("1", 1), ("42", 42), ("0", None), ("03", None), ("-1", None), ("1a", None), ("²", None)],
)
def test_parse_version_name(folder: str, expected: int | None) -> None:
    assert parse_version_name(folder) == expected


@pytest.mark.parametrize("name", ["movies", "Movies-v2", "a.b_c"])
def test_valid_bundle_names(name: str) -> None:
    assert check_bundle_name(name) == name


@pytest.mark.parametrize("name", ["", "1", "7movies", ".staging-x", "a/b", "..", "a b", "x" * 129])
def test_invalid_bundle_names(name: str) -> None:
    with pytest.raises(InvalidInput, match="invalid bundle name"):
        check_bundle_name(name)


def test_published_versions_need_a_numeric_folder_with_a_manifest(tmp_path: Path) -> None:
    bundle = tmp_path / "movies"
    for folder in ("1", "2", "03", "10", ".staging-abc", "notes"):
        (bundle / folder).mkdir(parents=True)
        (bundle / folder / MANIFEST_FILENAME).write_text("{}")
    (bundle / "4").mkdir()  # claimed by a writer that died: no manifest
    (bundle / "5").mkdir()
    (bundle / "5" / MANIFEST_FILENAME).mkdir()  # not a regular file
    (bundle / "6").write_text("a file, not a folder")
    assert published_versions(bundle) == [1, 2, 10]
    assert published_versions(tmp_path / "absent") == []


def test_bundle_refs_order_by_name_then_version(tmp_path: Path) -> None:
    refs = [BundleRef("movies", 10, tmp_path), BundleRef("books", 3, tmp_path)]
    refs.append(BundleRef("movies", 2, tmp_path))
    assert [str(ref) for ref in sorted(refs)] == ["books/3", "movies/2", "movies/10"]
