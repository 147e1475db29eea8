"""The admin API apart and authenticated; TLS and mTLS on both listeners.

The token: none or malformed -> UNAUTHENTICATED, wrong -> PERMISSION_DENIED, right -> the call
runs; the inference port neither serves nor describes BundleAdmin; a non-loopback admin
listener without a token is refused; a Unix-socket admin listener is mode 0600; TLS and mTLS
round trips work, plaintext to a TLS port fails cleanly, and `recship status` shows a
server's versions over TLS with the token.
"""

from __future__ import annotations

import stat
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from recship.base.errors import InvalidInput, PermissionDenied, Unauthenticated, Unavailable
from recship.protos.v1 import admin_pb2, admin_pb2_grpc
from recship.runtime.client import AdminClient, Query, RecshipClient
from recship.runtime.security import ClientTLS, ServerTLS, bearer_metadata, load_token
from recship.runtime.serve_cli import status_command
from recship.runtime.server import ServerConfig

pytestmark = pytest.mark.integration


def _services(channel: grpc.Channel, metadata=()) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = list(stub.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10))
    return {service.name for service in response.list_services_response.service}


def _describes(channel: grpc.Channel, symbol: str) -> bool:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
    (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    return response.HasField("file_descriptor_response")


def test_admin_calls_need_the_token(live_server, admin) -> None:
    target = live_server.admin_target
    assert target.startswith("127.0.0.1:") and target != live_server.target
    with AdminClient(target) as anonymous, pytest.raises(Unauthenticated, match="credentials"):
        anonymous.list_bundles()
    channel = grpc.insecure_channel(target)
    stub = admin_pb2_grpc.BundleAdminStub(channel)
    for header in ("Basic dXNlcjpwYXNz", "Bearer", "bearer " + live_server.admin_token):
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListBundles(admin_pb2.ListBundlesRequest(), metadata=(("authorization", header),))
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED, header
    twice = bearer_metadata(live_server.admin_token) * 2
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListBundles(admin_pb2.ListBundlesRequest(), metadata=twice)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    wrong = AdminClient(target, token="not-the-token-0123456789")
    with wrong, pytest.raises(PermissionDenied, match="not valid"):
        wrong.unload_version("movies", 1)
    # Refused calls changed nothing; with the token the call runs.
    (bundle,) = admin.list_bundles().bundles
    assert bundle.versions[0].state == admin_pb2.VERSION_STATE_READY
    assert admin.health() == "SERVING"
    # The admin listener's reflection is behind the token too, and describes BundleAdmin.
    with pytest.raises(grpc.RpcError) as caught:
        _services(channel)
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
    listed = _services(channel, bearer_metadata(live_server.admin_token))
    assert "recship.v1.BundleAdmin" in listed and "recship.v1.Recommender" not in listed
    channel.close()


def test_the_inference_port_has_no_admin_api(live_server) -> None:
    channel = grpc.insecure_channel(live_server.target)
    stub = admin_pb2_grpc.BundleAdminStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListBundles(admin_pb2.ListBundlesRequest(), timeout=10)
    assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "recship.v1.BundleAdmin" not in _services(channel)
    assert not _describes(channel, "recship.v1.BundleAdmin")
    assert _describes(channel, "recship.v1.Recommender")
    channel.close()


def test_secure_defaults_for_the_admin_listener(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="without a token"):
        ServerConfig(repo=tmp_path, admin_host="0.0.0.0")
    with pytest.raises(InvalidInput, match="16 to 4096 characters"):
        ServerConfig(repo=tmp_path, admin_token="short")
    with pytest.raises(InvalidInput, match="needs --public-key"):
        ServerConfig(repo=tmp_path, require_signature=True)
    ServerConfig(repo=tmp_path, admin_host="0.0.0.0", admin_token="x" * 32)  # allowed
    ServerConfig(repo=tmp_path, admin_host="::1")  # loopback: no token needed
    assert "x" * 32 not in repr(ServerConfig(repo=tmp_path, admin_token="x" * 32))
    token_file = tmp_path / "token"
    token_file.write_text("  y" * 1 + "y" * 20 + "\n")
    assert load_token(token_file) == "y" * 21
    assert load_token(None, environ={"RECSHIP_ADMIN_TOKEN": "z" * 20}) == "z" * 20
    assert load_token(None, environ={}) is None


def test_admin_on_a_unix_socket(bundle_repo: Path, tmp_path: Path, server_factory) -> None:
    socket = tmp_path / "admin.sock"
    server = server_factory(bundle_repo, admin_socket=socket, admin_token=None, metrics_port=None)
    server.wait_ready()
    assert server.admin_target == f"unix:{socket.resolve()}"
    assert stat.S_ISSOCK(socket.lstat().st_mode)
    assert stat.S_IMODE(socket.lstat().st_mode) == 0o600
    with AdminClient(server.admin_target) as admin:
        admin.wait_until_serving(60)
        assert admin.bundle_status("movies").versions[0].is_default


def test_tls_round_trip_and_plaintext_refused(
    bundle_repo: Path, server_factory, tls_files, make_user
) -> None:
    tls = ServerTLS(tls_files.server_cert, tls_files.server_key)
    server = server_factory(bundle_repo, tls=tls, metrics_port=None)
    server.wait_ready()
    query = [Query(make_user(4, 0.5))]
    trusted = ClientTLS(ca=tls_files.ca)
    with RecshipClient(server.target, tls=trusted, timeout=20) as client:
        assert client.recommend("movies", query, 10, 3).served_by.version == 1
    with server.admin(tls=trusted) as admin:
        assert admin.health() == "SERVING"
    with RecshipClient(server.target, timeout=5) as plaintext, pytest.raises(Unavailable):
        plaintext.recommend("movies", query, 10, 3)
    untrusted = ClientTLS(ca=tls_files.other_ca)
    with (
        RecshipClient(server.target, tls=untrusted, timeout=5) as client,
        pytest.raises(Unavailable),
    ):
        client.recommend("movies", query, 10, 3)

    runner = CliRunner()
    result = runner.invoke(
        status_command,
        ["--server", server.admin_target, "--tls-ca", str(tls_files.ca)],
        env={"RECSHIP_ADMIN_TOKEN": server.admin_token},
    )
    assert result.exit_code == 0, result.output
    assert "READY" in result.output and "SERVING" in result.output and "movies" in result.output


def test_mtls_requires_a_client_certificate(
    bundle_repo: Path, server_factory, tls_files, make_user
) -> None:
    tls = ServerTLS(tls_files.server_cert, tls_files.server_key, client_ca=tls_files.ca)
    server = server_factory(bundle_repo, tls=tls, metrics_port=None)
    server.wait_ready()
    query = [Query(make_user(5, 0.5))]
    with_cert = ClientTLS(ca=tls_files.ca, cert=tls_files.client_cert, key=tls_files.client_key)
    with RecshipClient(server.target, tls=with_cert, timeout=20) as client:
        assert client.recommend("movies", query, 10, 3).results[0]
    with server.admin(tls=with_cert) as admin:
        assert admin.list_bundles().bundles[0].name == "movies"
    without = ClientTLS(ca=tls_files.ca)
    with RecshipClient(server.target, tls=without, timeout=5) as client, pytest.raises(Unavailable):
        client.recommend("movies", query, 10, 3)
    with server.admin(tls=without, timeout=5) as admin, pytest.raises(Unavailable):
        admin.list_bundles()
