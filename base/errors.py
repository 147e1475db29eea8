"""The error taxonomy shared by every layer: what went wrong, and the CLI exit code it maps to.

Each class says what kind of failure it is; the edges translate: the CLI root turns any
`RecshipError` into one line and `exit_code`, and the runtime's status table
(`recship.runtime.grpc_errors`) turns it into a gRPC status code. Nothing here imports gRPC,
so training and packaging hosts never load it.
"""

from __future__ import annotations

from typing import ClassVar


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


class FailedPrecondition(RecshipError):
    """The action is not allowed in the current state (e.g. labelling an unloaded version)."""


class EnvironmentBroken(RecshipError):
    """The installed torch / torchrec / fbgemm_gpu / faiss set does not work together."""

    exit_code = 5


class QualityGateFailed(RecshipError):
    """A packaged bundle did not meet its quality thresholds; nothing was published."""

    exit_code = 6
