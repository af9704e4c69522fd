"""The clip index: one streaming pass over a layer blob builds it; any byte range reads from it.

See docs/index-format.md for the format and the reasoning behind it.
"""

from snapshotter.index.builder import build_index, detect
from snapshotter.index.model import (
    BuildResult,
    Checkpoint,
    Entry,
    EntryType,
    IndexBuildOptions,
    IndexFormatError,
    LayerFormatError,
)
from snapshotter.index.reader import IndexReader, LayerIndex, inflate_range

__all__ = [
    "BuildResult",
    "Checkpoint",
    "Entry",
    "EntryType",
    "IndexBuildOptions",
    "IndexFormatError",
    "IndexReader",
    "LayerFormatError",
    "LayerIndex",
    "build_index",
    "detect",
    "inflate_range",
]
