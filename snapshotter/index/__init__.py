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
from snapshotter.index.resume import (
    InflateResult,
    ResumePoint,
    ResumePoints,
    compressed_range_from,
    inflate_from,
)

__all__ = [
    "BuildResult",
    "Checkpoint",
    "Entry",
    "EntryType",
    "IndexBuildOptions",
    "IndexFormatError",
    "IndexReader",
    "InflateResult",
    "LayerFormatError",
    "LayerIndex",
    "ResumePoint",
    "ResumePoints",
    "build_index",
    "compressed_range_from",
    "detect",
    "inflate_from",
    "inflate_range",
]
