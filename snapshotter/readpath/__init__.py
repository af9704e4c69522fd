"""The one read path for every byte clip serves: memory -> disk -> ContentCache -> registry.

- `layer`:  one attached layer (index, source, cache, verification, the cancel scopes it owns)
- `plan`:   how far one flight reaches
- `core`:   `ReadPath` (foreground reads, low-priority block fetches, single flights)
- `source`: where compressed bytes come from
"""

from snapshotter.readpath.core import ReadPath
from snapshotter.readpath.layer import Layer, LayerTasks
from snapshotter.readpath.policy import ReadFailed, ReadPolicy, ReadStats, VerifyError
from snapshotter.readpath.source import FileSource, Source

__all__ = [
    "FileSource",
    "Layer",
    "LayerTasks",
    "ReadFailed",
    "ReadPath",
    "ReadPolicy",
    "ReadStats",
    "Source",
    "VerifyError",
]
