"""The FUSE layer filesystem: one mount, one subdirectory per attached remote layer."""

from snapshotter.fs.layerfs import MOUNT_OPTIONS, LayerFS, clear_stale_mount, is_mounted
from snapshotter.fs.tree import LayerTree

__all__ = ["MOUNT_OPTIONS", "LayerFS", "LayerTree", "clear_stale_mount", "is_mounted"]
