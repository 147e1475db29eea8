"""The error taxonomy shared by every layer: what went wrong, and the CLI exit code it maps to.

Each class says what kind of failure it is; the edges translate: the CLI root turns any
`RecshipError` into one line and `exit_code`, and the runtime's status table
(`recship.runtime.grpc_errors`) turns it into a gRPC status code. Nothing here imports gRPC,
so training and packaging hosts never load it.
"""

from __future__ import annotations

import re
from typing import ClassVar

# Names that can be shown as they are: letters, digits and . _ / - only.
_PLAIN = re.compile(r"[A-Za-z0-9._/-]+")


class RecshipError(Exception):
    """Base of every error recship reports to a person or a client; the message is the report."""

    exit_code: ClassVar[int] = 1


class InvalidInput(RecshipError):
    """Bad user input: a file, flag, config or request field. The message names what and where."""

    exit_code = 2


class NotFound(RecshipError):
    """An unknown bundle, version, label, checkpoint or data set."""

    exit_code = 3


class Overloaded(RecshipError):
    """A bounded queue is full; the caller should back off and retry."""


class DeadlineExceeded(RecshipError):
    """The request's deadline passed before it could be served."""


class Unavailable(RecshipError):
    """Nothing can serve yet (no version ready) or a remote service cannot be reached."""

    exit_code = 4


class Unauthenticated(RecshipError):
    """The caller sent no credentials, or credentials that are not well formed."""

    exit_code = 7


class PermissionDenied(RecshipError):
    """The caller's credentials are well formed but do not grant the action (a wrong token)."""

    exit_code = 7


class FailedPrecondition(RecshipError):
    """The action is not allowed in the current state (e.g. labelling an unloaded version)."""


class EnvironmentBroken(RecshipError):
    """The installed torch / torchrec / fbgemm_gpu / faiss set does not work together."""

    exit_code = 5


class QualityGateFailed(RecshipError):
    """A packaged bundle did not meet its quality thresholds; nothing was published."""

    exit_code = 6


def untrusted(value: object, limit: int = 80) -> str:
    """`value` quoted for an error message, at most about `limit` characters.

    Strings from a bundle or a request (paths, names, ids) may be hostile: arbitrarily long, or
    holding control characters and terminal escapes. This quotes them with `repr` (so control
    characters show as escapes) and cuts the middle of long ones, saying how much was cut, so a
    status message or a log line never echoes an unbounded string.
    """
    text = repr(value if isinstance(value, str) else str(value))
    if len(text) <= limit:
        return text
    keep = max(limit - 24, 8)
    return f"{text[: keep // 2]}...({len(text) - keep} characters cut)...{text[-(keep // 2) :]}"


def shown(value: str, limit: int = 80) -> str:
    """A file or feature name for a message: as it is when plain and short, else `untrusted`."""
    if len(value) <= limit and _PLAIN.fullmatch(value):
        return value
    return untrusted(value, limit)


def clip(text: str, limit: int = 240) -> str:
    """A library's error text for a message: control characters replaced, at most `limit`.

    Unlike `untrusted` it does not quote, so the text reads as the library wrote it.
    """
    cleaned = "".join(c if c.isprintable() else "?" for c in text[: limit * 2])
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."
