"""The snapshotter: containerd's overlayfs semantics over MetaStore + Layout, plus the
remote-layer handshake through an optional LayerProvider.

Every method runs on the daemon's asyncio loop. Database and directory work happens without
awaiting, so each operation is atomic with respect to the others; only the provider is awaited
(it may fetch from the network), and the state it depends on is checked again afterwards.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from snapshotter.errors import AlreadyExists, ClipError, FailedPrecondition, InvalidArgument, quoted
from snapshotter.snapshots import validate
from snapshotter.snapshots.filters import Filter, snapshot_adaptor
from snapshotter.snapshots.layout import Layout, Mount, disk_usage
from snapshotter.snapshots.remote import LayerProvider, RemoteLayer, remote_layer
from snapshotter.snapshots.store import Kind, MetaStore, Record

log = logging.getLogger(__name__)


class Snapshotter:
    """One root directory's snapshots. ``ns=None`` means no namespace was given."""

    def __init__(self, root: Path, provider: LayerProvider | None = None) -> None:
        self.root = root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.layout = Layout(root)
        self.store = MetaStore(root / "metadata.db")
        self.provider = provider
        self._target_locks: dict[str, asyncio.Lock] = {}

    def close(self) -> None:
        self.store.close()

    # -- creation -------------------------------------------------------------------------

    async def prepare(
        self, ns: str | None, key: str, parent: str, labels: Mapping[str, str]
    ) -> list[Mount]:
        validate.key(key)
        labels = validate.labels(labels)
        layer = remote_layer(key, parent, labels) if self.provider is not None else None
        if layer is not None:
            await self._prepare_remote(ns, layer)
        return self._create(ns, key, parent, labels, Kind.ACTIVE)

    async def view(
        self, ns: str | None, key: str, parent: str, labels: Mapping[str, str]
    ) -> list[Mount]:
        validate.key(key)
        return self._create(ns, key, parent, validate.labels(labels), Kind.VIEW)

    def _committed_parent(self, ns: str | None, parent: str) -> Record | None:
        if not parent:
            return None
        record = self.store.get(ns, validate.key(parent, "parent"))
        if record.kind is not Kind.COMMITTED:
            raise InvalidArgument(f"parent {quoted(parent)} is not a committed snapshot")
        return record

    def _create(
        self,
        ns: str | None,
        key: str,
        parent: str,
        labels: dict[str, str],
        kind: Kind,
        remote_dir: str | None = None,
    ) -> list[Mount]:
        if self.store.find(ns, key) is not None:
            raise AlreadyExists(f"snapshot {quoted(key)} already exists")
        parent_rec = self._committed_parent(ns, parent)
        owner = self.layout.lowerdir(parent_rec) if parent_rec else None
        now = time.time_ns()
        record = Record(
            id=0,
            ns=ns if ns is not None else (parent_rec.ns if parent_rec else ""),
            key=key,
            kind=kind,
            parent_id=parent_rec.id if parent_rec else None,
            parent=parent,
            created_ns=now,
            updated_ns=now,
            labels=labels,
            remote_dir=remote_dir,
        )
        staging = self.layout.stage(kind, owner)
        try:
            with self.store.transaction():
                record.id = self.store.insert(record)
                self.layout.install(staging, record.id)
        except BaseException:
            self.layout.discard(staging)
            if record.id:
                self.layout.discard(self.layout.dir(record.id))
            raise
        return self.layout.mounts(record, self.store.ancestors(record.id))

    # -- the remote-layer handshake -------------------------------------------------------

    async def _prepare_remote(self, ns: str | None, layer: RemoteLayer) -> None:
        """Commit the layer under its chainID and answer ALREADY_EXISTS (never returns)."""
        assert self.provider is not None
        lock = self._target_locks.setdefault(layer.chain_id, asyncio.Lock())
        async with lock:
            existing = self.store.find(ns, layer.chain_id)
            if existing is None:
                self._committed_parent(ns, layer.parent)
                lowerdir = await self.provider.prepare(layer)
                try:
                    self._create(
                        ns,
                        layer.chain_id,
                        layer.parent,
                        dict(layer.labels),
                        Kind.COMMITTED,
                        remote_dir=lowerdir,
                    )
                except BaseException:
                    await self.provider.release(layer, lowerdir)
                    raise
                log.info("remote layer %s ready at %s", layer.digest, lowerdir)
            elif existing.kind is not Kind.COMMITTED or existing.parent != layer.parent:
                raise FailedPrecondition(
                    f"target snapshot {quoted(layer.chain_id)} of layer {layer.digest} of "
                    f"{quoted(layer.image_ref)} exists with another parent or kind"
                )
        raise AlreadyExists(f"target snapshot {quoted(layer.chain_id)} already exists")

    async def restore_remote(self) -> None:
        """Ask the provider to re-attach every remote snapshot recorded before a restart."""
        if self.provider is None:
            return
        for record in self.store.all(None):
            if record.remote_dir is None:
                continue
            layer = self._layer_of(record)
            try:
                lowerdir = await self.provider.restore(layer, record.remote_dir)
            except ClipError as exc:
                log.error("cannot restore remote snapshot %s: %s", record.key, exc)
                continue
            if lowerdir != record.remote_dir:
                record.remote_dir = lowerdir
                with self.store.transaction():
                    self.store.save(record)
        await self.provider.sweep()

    @staticmethod
    def _layer_of(record: Record) -> RemoteLayer:
        layer = remote_layer(record.key, record.parent, record.labels)
        if layer is None:
            layer = RemoteLayer(record.key, record.parent, record.key, "", "", (), record.labels)
        return layer

    # -- reads ----------------------------------------------------------------------------

    def mounts(self, ns: str | None, key: str) -> list[Mount]:
        record = self.store.get(ns, key)
        if record.kind is Kind.COMMITTED:
            raise FailedPrecondition(f"requested snapshot {quoted(key)} not active or view")
        return self.layout.mounts(record, self.store.ancestors(record.id))

    def stat(self, ns: str | None, key: str) -> Record:
        return self.store.get(ns, key)

    def walk(self, ns: str | None, filters: Sequence[str]) -> list[Record]:
        match = Filter(filters)
        return [
            r
            for r in self.store.all(ns)
            if match.matches(snapshot_adaptor(r.key, r.parent, r.kind.filter_name, r.labels))
        ]

    async def usage(self, ns: str | None, key: str) -> tuple[int, int]:
        """Active: measured now, in a thread (an upper dir can be large); else as committed."""
        record = self.store.get(ns, key)
        if record.kind is Kind.ACTIVE:
            return await asyncio.to_thread(disk_usage, self.layout.fs(record.id))
        return record.size, record.inodes

    # -- changes --------------------------------------------------------------------------

    def _committable(self, ns: str | None, name: str, key: str) -> Record:
        record = self.store.get(ns, key)
        if record.kind is not Kind.ACTIVE:
            raise FailedPrecondition(f"snapshot {quoted(key)} is not active")
        if self.store.find(record.ns, name) is not None:
            raise AlreadyExists(f"committed snapshot {quoted(name)} already exists")
        return record

    async def commit(self, ns: str | None, name: str, key: str, labels: Mapping[str, str]) -> None:
        """Active -> committed under ``name``, recording the tree's usage.

        The usage walk runs in a thread so a large layer does not stall other calls; the
        preconditions are checked again afterwards, since another call may have run meanwhile.
        """
        validate.key(name, "name")
        labels = validate.labels(labels)
        record = self._committable(ns, name, key)
        usage = await asyncio.to_thread(disk_usage, self.layout.fs(record.id))
        record = self._committable(ns, name, key)
        record.size, record.inodes = usage
        record.key, record.kind, record.labels = name, Kind.COMMITTED, labels
        record.created_ns = record.updated_ns = time.time_ns()
        with self.store.transaction():
            self.store.save(record)

    def update(
        self, ns: str | None, name: str, labels: Mapping[str, str], paths: Sequence[str]
    ) -> Record:
        """containerd's UpdateInfo: only labels are mutable, whole or ``labels.KEY``."""
        record = self.store.get(ns, name)
        new = dict(record.labels)
        if not paths:
            new = dict(labels)
        for path in paths:
            if path.startswith("labels."):
                label = path[len("labels.") :]
                if label in labels:
                    new[label] = labels[label]
                else:
                    new.pop(label, None)
            elif path == "labels":
                new = dict(labels)
            else:
                raise InvalidArgument(
                    f"cannot update {quoted(path)} field on snapshot {quoted(name)}"
                )
        record.labels = validate.labels(new)
        record.updated_ns = time.time_ns()
        with self.store.transaction():
            self.store.save(record)
        return record

    async def remove(self, ns: str | None, key: str) -> None:
        record = self.store.get(ns, key)
        if self.store.has_children(record.id):
            raise FailedPrecondition(f"cannot remove snapshot {quoted(key)} with child")
        with self.store.transaction():
            self.store.delete(record.id)
        trash = self.layout.trash(record.id)
        if trash is not None:  # deleting a big tree must not stall other RPCs
            await asyncio.to_thread(self.layout.discard, trash)
        if record.remote_dir is not None and self.provider is not None:
            await self.provider.release(self._layer_of(record), record.remote_dir)

    async def cleanup(self) -> list[str]:
        """Reclaim directories that belong to no snapshot (left by crashes or failed removes).

        The list is taken on the loop (no Prepare is half-done there); deletion runs in a thread.
        """
        orphans = self.layout.orphans(self.store.ids())
        await asyncio.to_thread(self.layout.discard_all, orphans)
        names = [p.name for p in orphans]
        if self.provider is not None:
            names += await self.provider.sweep()
        if names:
            log.info("cleanup removed %d directories: %s", len(names), ", ".join(names))
        return names
