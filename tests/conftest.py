"""Shared pytest set-up: GPU marker handling, real training runs, one real bundle, live servers.

- `train_synthetic` / `trained_runs`: real TorchRec training on small synthetic data
  (`recship.cli.pipeline`, the recipe `recship demo` and the benchmarks use too).
- `bundle_repo`: one bundle trained and packaged once per session, under the session's temp
  folder, shared by the serving and integration tests; `publish_copy` republishes its files as
  the next version in a second.
- `live_server` / `client` / `admin`: one server over it for the session; `server_factory`
  starts more. A server runs its own event loop on a background thread and listens on free
  ports on 127.0.0.1 (inference, and admin behind `ADMIN_TOKEN`); tests talk to it over real
  gRPC channels, like any client (`ServerThread.admin()` opens an authenticated admin client).
- `tls_files`: a throwaway CA, a server certificate for 127.0.0.1/localhost and a client
  certificate, made with `cryptography`.
- `reference`: the packaged bundle called directly (entry points, index, item table).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

# Set for a test re-run in a fresh interpreter (`own_process`): the session bundle's folder.
BUNDLE_ROOT_VARIABLE = "RECSHIP_TEST_BUNDLE_ROOT"
# The admin token of every test server (tests of the token itself use others).
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
# Small synthetic data the packaging tests train on (seconds per model on 2 cores).
PACKAGING_DATA = {"num_users": 400, "num_items": 300, "interactions_per_user": 12}


def synthetic_folder(root: Path, **options: int) -> Path:
    """Synthetic data written as a MovieLens folder under `root` (once per options): read back
    through the built-in feature spec, so it has raw ids and fitted transforms to package."""
    from recship.trainer.data.movielens import write_movielens
    from recship.trainer.data.synthetic import generate

    name = "synthetic-" + "-".join(f"{k}{v}" for k, v in sorted(options.items()))
    folder = root / name
    with open(root / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "u.data").is_file():
            write_movielens(generate(**options), folder)
    return folder


def _train_synthetic(
    out: Path, model: str, nproc: int, retrieval: Path | None = None, **data: int
) -> Path:
    """Trains `model` on synthetic data with real TorchRec ranks; returns the output folder.

    A DLRM ranks the candidates of `retrieval` (a two-tower output on the same data), or,
    without one, is trained on the rated pairs (`--examples labelled`)."""
    from recship.cli.pipeline import train_model

    folder = synthetic_folder(out.parent, **{**PACKAGING_DATA, **data})
    ranking: dict[str, str] = {}
    if model == "dlrm":
        ranking = {"retrieval": str(retrieval)} if retrieval else {"examples": "labelled"}
    return train_model(out, model, str(folder), {}, nproc=nproc, epochs=3, batch_size=64, **ranking)


@pytest.fixture(scope="session")
def synthetic_data() -> Callable[..., Path]:
    """`synthetic_data(root, **options) -> folder`: synthetic data as a MovieLens folder."""
    return synthetic_folder


@pytest.fixture(scope="session")
def train_synthetic() -> Callable[..., Path]:
    """`train(out, model, nproc, **data_overrides) -> out`: real training on synthetic data."""
    return _train_synthetic


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(two-tower output written by 2 ranks, DLRM output written by 1 rank) on the same items."""
    root = tmp_path_factory.mktemp("runs")
    retrieval = _train_synthetic(root / "tt", "two-tower", 2)
    return retrieval, _train_synthetic(root / "dlrm", "dlrm", 1, retrieval)


BUNDLE = "movies"
SYNTHETIC = {"num_users": 300, "num_items": 200, "interactions_per_user": 8}
# The session bundle's query features (all query-side sparse features of the synthetic schema).
QUERY_FEATURES = ("user_id", "user_age_bucket", "user_gender", "user_occupation", "user_zip_prefix")


def build_bundle(root: Path) -> Path:
    """Trains two tiny models and packages them into `<root>/repo` (once per folder).

    Returns:
        The repository root (`<root>/repo`, holding `movies/1`).
    """
    from recship.cli.pipeline import SMOKE_GATE, package_runs, train_models

    root.mkdir(parents=True, exist_ok=True)
    repo = root / "repo"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (repo / BUNDLE / "1" / "MANIFEST.json").is_file():
            return repo
        # Synthetic data written as a MovieLens folder: the bundle goes through the built-in
        # feature spec like any team's data (raw user and item ids, fitted vocabularies).
        data = synthetic_folder(root, **SYNTHETIC)
        # One epoch on 300 users is enough to serve; the quality gate is the packager's concern.
        runs = train_models(root, str(data), {}, epochs=1, embedding_dim=8)
        package_runs(runs, repo, BUNDLE, thresholds=SMOKE_GATE)
    return repo


def _publish_copy(
    repo: Path,
    source: int = 1,
    *,
    golden_offset: float = 0.0,
    sign_key: Path | None = None,
    edit: Callable[[Path], None] | None = None,
) -> int:
    """Publishes the files of `movies/<source>` again as the bundle's next version.

    The copy goes through `BundleWriter` like any packaged bundle (staging folder, checksums,
    MANIFEST.json last, rename), so it takes a second, not a training run. With a non-zero
    `golden_offset`, golden.pt is rewritten first with every recorded output shifted by that
    much: the manifest's checksums then match the changed file, so the version validates and
    loads but fails its golden self-test. With `sign_key` the copy is signed (MANIFEST.sig).
    `edit(staging_folder)` may change the copied files first (their checksums then match too).

    Returns:
        The published version number.
    """
    from recship.bundle.golden import GoldenRecord, read_golden, write_golden
    from recship.bundle.layout import MANIFEST_FILENAME
    from recship.bundle.manifest import read_manifest
    from recship.bundle.writer import republish

    golden_file = read_manifest(repo / BUNDLE / str(source) / MANIFEST_FILENAME).golden.file

    def change(folder: Path) -> None:
        if golden_offset:
            golden_path = folder / golden_file
            golden = read_golden(golden_path)
            shifted = {
                name: GoldenRecord(record.inputs, record.output + golden_offset)
                for name, record in golden.records.items()
            }
            write_golden(golden_path, shifted, golden.atol, golden.rtol, golden.raw)
        if edit is not None:
            edit(folder)

    sign = None
    if sign_key is not None:
        from recship.bundle.signature import sign_version

        def sign(folder: Path) -> None:
            sign_version(folder, sign_key)

    return republish(repo, BUNDLE, source, edit=change, sign=sign).version


@pytest.fixture(scope="session")
def publish_copy() -> Callable[..., int]:
    """`publish_copy(repo, source=1, *, golden_offset=0.0, sign_key=None, edit=None) ->
    version` (see `_publish_copy`)."""
    return _publish_copy


@pytest.fixture(scope="session")
def bundle_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with one published bundle version, `movies/1`; a test re-run in a fresh
    interpreter is given the suite's through `BUNDLE_ROOT_VARIABLE`."""
    given = os.environ.get(BUNDLE_ROOT_VARIABLE)
    return build_bundle(
        Path(given) if given else tmp_path_factory.getbasetemp() / "recship-serving-bundle"
    )


@dataclass(frozen=True)
class OwnProcess:
    """Re-runs the requesting test in a fresh interpreter on the session's bundle: for a
    measurement that must not share the suite's process (its threads, heap and lock)."""

    nodeid: str
    bundle_root: Path

    @property
    def inside(self) -> bool:
        """Whether this is the re-run (then the test measures)."""
        return os.environ.get(BUNDLE_ROOT_VARIABLE) is not None

    def run(self) -> str:
        """Runs the test alone; fails with it; returns its output."""
        root = Path(__file__).resolve().parent.parent
        done = subprocess.run(
            [
                sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
                "-p", "no:warnings", self.nodeid,
            ],
            cwd=root, env={**os.environ, BUNDLE_ROOT_VARIABLE: str(self.bundle_root)},
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
        return done.stdout[-4000:]


@pytest.fixture
def own_process(request: pytest.FixtureRequest, bundle_repo: Path) -> OwnProcess:
    """`own_process.inside` / `own_process.run()`: see `OwnProcess`."""
    return OwnProcess(request.node.nodeid, bundle_repo.parent)


class ServerThread:
    """A recship server on its own event loop thread; `call` runs coroutines on that loop."""

    def __init__(self, config: Any) -> None:
        from recship.runtime.server import build_server

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

        async def build() -> Any:
            server, _ = build_server(config)
            await server.start()
            return server

        self.server = self.call(build())
        self.port: int = self.server.port
        self.target = f"127.0.0.1:{self.port}"
        self.admin_target: str | None = self.server.admin_address
        self.admin_token: str | None = config.admin_token

    def admin(self, timeout: float = 30.0, **options: Any) -> Any:
        """An `AdminClient` of this server's admin listener, with its token."""
        from recship.runtime.client import AdminClient

        options.setdefault("token", self.admin_token)
        return AdminClient(self.admin_target, timeout=timeout, **options)

    def call(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def wait_ready(self, timeout: float = 120.0) -> None:
        self.call(self.server.wait_ready(timeout), timeout + 5)

    @property
    def metrics_port(self) -> int | None:
        return self.server.metrics_port

    def stop(self, grace: float = 5.0) -> None:
        """Stops the server and its loop; a second call does nothing."""
        if self.loop.is_closed():
            return
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def server_config(repo: Path, **overrides: Any) -> Any:
    from recship.runtime.server import ServerConfig

    # Batches far smaller than the default, so that ordinary test requests get split.
    values: dict[str, Any] = {
        "repo": repo,
        "port": 0,
        "metrics_port": 0,
        "admin_port": 0,
        "admin_token": ADMIN_TOKEN,
        "max_delay_ms": 5.0,
        "max_batch_size": 256,
    }
    values.update(overrides)
    return ServerConfig(**values)


@pytest.fixture(scope="session")
def live_server(bundle_repo: Path) -> Iterator[ServerThread]:
    """One server over the session bundle, SERVING, shared by the whole session."""
    server = ServerThread(server_config(bundle_repo))
    server.wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(live_server: ServerThread) -> Iterator[Any]:
    from recship.runtime.client import RecshipClient

    with RecshipClient(live_server.target, timeout=30) as connected:
        connected.wait_until_serving(60)
        yield connected


@pytest.fixture(scope="session")
def admin(live_server: ServerThread) -> Iterator[Any]:
    """An authenticated `AdminClient` of the session server."""
    with live_server.admin() as connected:
        yield connected


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a throwaway PKI: `ca` signed `server` (127.0.0.1, localhost) and `client`."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed none of these


def _write_pki(folder: Path) -> TlsFiles:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def certificate(subject, key, issuer, issuer_key, *, ca=False, extensions=()):  # type: ignore[no-untyped-def]
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write(path: Path, cert=None, key=None) -> Path:  # type: ignore[no-untyped-def]
        if cert is not None:
            path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        else:
            path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        return path

    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = certificate(name("recship test CA"), ca_key, name("recship test CA"), ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    server = certificate(
        name("localhost"),
        server_key,
        ca.subject,
        ca_key,
        extensions=(san, x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])),
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = certificate(
        name("recship test client"),
        client_key,
        ca.subject,
        ca_key,
        extensions=(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),),
    )
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = certificate(name("another CA"), other_key, name("another CA"), other_key, ca=True)
    return TlsFiles(
        ca=write(folder / "ca.pem", ca),
        server_cert=write(folder / "server.pem", server),
        server_key=write(folder / "server.key", key=server_key),
        client_cert=write(folder / "client.pem", client),
        client_key=write(folder / "client.key", key=client_key),
        other_ca=write(folder / "other-ca.pem", other),
    )


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throwaway CA with a server certificate for 127.0.0.1/localhost and a client one."""
    return _write_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(private key, its public key, another public key) for signing bundles."""
    from recship.bundle.signature import generate_key_pair

    folder = tmp_path_factory.mktemp("keys")
    generate_key_pair(folder / "key.pem", folder / "pub.pem")
    generate_key_pair(folder / "other.pem", folder / "other.pub.pem")
    return folder / "key.pem", folder / "pub.pem", folder / "other.pub.pem"


@dataclass(frozen=True)
class Reference:
    """The packaged bundle called directly: entry points, index, item table and the bundle's
    transforms applied by hand (not by the server's codec)."""

    path: Path
    query_tower: Any
    ranker: Any
    index: Any
    items: Any
    item_sparse: tuple[str, ...]
    transforms: Any

    def item_ids(self, indices: Any) -> np.ndarray:
        """The catalogue's raw item ids (text) of item indices."""
        vocabulary = self.transforms.features[self.transforms.item_key].vocabulary
        return np.array(vocabulary.values.to_pylist(), dtype=object)[np.asarray(indices)]

    def item_indices(self, ids: list[str]) -> np.ndarray:
        vocabulary = self.transforms.features[self.transforms.item_key].vocabulary
        return vocabulary.lookup(pa.array([str(i) for i in ids]))

    def encoded(self, users: list[dict[str, Any]], name: str) -> np.ndarray:
        """One single-valued feature of raw users, encoded by its transform."""
        transform = self.transforms.features[name]
        values = [user[name] for user in users]
        if transform.kind in ("categorical", "hashed"):
            values = [str(v) for v in values]
        ids, _ = transform.encode_ids(pa.array(values))
        return ids

    def activity(self, users: list[dict[str, Any]]) -> np.ndarray:
        transform = self.transforms.features["user_log_activity"]
        return transform.encode_dense(pa.array([float(u["user_log_activity"]) for u in users]))

    def embed(self, users: list[dict[str, Any]]) -> np.ndarray:
        values = torch.from_numpy(np.concatenate([self.encoded(users, n) for n in QUERY_FEATURES]))
        lengths = torch.ones(len(users) * len(QUERY_FEATURES), dtype=torch.int32)
        with torch.no_grad():
            return self.query_tower(values, lengths).detach().numpy()

    def retrieve(self, users: list[dict[str, Any]], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, raw item ids) of the top k."""
        from recship.bundle.index import search

        scores, ids = search(self.index, self.embed(users), k)
        return scores, self.item_ids(ids)

    def rank(self, user: dict[str, Any], item_ids: list[str]) -> np.ndarray:
        """Probabilities of raw `item_ids` for one raw user (features joined by hand)."""
        ids = self.item_indices(item_ids)
        count = ids.size
        values, lengths = [], []
        for name in QUERY_FEATURES:
            values.append(np.repeat(self.encoded([user], name), count))
            lengths.append(np.ones(count, dtype=np.int32))
        for name in self.item_sparse:
            column = self.items.sparse[name]
            for item in ids:
                bag = column.values[column.offsets[item] : column.offsets[item + 1]]
                values.append(bag.astype(np.int64))
            lengths.append(np.diff(column.offsets)[ids].astype(np.int32))
        dense_rows = np.concatenate(
            [np.tile(self.activity([user]), (count, 1)), self.items.dense[ids]], axis=1
        )
        with torch.no_grad():
            logits = self.ranker(
                torch.from_numpy(dense_rows.astype(np.float32)),
                torch.from_numpy(np.concatenate(values)),
                torch.from_numpy(np.concatenate(lengths)),
            )
        return torch.sigmoid(logits.detach()).numpy()


@pytest.fixture(scope="session")
def reference(bundle_repo: Path) -> Reference:
    from recship.bundle.entrypoints import load_entry_point
    from recship.bundle.index import read_index
    from recship.bundle.item_features import read_item_features
    from recship.bundle.manifest import read_manifest
    from recship.bundle.transforms import read_transforms

    path = bundle_repo / BUNDLE / "1"
    manifest = read_manifest(path / "MANIFEST.json")
    entries = {e.name: e for e in manifest.entry_points}
    assert tuple(entries["query_tower"].sparse_feature_order) == QUERY_FEATURES
    items, sparse_names, _ = read_item_features(path / manifest.item_features.file)
    ranker_order = tuple(entries["ranker"].sparse_feature_order)
    assert ranker_order == QUERY_FEATURES + tuple(sparse_names)
    return Reference(
        path,
        load_entry_point(path / entries["query_tower"].file),
        load_entry_point(path / entries["ranker"].file),
        read_index(path / manifest.index.file, manifest.index),
        items,
        tuple(sparse_names),
        read_transforms(path),
    )


# Ages inside each of the synthetic data's 7 age buckets (as `write_movielens` writes them).
_AGES = (15, 21, 30, 40, 47, 52, 60)


def user(user_id: int, activity: float = 0.25) -> dict[str, Any]:
    """Raw query features of a synthetic user (deterministic per id): its key, as the data
    writes it (`write_movielens`: dense id + 1), and values for every other query feature,
    which override what the bundle stores for the user."""
    prefix = user_id % 11
    return {
        "user_id": user_id + 1,
        "user_age_bucket": _AGES[user_id % 7],
        "user_gender": f"gender_{user_id % 2}",
        "user_occupation": f"occupation_{user_id % 21:03d}",
        "user_zip_prefix": f"{prefix}0000" if prefix < 10 else "X0X0X",
        "user_log_activity": activity,
    }


@pytest.fixture(scope="session")
def make_user():
    """`make_user(user_id, activity=0.25) -> features`: raw query features of one user."""
    return user


@pytest.fixture
def server_factory() -> Iterator[Any]:
    """`server_factory(repo, **config)`: starts a server for one test; stopped afterwards."""
    started: list[ServerThread] = []

    def start(repo: Path, **overrides: Any) -> ServerThread:
        server = ServerThread(server_config(repo, **overrides))
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _nvidia_gpu_present() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True, check=False).returncode == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests, with a reason, on machines without an NVIDIA GPU."""
    if _nvidia_gpu_present():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (nvidia-smi -L lists none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
