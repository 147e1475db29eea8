"""Atomic publishing: versions, concurrent publishers, kill -9 mid-write, clean-up, bad repos.

Concurrency and crash tests run real publisher processes: this file, run as a script, is the
publisher (see `_child_main`), so parent and children share the same helpers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recship.base.errors import InvalidInput
from recship.bundle.checksums import verify_files
from recship.bundle.layout import MANIFEST_FILENAME, STAGING_PREFIX, published_versions
from recship.bundle.manifest import read_manifest, validate_manifest
from recship.bundle.writer import BundleWriter, remove_abandoned_staging
from recship.protos.v1 import manifest_pb2

BUNDLE_FILES = ("query_tower.pt", "ranker.pt", "items.faiss", "item_features.npz", "golden.npz")


def _stage(folder: Path, tag: str, files: tuple[str, ...] = BUNDLE_FILES) -> None:
    """Writes bundle files whose contents name the publisher `tag`."""
    for name in files:
        (folder / name).write_bytes(f"{tag}:{name}\n".encode() * 100)


def _fill(manifest: manifest_pb2.BundleManifest) -> None:
    """Completes a manifest the way the packager would, for the files of `_stage`."""
    manifest.schema.retrieval_dim = 32
    manifest.schema.num_items = 1682
    for name in ("query_tower", "ranker"):
        manifest.entry_points.add(
            name=name, format=manifest_pb2.ENTRY_POINT_FORMAT_TORCHSCRIPT, file=f"{name}.pt"
        )
    manifest.index.file = "items.faiss"
    manifest.index.type = manifest_pb2.INDEX_TYPE_FLAT
    manifest.index.dim = 32
    manifest.item_features.file = "item_features.npz"
    manifest.golden.file = "golden.npz"
    manifest.quality.passed = True
    _fill_schema(manifest, 1682)


def _fill_schema(manifest: manifest_pb2.BundleManifest, num_items: int) -> None:
    """Counts that agree everywhere the manifest states them (as tests/bundle/conftest.py's
    `fill_schema`; repeated here because publisher processes run this file as a script)."""
    query, item = manifest_pb2.FEATURE_SIDE_QUERY, manifest_pb2.FEATURE_SIDE_ITEM
    retrieval, ranking = manifest_pb2.MODEL_ROLE_RETRIEVAL, manifest_pb2.MODEL_ROLE_RANKING
    schema = manifest.schema
    schema.item_id_feature = "item_id"
    schema.sparse_features.add(
        name="user_id", side=query, cardinality=5, used_by=[retrieval, ranking]
    )
    schema.sparse_features.add(name="item_id", side=item, cardinality=num_items, used_by=[ranking])
    for model in (retrieval, ranking):
        schema.tables.add(
            name="t_user", model=model, num_embeddings=5, embedding_dim=4, feature_names=["user_id"]
        )
    schema.tables.add(
        name="t_item",
        model=ranking,
        num_embeddings=num_items,
        embedding_dim=4,
        feature_names=["item_id"],
    )
    orders = {"query_tower": ["user_id"], "ranker": ["user_id", "item_id"]}
    for entry in manifest.entry_points:
        entry.sparse_feature_order[:] = orders[entry.name]
    manifest.index.num_vectors = manifest.item_features.num_items = num_items
    manifest.item_features.sparse_features[:] = ["item_id"]
    manifest.golden.examples = 4
    manifest.resources.host_bytes = sum(entry.size_bytes for entry in manifest.files)


def _visible(repo: Path) -> list[int]:
    return published_versions(repo / "movies")


def _staging_dirs(repo: Path) -> list[Path]:
    return [p for p in (repo / "movies").iterdir() if p.name.startswith(STAGING_PREFIX)]


def test_publish_creates_consecutive_complete_versions(tmp_path: Path) -> None:
    refs = []
    for tag in ("first", "second"):
        with BundleWriter(tmp_path, "movies") as staging:
            assert staging.path.parent == tmp_path / "movies"
            assert staging.path.name.startswith(STAGING_PREFIX)
            _stage(staging.path, tag)
            refs.append(staging.publish(_fill))
    assert [(ref.name, ref.version) for ref in refs] == [("movies", 1), ("movies", 2)]
    assert refs[1].path == tmp_path / "movies" / "2"
    assert _visible(tmp_path) == [1, 2]
    assert _staging_dirs(tmp_path) == []
    manifest = read_manifest(refs[1].path / MANIFEST_FILENAME)
    validate_manifest(manifest, name="movies", version=2)
    assert verify_files(refs[1].path, manifest) == []
    assert sorted(entry.path for entry in manifest.files) == sorted(BUNDLE_FILES)
    assert manifest.libraries.torch and manifest.created_by.startswith("recship ")
    assert (refs[1].path / "ranker.pt").read_bytes().startswith(b"second:")
    first = read_manifest(refs[0].path / MANIFEST_FILENAME)
    assert first.release_id != manifest.release_id


def test_exception_inside_the_block_removes_staging(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError, match="training data vanished"),
        BundleWriter(tmp_path, "movies") as staging,
    ):
        _stage(staging.path, "doomed")
        raise RuntimeError("training data vanished")
    assert _staging_dirs(tmp_path) == []
    assert _visible(tmp_path) == []


def test_leaving_without_publishing_discards_the_files(tmp_path: Path) -> None:
    with BundleWriter(tmp_path, "movies") as staging:
        _stage(staging.path, "unused")
    assert not staging.path.exists()
    assert _visible(tmp_path) == []


def test_invalid_manifest_publishes_nothing_and_frees_the_number(tmp_path: Path) -> None:
    def incomplete(manifest: manifest_pb2.BundleManifest) -> None:
        _fill(manifest)
        manifest.ClearField("golden")

    with (
        pytest.raises(InvalidInput, match="invalid manifest: golden is not set"),
        BundleWriter(tmp_path, "movies") as staging,
    ):
        _stage(staging.path, "broken")
        staging.publish(incomplete)
    assert sorted(p.name for p in (tmp_path / "movies").iterdir()) == [".lock"]
    with BundleWriter(tmp_path, "movies") as staging:
        _stage(staging.path, "good")
        assert staging.publish(_fill).version == 1


def test_filler_may_not_change_identity_and_caller_may_not_write_the_manifest(
    tmp_path: Path,
) -> None:
    def rename(manifest: manifest_pb2.BundleManifest) -> None:
        _fill(manifest)
        manifest.name = "books"

    with BundleWriter(tmp_path, "movies") as staging:
        _stage(staging.path, "x")
        with pytest.raises(ValueError, match="must not change name, version or files"):
            staging.publish(rename)
        (staging.path / MANIFEST_FILENAME).write_text("{}")
        with pytest.raises(ValueError, match="written by publish"):
            staging.publish(_fill)
    assert _visible(tmp_path) == []


def test_publish_twice_is_refused(tmp_path: Path) -> None:
    with BundleWriter(tmp_path, "movies") as staging:
        _stage(staging.path, "once")
        staging.publish(_fill)
        with pytest.raises(ValueError, match="movies/1 was already published"):
            staging.publish(_fill)
    assert _visible(tmp_path) == [1]


def test_unwritable_repository_is_one_clear_line(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "repo"
    not_a_folder.write_text("a file where the repository should be")
    with pytest.raises(InvalidInput) as caught, BundleWriter(not_a_folder, "movies"):
        pass
    message = str(caught.value)
    assert message.startswith(f"cannot write to bundle repository {not_a_folder}: ")
    assert "\n" not in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders anyway")
def test_read_only_repository_is_refused(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "movies").mkdir(parents=True)
    (repo / "movies").chmod(0o555)
    try:
        with pytest.raises(InvalidInput, match="Permission denied"), BundleWriter(repo, "movies"):
            pass
    finally:
        (repo / "movies").chmod(0o755)


def test_invalid_bundle_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"invalid bundle name '\.\./escape'"):
        BundleWriter(tmp_path, "../escape")


def test_abandoned_staging_is_removed_but_a_live_one_is_kept(tmp_path: Path) -> None:
    bundle = tmp_path / "movies"
    dead = bundle / f"{STAGING_PREFIX}dead"
    dead.mkdir(parents=True)
    _stage(dead, "dead")
    hour_ago = time.time() - 3600
    os.utime(dead, (hour_ago, hour_ago))
    fresh = bundle / f"{STAGING_PREFIX}fresh"  # might be a writer between mkdir and flock
    fresh.mkdir()
    with BundleWriter(tmp_path, "movies") as live:
        assert not dead.exists()
        assert fresh.exists()
        # A second writer that treats every folder as old still keeps the flock-ed live one.
        assert remove_abandoned_staging(bundle, older_than_s=0) == [fresh]
        assert live.path.exists()
        _stage(live.path, "live")
        assert live.publish(_fill).version == 1


def test_folders_left_by_dead_publishers_are_handled(tmp_path: Path) -> None:
    bundle = tmp_path / "movies"
    (bundle / "1").mkdir(parents=True)  # empty: claimed by a publisher killed before its rename
    (bundle / "2").mkdir()
    (bundle / "2" / "partial.bin").write_bytes(b"copied by hand, no manifest")
    assert _visible(tmp_path) == []
    with BundleWriter(tmp_path, "movies") as staging:
        _stage(staging.path, "after")
        ref = staging.publish(_fill)
    # The empty claim is reused; the foreign non-empty folder is left alone and skipped.
    assert ref.version == 3
    assert (bundle / "2" / "partial.bin").exists()
    assert not (bundle / "1").exists()
    assert _visible(tmp_path) == [3]


# --- real publisher processes ----------------------------------------------------------------


def _start_publisher(repo: Path, mode: str, tag: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, str(repo), mode, tag],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _expect_line(process: subprocess.Popen[str], expected: str) -> None:
    assert process.stdout is not None
    line = process.stdout.readline().strip()
    assert line == expected, f"publisher said {line!r}, exit code {process.poll()}"


def _child_main(repo: Path, mode: str, tag: str) -> None:
    """A publisher process. Reports its progress on stdout; waits for the parent on stdin.

    Modes: "race" publishes when told to; "kill-mid-files" stops after writing half the files;
    "kill-in-fill" stops inside the manifest filler, after every file is written and hashed.
    """
    with BundleWriter(repo, "movies") as staging:
        if mode == "kill-mid-files":
            _stage(staging.path, tag, BUNDLE_FILES[: len(BUNDLE_FILES) // 2])
            print("ready", flush=True)
            sys.stdin.read()
            return
        _stage(staging.path, tag)
        if mode == "race":
            print("staged", flush=True)
            sys.stdin.readline()
            print(staging.publish(_fill).version, flush=True)
            return

        def fill_then_stop(manifest: manifest_pb2.BundleManifest) -> None:
            _fill(manifest)
            print("ready", flush=True)
            sys.stdin.read()

        staging.publish(fill_then_stop)


def test_concurrent_publishers_get_distinct_versions(tmp_path: Path) -> None:
    tags = [f"publisher{i}" for i in range(4)]
    processes = [_start_publisher(tmp_path, "race", tag) for tag in tags]
    try:
        for process in processes:
            _expect_line(process, "staged")
        for process in processes:  # release all four at once
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        versions = {}
        for tag, process in zip(tags, processes, strict=True):
            out, _ = process.communicate(timeout=60)
            assert process.returncode == 0
            versions[int(out.strip())] = tag
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert sorted(versions) == [1, 2, 3, 4]
    assert _visible(tmp_path) == [1, 2, 3, 4]
    for version, tag in versions.items():
        folder = tmp_path / "movies" / str(version)
        manifest = read_manifest(folder / MANIFEST_FILENAME)
        assert manifest.version == version
        assert verify_files(folder, manifest) == []
        assert (folder / "ranker.pt").read_bytes().startswith(f"{tag}:".encode())
    assert (
        len(
            {
                read_manifest(tmp_path / "movies" / str(v) / MANIFEST_FILENAME).release_id
                for v in versions
            }
        )
        == 4
    )
    assert _staging_dirs(tmp_path) == []


@pytest.mark.parametrize("mode", ["kill-mid-files", "kill-in-fill"])
def test_kill_9_while_publishing_leaves_the_repository_unchanged(tmp_path: Path, mode: str) -> None:
    with BundleWriter(tmp_path, "movies") as staging:
        _stage(staging.path, "existing")
        staging.publish(_fill)
    process = _start_publisher(tmp_path, mode, "killed")
    try:
        _expect_line(process, "ready")
        assert len(_staging_dirs(tmp_path)) == 1
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert _visible(tmp_path) == [1]
    assert sorted(p.name for p in (tmp_path / "movies").iterdir() if p.name[0] != ".") == ["1"]
    # The next publisher cleans up the dead one's staging folder and takes the next number.
    with BundleWriter(tmp_path, "movies", stale_staging_s=0) as staging:
        _stage(staging.path, "next")
        assert staging.publish(_fill).version == 2
    assert _staging_dirs(tmp_path) == []
    assert _visible(tmp_path) == [1, 2]


if __name__ == "__main__":
    _child_main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
