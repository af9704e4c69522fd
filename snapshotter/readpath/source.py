"""Where a layer's compressed bytes come from: an async callable, usually the registry."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable

#: An async callable returning `length` compressed bytes of the blob starting at `coff`.
Source = Callable[[int, int], Awaitable[bytes]]


class FileSource:
    """A layer source reading a local blob file (tests, `clip` tools, pre-downloaded blobs).

    Counts the compressed bytes it served, which is how tests measure laziness.
    """

    def __init__(self, path: os.PathLike[str] | str) -> None:
        self.path = os.fspath(path)
        self.bytes_read = 0
        self.calls = 0

    async def __call__(self, coff: int, length: int) -> bytes:
        self.calls += 1
        with open(self.path, "rb") as f:
            data = os.pread(f.fileno(), length, coff)
        self.bytes_read += len(data)
        return data
