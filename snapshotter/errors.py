"""Typed errors, one class per containerd errdefs value.

Every failure that reaches a user (a gRPC caller or a CLI user) is one of these, so the service
can map it to the gRPC code containerd expects and the CLI can print one line without a
traceback. The message must name the thing at fault (the key, the path, the image).
"""

from __future__ import annotations

import grpc


class ClipError(Exception):
    """Base of every error clip reports to a user."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class NotFound(ClipError):
    grpc_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ClipError):
    grpc_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ClipError):
    grpc_code = grpc.StatusCode.FAILED_PRECONDITION


class InvalidArgument(ClipError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class Unavailable(ClipError):
    grpc_code = grpc.StatusCode.UNAVAILABLE


class Internal(ClipError):
    grpc_code = grpc.StatusCode.INTERNAL


class ResourceExhausted(ClipError):
    """The node cannot hold what was asked (disk cache full even after eviction)."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


#: Longest user-supplied value (a key, a reference) quoted in a message: a message is sent back
#: as gRPC metadata, and a huge one would turn the real error into RESOURCE_EXHAUSTED.
MAX_QUOTED = 256


def quoted(value: str, limit: int = MAX_QUOTED) -> str:
    """``repr(value)``, cut to `limit` characters with the original length noted."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"
