"""The error taxonomy shared by the CLI, the packager, the trainer and the gRPC service.

Each error class carries the gRPC status code and the CLI exit code it maps to, so one
place (the service's error mapper, the CLI root) turns any `RecshipError` into the right answer.
"""

from __future__ import annotations

from typing import ClassVar

import grpc


class RecshipError(Exception):
    """Base of every error recship reports to a person or a client; the message is the report."""

    grpc_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    exit_code: ClassVar[int] = 1


class InvalidInput(RecshipError):
    """Bad user input: a file, flag, config or request field. The message names what and where."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    exit_code = 2


class NotFound(RecshipError):
    """An unknown bundle, version, label, checkpoint or data set."""

    grpc_code = grpc.StatusCode.NOT_FOUND
    exit_code = 3


class Overloaded(RecshipError):
    """A bounded queue is full; the caller should back off and retry."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(RecshipError):
    """The request's deadline passed before it could be served."""

    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(RecshipError):
    """Nothing can serve yet (no version ready) or a remote service cannot be reached."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    exit_code = 4


class FailedPrecondition(RecshipError):
    """The action is not allowed in the current state (e.g. labelling an unloaded version)."""

    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class EnvironmentBroken(RecshipError):
    """The installed torch / torchrec / fbgemm_gpu / faiss set does not work together."""

    exit_code = 5


class QualityGateFailed(RecshipError):
    """A packaged bundle did not meet its quality thresholds; nothing was published."""

    exit_code = 6
