"""Each reader's guard against a hostile file, on small crafted files (no server).

Version numbers and folder names, manifest size and nesting, sizes before hashes, FIFOs and
links, FAISS files that declare more than they hold, `.npz` archives with pickles, zip bombs
or lying headers, and the signature: sign in staging, verify, refuse what the key did not
sign.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import faiss
import numpy as np
import pytest

from recship.base.errors import InvalidInput, NotFound
from recship.bundle.checksums import check_file_list, file_digest
from recship.bundle.entrypoints import check_archive
from recship.bundle.index import check_index_header, read_index
from recship.bundle.item_features import check_archive as check_npz
from recship.bundle.layout import MAX_VERSION, parse_version_name, published_versions
from recship.bundle.manifest import MAX_JSON_DEPTH, json_depth, read_manifest
from recship.bundle.signature import generate_key_pair, sign_version, verify_signature
from recship.bundle.store import BundleStore
from recship.bundle.writer import BundleWriter
from recship.protos.v1 import manifest_pb2


@pytest.mark.parametrize(
    ("name", "number"),
    [
        ("1", 1),
        (str(MAX_VERSION), MAX_VERSION),
        (str(MAX_VERSION + 1), None),
        ("9223372036854775808", None),  # beyond int64
        ("9" * 5000, None),  # beyond Python's int() digit limit
        ("0", None),
        ("007", None),
        ("１", None),  # a non-ASCII digit
    ],
)
def test_version_numbers_are_bounded(name: str, number: int | None) -> None:
    assert parse_version_name(name) == number


def test_out_of_range_folders_never_break_a_listing(tmp_path: Path) -> None:
    for name in ("2", "99999999999999999999", str(MAX_VERSION + 1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "MANIFEST.json").write_text("{}")
    assert published_versions(tmp_path) == [2]


def test_json_depth_ignores_brackets_in_strings() -> None:
    assert json_depth(b'{"a": [1, {"b": "[[[[{{{{"}]}') == 3
    assert json_depth(b'"[[["') == 0
    assert json_depth(b"[" * 100_000) == 100_000


def test_manifest_reads_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "MANIFEST.json"
    path.write_text("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))
    with pytest.raises(InvalidInput, match="levels deep"):
        read_manifest(path)
    with open(path, "wb") as handle:
        handle.truncate(64 << 20)  # sparse: nothing is read
    started = time.perf_counter()
    with pytest.raises(InvalidInput, match="more than the"):
        read_manifest(path)
    assert time.perf_counter() - started < 1.0
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(InvalidInput, match="not a regular file"):
        read_manifest(path)  # would block forever if opened for reading without O_NONBLOCK
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere.json")
    (tmp_path / "elsewhere.json").write_text("{}")
    with pytest.raises(InvalidInput, match="symbolic link"):
        read_manifest(path)


def test_sizes_are_compared_before_anything_is_hashed(tmp_path: Path) -> None:
    folder = tmp_path / "7"
    folder.mkdir()
    with open(folder / "items.faiss", "wb") as handle:
        handle.truncate(4 << 30)  # a 4 GiB sparse file
    manifest = manifest_pb2.BundleManifest()
    manifest.files.add(path="items.faiss", sha256="0" * 64, size_bytes=100)
    started = time.perf_counter()
    problems = check_file_list(folder, manifest)
    assert problems == ["items.faiss: size 4294967296 bytes, the manifest says 100"]
    assert time.perf_counter() - started < 0.5
    # Hashing is bounded by the declared size too: reading stops after size + 1 bytes.
    assert file_digest(folder / "items.faiss", max_bytes=100).size_bytes == 101


def test_fifos_links_and_deep_folders_are_refused_unread(tmp_path: Path) -> None:
    folder = tmp_path / "7"
    (folder / "a" / "b" / "c" / "d" / "e" / "f" / "g" / "h").mkdir(parents=True)
    os.mkfifo(folder / "golden.pt")
    (folder / "ranker.pt").symlink_to("/etc/hostname")
    (folder / "MANIFEST.sig").symlink_to("/etc/hostname")
    manifest = manifest_pb2.BundleManifest()
    for name in ("golden.pt", "ranker.pt"):
        manifest.files.add(path=name, sha256="0" * 64, size_bytes=1)
    problems = check_file_list(folder, manifest)
    assert "golden.pt: not a regular file (a FIFO)" in problems
    assert "ranker.pt: not a regular file (a symbolic link)" in problems
    assert "MANIFEST.sig: not a regular file (a symbolic link)" in problems
    assert any("nested deeper than" in problem for problem in problems)


def _flat_index(path: Path, count: int = 3, dim: int = 4) -> manifest_pb2.IndexSpec:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    index.add_with_ids(np.ones((count, dim), dtype=np.float32), np.arange(count))
    faiss.write_index(index, str(path))
    return manifest_pb2.IndexSpec(dim=dim, num_vectors=count, metric="inner_product")


def test_index_header_is_checked_before_faiss_reads(tmp_path: Path) -> None:
    path = tmp_path / "items.faiss"
    spec = _flat_index(path)
    check_index_header(path, spec)
    with pytest.raises(InvalidInput, match="3 vectors, the manifest says 5"):
        check_index_header(path, manifest_pb2.IndexSpec(dim=4, num_vectors=5))
    with pytest.raises(InvalidInput, match="dimension 4, the manifest says 8"):
        read_index(path, manifest_pb2.IndexSpec(dim=8, num_vectors=3))
    assert read_index(path, spec, num_items=3).ntotal == 3
    with pytest.raises(InvalidInput, match=r"outside the items \[0, 2\)"):
        read_index(path, spec, num_items=2)


def test_a_faiss_file_cannot_allocate_more_than_its_size(tmp_path: Path) -> None:
    """A 162-byte file declaring a 1 GiB vector: refused without the allocation (measured in
    a fresh process, whose peak memory is its own)."""
    path = tmp_path / "items.faiss"
    spec = _flat_index(path)
    data = bytearray(path.read_bytes())
    struct.pack_into("<Q", data, data.find(b"IxFI") + 37, 1 << 28)
    path.write_bytes(bytes(data))
    probe = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from recship.bundle.index import read_index\n"
        "from recship.protos.v1 import manifest_pb2\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "spec = manifest_pb2.IndexSpec(dim=4, num_vectors=3, metric='inner_product')\n"
        "try:\n"
        "    read_index(Path(sys.argv[1]), spec)\n"
        "except Exception as error:\n"
        "    print(type(error).__name__, error)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(path)], capture_output=True, text=True, check=True
    )
    *said, grown_mib = result.stdout.strip().splitlines()
    assert said and said[0].startswith("InvalidInput") and "not a readable FAISS index" in said[0]
    assert int(grown_mib) < 100, result.stdout
    assert spec.num_vectors == 3


def _npz(path: Path, compress: bool = False, **arrays: np.ndarray) -> None:
    with open(path, "wb") as handle:
        (np.savez_compressed if compress else np.savez)(handle, **arrays)


def test_npz_archives_are_checked_before_numpy_allocates(tmp_path: Path) -> None:
    path = tmp_path / "item_features.npz"
    _npz(path, dense=np.zeros((4, 2), np.float32))
    check_npz(path)
    _npz(path, names=np.array([{"x": 1}], dtype=object))
    with pytest.raises(InvalidInput, match="holds Python objects"):
        check_npz(path)
    _npz(path, True, dense=np.zeros((4, 2), np.float32))
    with pytest.raises(InvalidInput, match="is compressed"):
        check_npz(path)
    # A header that declares a billion rows in a few bytes.
    _npz(path, dense=np.zeros((4, 2), np.float32))
    with zipfile.ZipFile(path) as archive:
        member = archive.read("dense.npy")
    member = member.replace(b"(4, 2)", b"(999999999, 2)".ljust(len(b"(4, 2)")), 1)
    lying = member.replace(b"'shape': (4, 2)", b"'shape': (999999999, 2)")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("dense.npy", lying)
    with pytest.raises(InvalidInput, match="more than its"):
        check_npz(path)


def test_a_model_archive_may_not_inflate(tmp_path: Path) -> None:
    path = tmp_path / "ranker.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("ranker/data.pkl", b"x" * 100)
    check_archive(path)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("ranker/bomb", b"\0" * (80 << 20))
    with pytest.raises(InvalidInput, match="inflate to"):
        check_archive(path)
    path.write_bytes(b"not a zip")
    with pytest.raises(InvalidInput, match="not a model archive"):
        check_archive(path)


# -- signatures -------------------------------------------------------------------------------
def _fill(manifest: manifest_pb2.BundleManifest, schema_filler) -> None:  # type: ignore[no-untyped-def]
    for name in ("query_tower", "ranker"):
        manifest.entry_points.add(
            name=name, format=manifest_pb2.ENTRY_POINT_FORMAT_TORCHSCRIPT, file=f"{name}.pt"
        )
    manifest.index.file = "items.faiss"
    manifest.index.type = manifest_pb2.INDEX_TYPE_FLAT
    manifest.index.dim = 8
    manifest.item_features.file = "item_features.npz"
    manifest.golden.file = "golden.pt"
    manifest.quality.passed = True
    schema_filler(manifest, 20, 8)


def _publish(repo: Path, schema_filler, key: Path | None) -> Path:  # type: ignore[no-untyped-def]
    with BundleWriter(repo, "movies") as staged:
        for name in (
            "query_tower.pt",
            "ranker.pt",
            "items.faiss",
            "item_features.npz",
            "golden.pt",
        ):
            (staged.path / name).write_bytes(name.encode() * 20)
        sign = None if key is None else (lambda folder: sign_version(folder, key))
        return staged.publish(lambda m: _fill(m, schema_filler), sign=sign).path


def test_the_writer_signs_in_staging_and_the_store_verifies(tmp_path: Path, schema_filler) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    generate_key_pair(keys / "key.pem", keys / "pub.pem")
    generate_key_pair(keys / "other.pem", keys / "other.pub.pem")
    assert (keys / "key.pem").stat().st_mode & 0o077 == 0
    with pytest.raises(InvalidInput, match="refusing to overwrite"):
        generate_key_pair(keys / "key.pem", keys / "new.pub.pem")
    repo = tmp_path / "repo"
    signed = _publish(repo, schema_filler, keys / "key.pem")
    unsigned = _publish(repo, schema_filler, None)
    assert (signed / "MANIFEST.sig").is_file() and not (unsigned / "MANIFEST.sig").exists()
    manifest = json.loads((signed / "MANIFEST.json").read_text())
    assert "MANIFEST.sig" not in {entry["path"] for entry in manifest["files"]}
    assert not [p for p in (repo / "movies").iterdir() if p.suffix == ".sig"]  # no leftovers
    verify_signature(signed, keys / "pub.pem")

    store = BundleStore(repo, public_key=keys / "pub.pem", require_signature=True)
    assert store.validate("movies", 1).signed
    with pytest.raises(InvalidInput, match="unsigned"):
        store.validate("movies", 2)
    assert BundleStore(repo, public_key=keys / "pub.pem").validate("movies", 2).warnings
    with pytest.raises(InvalidInput, match="does not verify"):
        verify_signature(signed, keys / "other.pub.pem")
    data = bytearray((signed / "ranker.pt").read_bytes())
    data[3] ^= 1
    (signed / "ranker.pt").write_bytes(bytes(data))
    with pytest.raises(InvalidInput, match=r"changed since signing: ranker\.pt"):
        verify_signature(signed, keys / "pub.pem")
    with pytest.raises(InvalidInput, match="not an unencrypted PEM public key"):
        BundleStore(repo, public_key=keys / "key.pem")
    with pytest.raises(InvalidInput, match="needs a public key"):
        BundleStore(repo, require_signature=True)
    with pytest.raises(NotFound, match="not a version number"):
        store.validate("movies", MAX_VERSION + 1)


def test_keygen_writes_a_pair_it_never_overwrites(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from recship.bundle.cli import keygen_command

    result = CliRunner().invoke(keygen_command, ["--out", str(tmp_path / "key.pem")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "key.pub.pem").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    again = CliRunner().invoke(keygen_command, ["--out", str(tmp_path / "key.pem")])
    assert again.exit_code != 0
