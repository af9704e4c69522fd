"""EROFS images of clip layers: the kernel serves a layer's tree, its data from the tar stream.

See docs/erofs.md.
"""

from snapshotter.erofs.writer import ErofsError, ImageInfo, image_bytes, write_image

__all__ = ["ErofsError", "ImageInfo", "image_bytes", "write_image"]
