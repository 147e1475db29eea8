"""Health follows readiness, failed versions are reported and never serve, admin RPCs act."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from recship.base.errors import Unavailable
from recship.protos.v1 import admin_pb2
from recship.runtime.client import Query, RecshipClient
from recship.runtime.security import bearer_metadata

pytestmark = pytest.mark.integration


def publish_copy(source: Path, repo: Path, version: int, corrupt: bool = False) -> None:
    """Publishes `source` (a version folder) as `repo/movies/<version>`, MANIFEST last."""
    staging = repo / "movies" / f".staging-{version}"
    shutil.copytree(source, staging)
    manifest_path = staging / "MANIFEST.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["version"] = str(version)
    manifest_path.unlink()
    if corrupt:
        with open(staging / "ranker.pt", "r+b") as handle:
            handle.seek(100)
            handle.write(b"\x00\x01\x02\x03")
    (staging / "MANIFEST.json").write_text(json.dumps(manifest))
    staging.rename(repo / "movies" / str(version))


@pytest.fixture
def corrupt_repo(bundle_repo: Path, tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "movies").mkdir(parents=True)
    publish_copy(bundle_repo / "movies" / "1", repo, 1, corrupt=True)
    return repo


def test_not_serving_until_a_version_is_ready(corrupt_repo, bundle_repo, make_user, server_factory):
    server = server_factory(corrupt_repo)
    server.wait_ready()
    with RecshipClient(server.target, timeout=10) as client, server.admin(10) as admin:
        assert client.health() == "NOT_SERVING"
        assert client.health("recship.v1.Recommender") == "NOT_SERVING"
        assert admin.health() == "NOT_SERVING"
        with pytest.raises(Exception, match="UNAVAILABLE: bundle 'movies' has no version ready"):
            client.retrieve("movies", [Query(make_user(1, 0.0))], 3)
        status = admin.list_bundles("movies").bundles[0]
        (v1,) = status.versions
        assert v1.state == admin_pb2.VERSION_STATE_FAILED
        assert "ranker.pt" in v1.failure_reason and "failed its file check" in v1.failure_reason
        # Waiting for a server whose only version FAILED answers at once, with the reason.
        started = time.monotonic()
        with pytest.raises(Unavailable, match=r"will not serve: movies v1 FAILED: .*ranker\.pt"):
            admin.wait_until_serving(timeout=60)
        assert time.monotonic() - started < 10

        publish_copy(bundle_repo / "movies" / "1", corrupt_repo, 2)
        refreshed = admin.refresh_repository()
        states = {v.version: v.state for v in refreshed.bundles[0].versions}
        assert states == {2: admin_pb2.VERSION_STATE_READY, 1: admin_pb2.VERSION_STATE_FAILED}
        assert client.health() == "SERVING"
        response = client.retrieve("movies", [Query(make_user(1, 0.0))], 3)
        assert response.served_by.version == 2
        listed = admin.list_bundles().bundles[0]
        v2 = listed.versions[0]
        assert (v2.version, v2.is_default, v2.replicas, list(v2.devices)) == (2, True, 1, ["cpu"])
        assert v2.manifest.num_items == 200 and v2.manifest.quantization == "int8"
        assert "packaged/auc" in v2.manifest.quality
        assert v2.ready_at.seconds > 0


def test_admin_labels_unload_and_policy(bundle_repo, tmp_path, make_user, server_factory) -> None:
    repo = tmp_path / "repo"
    (repo / "movies").mkdir(parents=True)
    publish_copy(bundle_repo / "movies" / "1", repo, 1)
    publish_copy(bundle_repo / "movies" / "1", repo, 2)
    server = server_factory(repo)
    server.wait_ready()
    query = [Query(make_user(2, 0.0))]
    with RecshipClient(server.target, timeout=30) as client, server.admin() as admin_client:
        admin = admin_client.admin  # the raw stub, with the token on every call
        token = bearer_metadata(server.admin_token)
        assert client.retrieve("movies", query, 3).served_by.version == 2
        states = {v.version: v.state for v in admin_client.list_bundles().bundles[0].versions}
        assert states[1] == admin_pb2.VERSION_STATE_NEW
        with pytest.raises(grpc.RpcError) as caught:
            admin.SetLabel(
                admin_pb2.SetLabelRequest(bundle="movies", label="old", version=1), metadata=token
            )
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION

        loaded = admin_client.load_version("movies", 1)
        assert loaded.state == admin_pb2.VERSION_STATE_READY
        admin_client.set_label("movies", "old", 1)
        assert client.retrieve("movies", query, 3, label="old").served_by.version == 1
        assert client.retrieve("movies", query, 3).served_by.version == 2

        unloaded = admin_client.unload_version("movies", 1)
        assert unloaded.state == admin_pb2.VERSION_STATE_UNLOADED
        with pytest.raises(Exception, match="NOT_FOUND"):
            client.retrieve("movies", query, 3, version=1)

        pinned = admin_client.set_version_policy(
            "movies", admin_pb2.VersionPolicy(pinned=admin_pb2.PinnedPolicy(versions=[1]))
        )
        states = {v.version: v.state for v in pinned.versions}
        assert states == {1: admin_pb2.VERSION_STATE_READY, 2: admin_pb2.VERSION_STATE_UNLOADED}
        assert client.retrieve("movies", query, 3).served_by.version == 1
        with pytest.raises(grpc.RpcError) as caught:
            admin.SetLabel(
                admin_pb2.SetLabelRequest(bundle="movies", label="b d", version=1), metadata=token
            )
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_an_unknown_bundle_fails_the_start(bundle_repo, server_factory) -> None:
    from recship.base.errors import NotFound

    server = server_factory(bundle_repo, bundles=("books",))
    with pytest.raises(NotFound, match="books"):
        server.wait_ready()
    channel = grpc.insecure_channel(server.target)
    from grpc_health.v1 import health_pb2_grpc

    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
    channel.close()
