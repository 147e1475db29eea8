"""Transport security of a recship server and its clients: TLS / mTLS and the admin token.

- `ServerTLS` and `ClientTLS` hold the PEM files of one side and build gRPC credentials; the
  server applies its `ServerTLS` to the inference and the admin listener alike, and with a
  client CA it requires and checks client certificates (mTLS).
- The admin API is authenticated with a bearer token (`authorization: Bearer <token>`), read
  from a file or the `RECSHIP_ADMIN_TOKEN` environment variable (`load_token`) and checked by
  `BearerTokenInterceptor` in constant time (`hmac.compare_digest`): no or malformed
  credentials -> UNAUTHENTICATED, a wrong token -> PERMISSION_DENIED.
- Secure defaults are decided here (`check_admin_exposure`): without a token the admin
  listener may only be a loopback address or a Unix socket.

Imported by the server, the clients and the CLI; imports nothing of recship but base.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from recship.base.errors import InvalidInput

logger = logging.getLogger(__name__)

TOKEN_ENV = "RECSHIP_ADMIN_TOKEN"
AUTHORIZATION = "authorization"
_BEARER = "Bearer "
# A token is printable ASCII without spaces (a valid header value) of a length that a guess
# cannot reach, e.g. `openssl rand -hex 32`.
MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 4096
_MAX_PEM_BYTES = 1 << 20


def _read_pem(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise InvalidInput(f"{what} {path}: cannot be read ({error.strerror})") from None
    if len(data) > _MAX_PEM_BYTES or b"-----BEGIN" not in data:
        raise InvalidInput(f"{what} {path}: not a PEM file")
    return data


@dataclass(frozen=True)
class ServerTLS:
    """The server's certificate chain and key, and optionally the CA its clients must present.

    Attributes:
        cert: PEM certificate chain of the server (its SAN must name the address clients use).
        key: PEM private key of `cert`.
        client_ca: PEM CA bundle; when set, clients must present a certificate it signed (mTLS).
    """

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials (the files are read now).

        Raises:
            InvalidInput: a file cannot be read or is not PEM.
        """
        chain = _read_pem(self.cert, "--tls-cert")
        key = _read_pem(self.key, "--tls-key")
        client_ca = None if self.client_ca is None else _read_pem(self.client_ca, "--tls-client-ca")
        return grpc.ssl_server_credentials(
            [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )


@dataclass(frozen=True)
class ClientTLS:
    """How a client reaches a TLS server.

    Attributes:
        ca: PEM CA bundle that signed the server's certificate; None trusts the system's roots.
        cert: PEM client certificate, for servers that require one (mTLS).
        key: PEM private key of `cert`.
        server_name: the name to check the server's certificate against, when it differs from
            the host of the target (e.g. connecting by IP to a certificate for a DNS name).
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise InvalidInput("--tls-cert and --tls-key go together (a client certificate)")

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials (the files are read now)."""
        return grpc.ssl_channel_credentials(
            root_certificates=None if self.ca is None else _read_pem(self.ca, "--tls-ca"),
            private_key=None if self.key is None else _read_pem(self.key, "--tls-key"),
            certificate_chain=None if self.cert is None else _read_pem(self.cert, "--tls-cert"),
        )

    def options(self) -> list[tuple[str, Any]]:
        """Channel options (the server name override)."""
        if self.server_name is None:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def open_channel(
    target: str, tls: ClientTLS | None, options: list[tuple[str, Any]] | None = None
) -> grpc.Channel:
    """A blocking channel to `target` ("host:port" or "unix:/path"), TLS when `tls` is set."""
    options = list(options or [])
    if tls is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, tls.credentials(), options=options + tls.options())


# -- the admin token ---------------------------------------------------------------------------
def check_token(token: str, source: str) -> str:
    """Returns `token` if it can be a bearer token, else raises InvalidInput naming `source`."""
    if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
        raise InvalidInput(
            f"{source}: the admin token must be {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} "
            f"characters (found {len(token)}); e.g. `openssl rand -hex 32`"
        )
    if not token.isascii() or not token.isprintable() or " " in token:
        raise InvalidInput(f"{source}: the admin token must be printable ASCII without spaces")
    return token


def load_token(path: Path | None, *, environ: dict[str, str] | None = None) -> str | None:
    """The admin token from `path` (surrounding whitespace stripped) or from $RECSHIP_ADMIN_TOKEN.

    A token file readable by group or others is used but warned about.

    Returns:
        The token, or None when neither a file nor the variable gives one.

    Raises:
        InvalidInput: the file cannot be read, or the token is malformed (`check_token`).
    """
    if path is not None:
        try:
            info = os.stat(path)
            text = Path(path).read_text(encoding="ascii", errors="replace")
        except OSError as error:
            raise InvalidInput(f"--admin-token-file {path}: {error.strerror}") from None
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("admin token file %s is readable by others; chmod 600 it", path)
        return check_token(text.strip(), f"--admin-token-file {path}")
    value = (os.environ if environ is None else environ).get(TOKEN_ENV)
    if value is None or not value.strip():
        return None
    return check_token(value.strip(), f"${TOKEN_ENV}")


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token` (empty without one)."""
    return () if token is None else ((AUTHORIZATION, _BEARER + token),)


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1)."""
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_local_target(target: str) -> bool:
    """True for a "unix:" target or a "host:port" one whose host is loopback."""
    if target.startswith("unix:"):
        return True
    host, _, _ = target.rpartition(":")
    return is_loopback(host)


def check_admin_exposure(
    host: str, socket: Path | None, token: str | None, tls: ServerTLS | None
) -> None:
    """The secure default for the admin listener.

    Without a token the admin API answers anyone who can connect, so it may then only listen
    on a loopback address or a Unix socket (created mode 0600). A token on a non-loopback
    listener without TLS travels in clear text: allowed (e.g. behind a mesh that terminates
    TLS) but logged as a warning.

    Raises:
        InvalidInput: a non-loopback admin listener without a token.
    """
    if socket is not None:
        return
    if not is_loopback(host):
        if token is None:
            raise InvalidInput(
                f"refusing to serve the admin API on {host} without a token: give "
                f"--admin-token-file (or ${TOKEN_ENV}), or keep --admin-host on loopback"
            )
        if tls is None:
            logger.warning(
                "the admin API on %s is not TLS-protected: its token travels in clear text "
                "(give --tls-cert/--tls-key)",
                host,
            )


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call that does not carry `authorization: Bearer <token>`.

    No `authorization` header, several, or one that is not "Bearer <token>" -> UNAUTHENTICATED;
    a well-formed header with another token -> PERMISSION_DENIED. The comparison takes the same
    time whatever the token sent (`hmac.compare_digest`). The call is refused before its
    request is deserialized and before any handler (or other interceptor) runs; refusals are
    reported to `observe` like other calls (method, code, seconds).
    """

    def __init__(
        self, token: str, observe: Callable[[str, grpc.StatusCode, float], None] | None = None
    ) -> None:
        self._expected = (_BEARER + check_token(token, "admin token")).encode("ascii")
        self._observe = observe

    def _refusal(self, metadata: Any) -> tuple[grpc.StatusCode, str] | None:
        values = [value for key, value in (metadata or ()) if key.lower() == AUTHORIZATION]
        if not values:
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "admin calls need credentials: send 'authorization: Bearer <token>'",
            )
        if len(values) > 1 or not isinstance(values[0], str) or not values[0].startswith(_BEARER):
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "malformed credentials: send one 'authorization: Bearer <token>'",
            )
        sent = values[0].encode("utf-8", errors="replace")
        if not hmac.compare_digest(sent, self._expected):
            return grpc.StatusCode.PERMISSION_DENIED, "the admin token is not valid"
        return None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        refusal = self._refusal(handler_call_details.invocation_metadata)
        if refusal is None:
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        code, message = refusal
        method = handler_call_details.method.lstrip("/")
        started = time.perf_counter()
        observe = self._observe

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
            if observe is not None:
                observe(method, code, time.perf_counter() - started)
            await context.abort(code, message)

        async def deny_stream(request: Any, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
            await deny(request, context)
            yield  # pragma: no cover - abort raised above

        # Requests are not deserialized (no deserializer): a refused caller's bytes are not read.
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(deny)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(deny_stream)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(deny)
        return grpc.stream_stream_rpc_method_handler(deny_stream)
