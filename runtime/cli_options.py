"""The connection flags every client command shares: TLS (`--tls*`) and the admin token.

`recship query`, `status`, `rollout` and `bench` take the same options, stated once here:

    --tls                 use TLS, trusting the system's CA roots
    --tls-ca PATH         use TLS, trusting this CA bundle (a private CA)
    --tls-cert/--tls-key  present this client certificate (servers with --tls-client-ca)
    --tls-server-name N   check the server's certificate for N instead of the target's host
    --admin-token-file F  the admin token (else $RECSHIP_ADMIN_TOKEN); admin commands only
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from recship.runtime.security import ClientTLS, load_token

F = TypeVar("F", bound=Callable[..., Any])

_PATH = click.Path(path_type=Path, dir_okay=False)


def tls_client_options(command: F) -> F:
    """Adds --tls, --tls-ca, --tls-cert, --tls-key and --tls-server-name to a command."""
    options = [
        click.option("--tls", "tls", is_flag=True, help="Use TLS (system CA roots)."),
        click.option("--tls-ca", type=_PATH, default=None, help="Use TLS, trusting this CA (PEM)."),
        click.option(
            "--tls-cert",
            type=_PATH,
            default=None,
            help="Client certificate (PEM) for servers that require one (mTLS).",
        ),
        click.option("--tls-key", type=_PATH, default=None, help="Private key of --tls-cert."),
        click.option(
            "--tls-server-name",
            default=None,
            help="Name the server's certificate must hold, if not the target's host.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def admin_token_option(command: F) -> F:
    """Adds --admin-token-file to a command."""
    return click.option(
        "--admin-token-file",
        type=_PATH,
        default=None,
        help="File holding the server's admin token [default: $RECSHIP_ADMIN_TOKEN].",
    )(command)


def client_tls(options: dict[str, Any]) -> ClientTLS | None:
    """The `ClientTLS` the --tls* options of a command ask for (None: plaintext); pops them."""
    use_tls = options.pop("tls", False)
    ca = options.pop("tls_ca", None)
    cert = options.pop("tls_cert", None)
    key = options.pop("tls_key", None)
    server_name = options.pop("tls_server_name", None)
    if not (use_tls or ca or cert or key or server_name):
        return None
    return ClientTLS(ca=ca, cert=cert, key=key, server_name=server_name)


def admin_token(options: dict[str, Any]) -> str | None:
    """The token --admin-token-file (or $RECSHIP_ADMIN_TOKEN) gives; pops the option."""
    return load_token(options.pop("admin_token_file", None))
