"""Registry-specific refinements of clip's typed errors (callers may catch the base types)."""

from __future__ import annotations

from snapshotter.errors import FailedPrecondition, InvalidArgument


class AccessDenied(FailedPrecondition):
    """The registry or its token server refused us (HTTP 401/403)."""


class DigestMismatch(InvalidArgument):
    """Content from the registry does not match the digest or size it was asked for."""
