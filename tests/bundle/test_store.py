"""BundleStore over real repositories in tmp_path: listing, validation, damage and mismatches."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from recship.base.errors import InvalidInput, NotFound
from recship.bundle.compat import current_library_versions
from recship.bundle.layout import MANIFEST_FILENAME, STAGING_PREFIX, BundleRef
from recship.bundle.manifest import read_manifest, write_manifest
from recship.bundle.store import BundleStore
from recship.bundle.writer import BundleWriter
from recship.protos.v1 import manifest_pb2

FILES = ("query_tower.pt", "ranker.pt", "items.faiss", "item_features.npz", "golden.npz")


def _fill(manifest: manifest_pb2.BundleManifest) -> None:
    for name in ("query_tower", "ranker"):
        manifest.entry_points.add(
            name=name, format=manifest_pb2.ENTRY_POINT_FORMAT_TORCHSCRIPT, file=f"{name}.pt"
        )
    manifest.index.file = "items.faiss"
    manifest.index.type = manifest_pb2.INDEX_TYPE_FLAT
    manifest.index.dim = 16
    manifest.item_features.file = "item_features.npz"
    manifest.golden.file = "golden.npz"
    manifest.quality.passed = True
    _FILL_SCHEMA[0](manifest, 50, 16)


# tests/bundle/conftest.py's `fill_schema`, installed by the autouse fixture below.
_FILL_SCHEMA: list = []


@pytest.fixture(autouse=True)
def _schema(schema_filler) -> None:
    _FILL_SCHEMA[:] = [schema_filler]


def _publish(repo: Path, name: str) -> BundleRef:
    with BundleWriter(repo, name) as staging:
        for file in FILES:
            (staging.path / file).write_bytes(f"{name} {file}".encode() * 50)
        return staging.publish(_fill)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """movies/1, movies/2 and books/1, plus the debris a repository can hold."""
    _publish(tmp_path, "movies")
    _publish(tmp_path, "movies")
    _publish(tmp_path, "books")
    (tmp_path / "movies" / f"{STAGING_PREFIX}0123").mkdir()  # a packager at work
    (tmp_path / "movies" / "3").mkdir()  # a claim: no manifest yet
    (tmp_path / "movies" / "03").mkdir()
    (tmp_path / "empty").mkdir()  # a bundle folder whose only publish never finished
    (tmp_path / "empty" / "1").mkdir()
    (tmp_path / "not a name").mkdir()
    (tmp_path / "README").write_text("a file, not a bundle")
    return tmp_path


def test_lists_only_published_bundles_and_versions(repo: Path) -> None:
    store = BundleStore(repo)
    assert store.list_bundles() == ["books", "movies"]
    assert store.list_versions("movies") == [1, 2]
    assert store.list_versions("books") == [1]
    assert store.list_versions("empty") == []
    assert store.ref("movies", 2) == BundleRef("movies", 2, repo / "movies" / "2")


def test_unknown_bundle_version_and_repository_are_not_found(repo: Path) -> None:
    store = BundleStore(repo)
    with pytest.raises(NotFound, match="no bundle 'music' in repository"):
        store.list_versions("music")
    with pytest.raises(
        NotFound,
        match=r"no published version 3: the folder holds no MANIFEST.json \(published: 1, 2\)",
    ):
        store.validate("movies", 3)
    with pytest.raises(NotFound, match=r"no published version 1: .* \(published: none\)"):
        store.ref("empty", 1)
    with pytest.raises(NotFound, match="does not exist"):
        BundleStore(repo / "missing").list_bundles()


def test_invalid_bundle_name_is_invalid_input(repo: Path) -> None:
    with pytest.raises(InvalidInput, match="invalid bundle name"):
        BundleStore(repo).list_versions("../movies")


def test_validate_returns_the_manifest(repo: Path) -> None:
    validated = BundleStore(repo).validate("movies", 2)
    assert validated.ref == BundleRef("movies", 2, repo / "movies" / "2")
    assert validated.manifest.version == 2
    assert validated.manifest.index.file == "items.faiss"
    assert validated.warnings == ()


def test_a_flipped_byte_fails_naming_the_file(repo: Path) -> None:
    path = repo / "movies" / "2" / "ranker.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    store = BundleStore(repo)
    with pytest.raises(InvalidInput) as caught:
        store.validate("movies", 2)
    message = str(caught.value)
    assert message.startswith("bundle movies/2 failed its file check: ranker.pt: sha256 ")
    assert "query_tower.pt" not in message
    # A quick check without hashing does not read the files; the other version is unaffected.
    assert store.validate("movies", 2, checksums=False).ref.version == 2
    assert store.validate("movies", 1).ref.version == 1


def test_missing_and_extra_files_are_named(repo: Path) -> None:
    folder = repo / "movies" / "1"
    (folder / "golden.npz").unlink()
    (folder / "notes.txt").write_text("added by hand")
    with pytest.raises(InvalidInput) as caught:
        BundleStore(repo).validate("movies", 1)
    message = str(caught.value)
    assert "golden.npz: missing" in message
    assert "notes.txt: present but not listed in the manifest" in message


def test_a_version_copied_to_another_number_is_refused(repo: Path) -> None:
    shutil.copytree(repo / "movies" / "2", repo / "movies" / "7")
    with pytest.raises(InvalidInput, match="version 2 does not match its folder 7"):
        BundleStore(repo).validate("movies", 7)


def test_a_damaged_manifest_is_invalid_input_naming_it(repo: Path) -> None:
    manifest_path = repo / "books" / "1" / MANIFEST_FILENAME
    manifest_path.write_text(manifest_path.read_text()[:100])
    with pytest.raises(InvalidInput, match=rf"{manifest_path}: not valid JSON"):
        BundleStore(repo).validate("books", 1)


def test_a_manifest_edited_to_fail_the_schema_is_refused(repo: Path) -> None:
    manifest_path = repo / "books" / "1" / MANIFEST_FILENAME
    manifest = read_manifest(manifest_path)
    manifest.entry_points[1].file = "ranker.pt2"
    write_manifest(manifest_path, manifest)
    with pytest.raises(InvalidInput, match=r"entry_points\[1\]\.file 'ranker\.pt2' is not listed"):
        BundleStore(repo).validate("books", 1)


def test_incompatible_libraries_are_refused_and_minor_differences_warned(repo: Path) -> None:
    here = current_library_versions()
    here.torch = "3.0.0"
    with pytest.raises(InvalidInput) as caught:
        BundleStore(repo, libraries=here).validate("movies", 1)
    assert "cannot be loaded with the libraries installed here: torch 3.0.0 is installed" in str(
        caught.value
    )
    here = current_library_versions()
    here.faiss = "9.9.9"
    validated = BundleStore(repo, libraries=here).validate("movies", 1)
    assert len(validated.warnings) == 1 and "faiss 9.9.9" in validated.warnings[0]
