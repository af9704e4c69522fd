"""clip: a lazy-loading containerd snapshotter for unmodified OCI images."""

__version__ = "0.1.0"
