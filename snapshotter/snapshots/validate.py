"""Input limits, as containerd enforces them, checked before anything is written."""

from __future__ import annotations

import re
from collections.abc import Mapping

from snapshotter.errors import InvalidArgument, quoted

# containerd labels.Validate: key and value together at most 4096 bytes.
LABEL_MAX_BYTES = 4096
# Keys are opaque, but a key must be something a caller can name again.
KEY_MAX_BYTES = 4096
# containerd's namespace identifier rule (namespaces.Validate / identifiers.Validate).
_NAMESPACE_RE = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$")
NAMESPACE_MAX = 76


def key(value: str, what: str = "key") -> str:
    """Reject empty, oversized or control-character keys; anything else is an opaque name."""
    if not value:
        raise InvalidArgument(f"snapshot {what} must not be empty")
    if len(value.encode()) > KEY_MAX_BYTES:
        raise InvalidArgument(
            f"snapshot {what} {value[:20]!r}... is longer than {KEY_MAX_BYTES} bytes"
        )
    if any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise InvalidArgument(f"snapshot {what} {quoted(value)} contains control characters")
    return value


def labels(values: Mapping[str, str]) -> dict[str, str]:
    """containerd's per-label size limit, with its error naming the label."""
    for k, v in values.items():
        if len(k.encode()) + len(v.encode()) > LABEL_MAX_BYTES:
            raise InvalidArgument(
                f"label key and value greater than maximum size ({LABEL_MAX_BYTES} bytes),"
                f" key: {k[:10]}"
            )
    return dict(values)


def namespace(value: str) -> str:
    if len(value) > NAMESPACE_MAX or not _NAMESPACE_RE.match(value):
        raise InvalidArgument(f"namespace {quoted(value)} is not a valid containerd namespace")
    return value
