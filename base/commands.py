"""How every recship command ends: an error becomes one readable line and its exit code.

`run` is the single place that turns a `RecshipError` into `error: <message>` on stderr and
`sys.exit(error.exit_code)`, so the `recship` root group and entry points that run one
subcommand on their own (the trainer under torchrun) answer failures the same way.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import NoReturn

import click

from recship.base.errors import RecshipError


def run(command: click.Command, argv: Sequence[str] | None, prog_name: str) -> NoReturn:
    """Runs a click command and exits: 0, the error's exit code, 130 on abort, or click's own.

    Args:
        command: the root group or a single command.
        argv: its arguments (None: `sys.argv[1:]`).
        prog_name: the name shown in usage lines, e.g. "recship".
    """
    try:
        status = command.main(
            args=None if argv is None else list(argv), prog_name=prog_name, standalone_mode=False
        )
    except RecshipError as error:
        click.secho(f"error: {error}", err=True, fg="red")
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    # Without standalone mode click returns the exit code of --help / --version instead of exiting.
    sys.exit(status if isinstance(status, int) else 0)
