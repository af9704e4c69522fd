"""clip's FUSE mount: `layerfs` (the daemon's handle), `ops`/`tree` (the FUSE-tree mode),
`blobserver`/`fuseproto`/`holder` (the EROFS mode's stream mount, which outlives restarts),
`mounts` (the mount table).

Nothing is imported here: `python -m snapshotter.fs.holder` must not load the daemon's modules.
"""
