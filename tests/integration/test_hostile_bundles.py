"""A hostile-bundle corpus published into a live server's repository while clients call it.

Every entry is the session bundle's `movies/1`, copied and tampered with the way a person who
can write to the repository (but does not hold the signing key) could: damaged and swapped
files, manifest-only edits of counts and cardinalities, consistent edits with the checksums
redone, links, FIFOs, paths out of the folder, pickles, a FAISS file that declares a
gigabyte, a sparse 4 GiB file, impossible version numbers. For each one:

- the server marks it FAILED with a reason naming the problem (or, for what is not a version
  at all, never lists it), and keeps serving v1: Recommend callers running throughout get
  no non-OK answer, and ListBundles / RefreshRepository keep answering;
- `recship verify` exits non-zero with a line naming the same problem.

A second server runs with `--require-signature`: the signed copy serves, an unsigned copy, one
signed with another key and a signed copy tampered afterwards do not.

The corpus table printed at the end (`-s`) is the one in the pull request.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import threading
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from recship.base.commands import run
from recship.base.errors import RecshipError
from recship.bundle.checksums import file_digest
from recship.cli.main import cli
from recship.protos.v1 import admin_pb2
from recship.runtime.client import Query, RecshipClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUNDLE = "movies"
FAILED = admin_pb2.VERSION_STATE_FAILED
CLIENTS = 4


# -- tampering helpers -------------------------------------------------------------------------
def manifest_of(folder: Path) -> dict:
    return json.loads((folder / "MANIFEST.json").read_text())


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))


def edit(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """A manifest-only edit: the files (and their checksums) stay as they are."""

    def apply(folder: Path) -> None:
        manifest = manifest_of(folder)
        change(manifest)
        write_manifest(folder, manifest)

    return apply


def rehash(folder: Path, *names: str) -> None:
    """Records the new size and sha256 of changed files, as an attacker would."""
    manifest = manifest_of(folder)
    for entry in manifest["files"]:
        if entry["path"] in names:
            digest = file_digest(folder / entry["path"])
            entry["sha256"], entry["size_bytes"] = digest.sha256, str(digest.size_bytes)
    total = sum(int(entry["size_bytes"]) for entry in manifest["files"])
    manifest["resources"]["host_bytes"] = str(max(total, int(manifest["resources"]["host_bytes"])))
    write_manifest(folder, manifest)


def flip_byte(name: str) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        data = bytearray((folder / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / name).write_bytes(bytes(data))

    return apply


def truncate(name: str) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        path = folder / name
        os.truncate(path, path.stat().st_size // 2)

    return apply


def symlink_file(name: str) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        target = folder.parent / f".{name}.outside"
        shutil.copyfile(folder / name, target)
        (folder / name).unlink()
        (folder / name).symlink_to(target)

    return apply


def fifo(name: str) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        (folder / name).unlink()
        os.mkfifo(folder / name)

    return apply


def sparse(name: str, size: int) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        (folder / name).unlink()
        with open(folder / name, "wb") as handle:
            handle.truncate(size)

    return apply


def garbage_manifest(folder: Path) -> None:
    (folder / "MANIFEST.json").write_bytes(bytes(range(256)) * 4)


def deep_manifest(folder: Path) -> None:
    manifest = manifest_of(folder)
    text = json.dumps(manifest)
    (folder / "MANIFEST.json").write_text(
        text[:-1] + ', "annotations": ' + "[" * 200_000 + "]" * 200_000 + "}"
    )


def path_out(path: str) -> Callable[[Path], None]:
    def change(manifest: dict) -> None:
        entry = next(e for e in manifest["files"] if e["path"] == "ranker.pt")
        entry["path"] = path
        for point in manifest["entry_points"]:
            if point["file"] == "ranker.pt":
                point["file"] = path

    return edit(change)


def feature(manifest: dict, name: str) -> dict:
    return next(f for f in manifest["schema"]["sparse_features"] if f["name"] == name)


def tables(manifest: dict, name: str) -> list[dict]:
    return [t for t in manifest["schema"]["tables"] if t["name"] == name]


def count_edit(manifest: dict) -> None:
    manifest["schema"]["num_items"] = "500"


def consistent_count_edit(manifest: dict) -> None:
    manifest["schema"]["num_items"] = "500"
    manifest["item_features"]["num_items"] = "500"
    feature(manifest, "item_id")["cardinality"] = "500"
    for table in tables(manifest, "t_item_id"):
        table["num_embeddings"] = "500"


def cardinality_edit(manifest: dict) -> None:
    feature(manifest, "user_id")["cardinality"] = "100000"


def consistent_cardinality_edit(manifest: dict) -> None:
    feature(manifest, "user_id")["cardinality"] = "100000"
    for table in tables(manifest, "t_user_id"):
        table["num_embeddings"] = "100000"


def pickled_item_table(folder: Path) -> None:
    path = folder / "item_features.npz"
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    arrays["sparse_names"] = np.array(["item_id", {"__reduce__": "os.system"}], dtype=object)
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    rehash(folder, "item_features.npz")


class _Payload:
    def __reduce__(self):  # what a pickle loader would run
        return (os.system, (f"touch {MARKER}",))


MARKER = Path("/tmp/recship-hostile-pickle-ran")


def pickled_golden(folder: Path) -> None:
    import torch

    torch.save({"golden": _Payload()}, folder / "golden.pt")
    rehash(folder, "golden.pt")


def oversized_index(folder: Path) -> None:
    """items.faiss declares a 1 GiB code vector in a 52 KB file (header fields intact)."""
    path = folder / "items.faiss"
    data = bytearray(path.read_bytes())
    inner = data.find(b"IxFI")
    struct.pack_into("<Q", data, inner + 37, 1 << 28)  # codes: 2**28 * 4 bytes
    path.write_bytes(bytes(data))
    rehash(folder, "items.faiss")


def shifted_index_ids(folder: Path) -> None:
    """A valid index whose ids are not the catalogue's (checksums redone)."""
    import faiss

    index = faiss.read_index(str(folder / "items.faiss"))
    ids = faiss.vector_to_array(index.id_map) + 1000
    faiss.copy_array_to_vector(ids.astype(np.int64), index.id_map)
    faiss.write_index(index, str(folder / "items.faiss"))
    rehash(folder, "items.faiss")


def zip_bomb_ranker(folder: Path) -> None:
    path = folder / "ranker.pt"
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("ranker/extra/bomb", b"\0" * (80 << 20))
    rehash(folder, "ranker.pt")


def dropped_dense_transform(folder: Path) -> None:
    """The query-side dense feature's transform removed from transforms.json and the manifest
    alike (checksums redone): each file agrees with the manifest, the set cannot encode a query."""
    transforms = json.loads((folder / "transforms.json").read_text())
    transforms["features"] = [f for f in transforms["features"] if f["name"] != "user_log_activity"]
    (folder / "transforms.json").write_text(json.dumps(transforms))
    manifest = manifest_of(folder)
    manifest["transforms"]["features"].remove("user_log_activity")
    write_manifest(folder, manifest)
    rehash(folder, "transforms.json")


def lowered_resources(manifest: dict) -> None:
    manifest["resources"]["host_bytes"] = "1"


@dataclass(frozen=True)
class Attack:
    name: str
    tamper: Callable[[Path], None] | None  # None: the folder is made by `make` instead
    reason: str  # in the server's FAILED reason (or None: not a version) and verify's output
    folder_name: str | None = None  # a non-numeric or out-of-range folder name
    make: Callable[[Path, Path], None] | None = None  # (bundle dir, source) -> folder


def _link_to_folder(bundle_dir: Path, source: Path) -> Path:
    target = bundle_dir.parent / "elsewhere"
    shutil.copytree(source, target)
    (bundle_dir / "90").symlink_to(target, target_is_directory=True)
    return bundle_dir / "90"


CORPUS: list[Attack] = [
    Attack("flipped byte", flip_byte("ranker.pt"), "ranker.pt: sha256"),
    Attack("truncated file", truncate("items.faiss"), "items.faiss: size"),
    Attack("garbage manifest", garbage_manifest, "MANIFEST.json: cannot read the manifest"),
    Attack("deeply nested manifest", deep_manifest, "levels deep"),
    Attack("future format", edit(lambda m: m.update(format_version=2)), "newer than this"),
    Attack("num_items edited alone", edit(count_edit), "differs from schema.num_items 500"),
    Attack(
        "num_items edited consistently",
        edit(consistent_count_edit),
        "the manifest declares float32 (500, 1)",
    ),
    Attack("cardinality edited", edit(cardinality_edit), "exceeds the 300 rows of table"),
    Attack(
        "cardinality + table rows edited",
        edit(consistent_cardinality_edit),
        # The user id vocabulary (transforms.json) holds 300 keys: caught before the model.
        "gives 300 ids, its table holds 100000",
    ),
    Attack("resources understated", edit(lowered_resources), "resources.host_bytes 1 is below"),
    # Each file agrees with the manifest, not with each other: read_contents' cross-checks.
    Attack("dense transform dropped", dropped_dense_transform, "transforms lack user_log_activity"),
    Attack("symlinked file", symlink_file("ranker.pt"), "ranker.pt: not a regular file"),
    Attack("absolute path", path_out("/etc/passwd"), "is not a relative path"),
    Attack("'..' path", path_out("../1/ranker.pt"), "is not a relative path"),
    Attack("pickled item table", pickled_item_table, "holds Python objects (pickle)"),
    Attack("pickled golden file", pickled_golden, "golden.pt: not a TorchScript golden file"),
    Attack("index declares 1 GiB", oversized_index, "items.faiss: not a readable FAISS index"),
    Attack("index ids not items", shifted_index_ids, "outside the items [0, 200)"),
    Attack("zip bomb entry point", zip_bomb_ranker, "inflate to"),
    Attack("sparse 4 GiB file", sparse("items.faiss", 4 << 30), "items.faiss: size 4294967296"),
    Attack("FIFO", fifo("golden.pt"), "golden.pt: not a regular file (a FIFO)"),
    # Not versions at all: never listed, never loaded.
    Attack("missing manifest", lambda f: (f / "MANIFEST.json").unlink(), "holds no MANIFEST.json"),
    Attack("symlink to a folder", None, "is a symbolic link", make=_link_to_folder),
    Attack("version beyond int64", None, "not a version number", "99999999999999999999"),
]


@dataclass
class Load:
    """Closed-loop Recommend callers on threads, recording every non-OK answer."""

    target: str
    make_user: Callable[[int], dict[str, int]]
    answers: int = 0
    versions: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(CLIENTS)]
        for thread in self.threads:
            thread.start()

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def _run(self, worker: int) -> None:
        with RecshipClient(self.target, timeout=30) as client:
            n = 0
            while not self.stop.is_set():
                query = Query(self.make_user((worker * 37 + n) % 300, 0.5))
                n += 1
                try:
                    response = client.recommend(BUNDLE, [query], retrieve_k=20, top_n=5)
                except RecshipError as error:
                    with self.lock:
                        self.errors.append(str(error))
                    continue
                with self.lock:
                    self.answers += 1
                    self.versions.add(response.served_by.version)


def plant(bundle_dir: Path, source: Path, number: int, attack: Attack) -> Path:
    """Publishes a tampered copy of `source` as version `number` (or under the attack's own
    folder name), the way a writer would: staged aside, then renamed into place."""
    if attack.make is not None:
        return attack.make(bundle_dir, source)
    staging = bundle_dir / f".staging-hostile-{number}"
    shutil.copytree(source, staging)
    manifest = manifest_of(staging)
    manifest["version"] = str(number)
    write_manifest(staging, manifest)
    if attack.tamper is not None:
        attack.tamper(staging)
    folder = bundle_dir / (attack.folder_name or str(number))
    staging.rename(folder)
    return folder


def verify(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`recship verify ARGS` in this process: (exit code, what it printed)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run(cli, ["verify", *args], "recship")
    captured = capsys.readouterr()
    return int(exited.value.code or 0), captured.out + captured.err


def test_no_hostile_version_ever_serves(
    bundle_repo: Path, tmp_path: Path, server_factory, make_user, capsys
) -> None:
    repo = tmp_path / "repo"
    source = bundle_repo / BUNDLE / "1"
    shutil.copytree(source, repo / BUNDLE / "1")
    bundle_dir = repo / BUNDLE
    MARKER.unlink(missing_ok=True)
    server = server_factory(repo, poll_interval_s=0.0, metrics_port=None)
    server.wait_ready()
    load = Load(server.target, make_user)
    rows: list[tuple[str, str, int]] = []
    timings: dict[str, float] = {}
    try:
        with server.admin(120) as admin:
            admin.wait_until_serving(60)
            load.start()
            for number, attack in enumerate(CORPUS, start=2):
                folder = plant(bundle_dir, source, number, attack)
                before_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                started = time.perf_counter()
                listing = admin.refresh_repository()  # the admin API keeps answering
                timings[attack.name] = time.perf_counter() - started
                grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_rss) / 1024
                versions = {v.version: v for v in listing.bundles[0].versions}
                default = next(v.version for v in versions.values() if v.is_default)
                assert default == 1, f"{attack.name}: the default moved to v{default}"
                listed = folder.name.isdigit() and int(folder.name) in versions
                if listed:
                    status = versions[int(folder.name)]
                    assert status.state == FAILED, f"{attack.name}: {status}"
                    assert attack.reason in status.failure_reason, (attack.name, status)
                    assert len(status.failure_reason) <= 2100
                    server_says = f"FAILED: {status.failure_reason}"
                else:
                    assert attack.tamper is None or "MANIFEST" in attack.reason, attack.name
                    server_says = "not a version: never listed"
                ready = [k for k, v in versions.items() if v.state == admin_pb2.VERSION_STATE_READY]
                assert ready == [1], f"{attack.name}: READY versions {ready}"
                assert grown_mib < 256, f"{attack.name}: the server grew by {grown_mib:.0f} MiB"
                code, output = verify(capsys, str(folder))
                assert code != 0, f"recship verify passed {attack.name}: {output}"
                assert attack.reason in " ".join(output.split()), (attack.name, output)
                rows.append((attack.name, server_says, code))
            assert admin.list_bundles().bundles[0].name == BUNDLE
            load.stop.wait(0.5)
    finally:
        load.finish()
    assert load.errors == []
    assert load.answers > 50 and load.versions == {1}
    assert not MARKER.exists(), "a pickle payload ran"
    assert timings["sparse 4 GiB file"] < 5.0, timings
    print(f"\n{'attack':<32} {'verify':>6}  server")
    for name, says, code in rows:
        print(f"{name:<32} {code:>6}  {says[:150]}")


def test_require_signature_serves_only_what_the_key_signed(
    bundle_repo: Path, tmp_path: Path, server_factory, publish_copy, signing_keys, capsys
) -> None:
    key, public, other_public = signing_keys
    repo = tmp_path / "repo"
    shutil.copytree(bundle_repo / BUNDLE / "1", repo / BUNDLE / "1")  # unsigned v1
    signed = publish_copy(repo, sign_key=key)  # v2
    assert (repo / BUNDLE / str(signed) / "MANIFEST.sig").is_file()
    server = server_factory(
        repo, poll_interval_s=0.0, metrics_port=None, public_key=public, require_signature=True
    )
    server.wait_ready()
    with server.admin(120) as admin:
        admin.wait_until_serving(60)
        states = {v.version: v for v in admin.bundle_status(BUNDLE).versions}
        assert states[signed].state == admin_pb2.VERSION_STATE_READY and states[signed].is_default

        unsigned = publish_copy(repo)  # v3
        other_folder = tmp_path / "other"
        other_key = other_folder / "key.pem"
        other_folder.mkdir()
        from recship.bundle.signature import generate_key_pair

        generate_key_pair(other_key, other_folder / "pub.pem")
        wrong_key = publish_copy(repo, sign_key=other_key)  # v4
        tampered = publish_copy(repo, sign_key=key)  # v5, then changed after signing
        folder = repo / BUNDLE / str(tampered)
        flip_byte("ranker.pt")(folder)
        rehash(folder, "ranker.pt")
        status = {v.version: v for v in admin.refresh_repository().bundles[0].versions}
    expected = {
        unsigned: "unsigned",
        wrong_key: "does not verify",
        tampered: "changed since signing: MANIFEST.json, ranker.pt",
    }
    for version, reason in expected.items():
        assert status[version].state == FAILED, status[version]
        assert reason in status[version].failure_reason, status[version].failure_reason
    for version, reason in {1: "unsigned", **expected}.items():
        folder = repo / BUNDLE / str(version)
        code, output = verify(capsys, str(folder), "--public-key", str(public))
        assert code != 0 and reason in " ".join(output.split()), output
    assert status[signed].is_default
    code, output = verify(capsys, str(repo / BUNDLE / str(signed)), "--public-key", str(public))
    assert code == 0 and "MANIFEST.sig verified" in output, output
    code, output = verify(
        capsys, str(repo / BUNDLE / str(signed)), "--public-key", str(other_public)
    )
    assert code != 0 and "does not verify" in output, output
