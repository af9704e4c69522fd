"""Remote layers: from a Prepare's labels to a lazily served, shared layer.

- `store`:      the node's index store (`<root>/indexes`)
- `resolve`:    the resolution chain (store, ContentCache, artifact, build), single flight
- `build`:      the streaming index build from the registry, with the inflate bounds
- `artifact`:   index artifacts attached to images (`clip index push`, lookup)
- `profile`:    start profiles
- `share`:      sharing indexes and complete layers with the ContentCache
- `background`: the background fetch (a trio task owned by the layer)
- `provider`:   `RemoteLayerProvider`: attach/detach, status, eviction, the public surface
"""

from snapshotter.remote.provider import RemoteLayerProvider, layer_id

__all__ = ["RemoteLayerProvider", "layer_id"]
