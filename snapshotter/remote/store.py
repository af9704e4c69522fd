"""``<root>/indexes/``: the node's clip indexes, one file per layer digest.

Files are written to a temporary name and renamed, so a crash never leaves a partial index
under a digest's name; an operator may seed the store by copying index files in. Every method
does file I/O (and `get` decompresses the index): call them from a worker thread, never on the
asyncio loop.
"""

from __future__ import annotations

import os
from pathlib import Path

from snapshotter.index import LayerIndex
from snapshotter.remote.build import index_of_blob
from snapshotter.remote.profile import StartProfile, decode_profile


class IndexStore:
    """``<hex>``: the index of a layer; ``<hex>.profile``: its start profile, when known."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def path(self, digest: str) -> Path:
        return self.directory / digest.removeprefix("sha256:")

    def profile_path(self, digest: str) -> Path:
        return self.directory / (digest.removeprefix("sha256:") + ".profile")

    def get(self, digest: str) -> LayerIndex | None:
        """The stored index of ``digest``; an unreadable or foreign file is ignored (logged)."""
        path = self.path(digest)
        if not path.exists():
            return None
        return index_of_blob(lambda: LayerIndex.open(path), digest, f"stored index {path}")

    def temporary(self, digest: str) -> Path:
        return self.directory / f".tmp-{digest.removeprefix('sha256:')}-{os.getpid()}"

    def commit(self, temporary: Path, digest: str) -> LayerIndex:
        path = self.path(digest)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        return LayerIndex.open(path)

    def put(self, digest: str, data: bytes) -> LayerIndex:
        """Store index bytes fetched from elsewhere (the caller checked them)."""
        temporary = self.temporary(digest)
        try:
            temporary.write_bytes(data)
            return self.commit(temporary, digest)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def put_profile(self, digest: str, data: bytes) -> None:
        temporary = self.temporary(digest).with_suffix(".profile")
        temporary.write_bytes(data)
        os.replace(temporary, self.profile_path(digest))

    def profile(self, digest: str, block_size: int) -> StartProfile | None:
        try:
            data = self.profile_path(digest).read_bytes()
        except OSError:
            return None
        return decode_profile(data, digest, block_size)
