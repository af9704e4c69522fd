"""ErofsLayers: one EROFS mount per layer over its stream, reference counted, restart-aware.

The inner provider is a stand-in whose "FUSE stream file" and "cache file" are plain files
holding the layer's uncompressed tar: what ErofsLayers does with them (write the image, mount,
count users, unmount, keep or replace mounts found after a restart) is real.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from fs_layers import M, index_layer, write_layer

from snapshotter.erofs import image_bytes
from snapshotter.erofs.layers import ErofsLayers
from snapshotter.erofs.mount import unmount
from snapshotter.errors import ClipError
from snapshotter.fs.mounts import mount_at
from snapshotter.index import LayerIndex
from snapshotter.snapshots.remote import RemoteLayer

DIGEST = "sha256:" + "ab" * 32
NAME = DIGEST[7:23]
IMAGE_REF = "registry.test/app:1"


class FakeStreams:
    """The remote-layer provider as ErofsLayers sees it, counting attach/release pairs."""

    def __init__(self, root: Path, index: LayerIndex, stream: bytes) -> None:
        self.mountpoint = root / "mnt"
        self.index = index
        self.complete = False
        self.recording = False
        self.narrow_mounts: list[Path] = []
        self.resumed = False
        self.users = 0
        (self.mountpoint / "blobs").mkdir(parents=True)
        (self.mountpoint / "blobs" / NAME).write_bytes(stream)
        self.cache = root / "cache" / "data"
        self.cache.parent.mkdir()
        self.cache.write_bytes(stream)

    async def prepare(self, layer: RemoteLayer) -> str:
        self.users += 1
        return str(self.mountpoint / NAME)

    async def restore(self, layer: RemoteLayer, lowerdir: str) -> str:
        return await self.prepare(layer)

    async def release(self, layer: RemoteLayer, lowerdir: str) -> None:
        self.users -= 1

    async def sweep(self) -> list[str]:
        return []

    def serve_blobs(self, holder: Path) -> None:
        self.holder = holder

    def session_resumed(self) -> bool:
        return self.resumed

    def index_of(self, digest: str) -> LayerIndex | None:
        return self.index

    def is_complete(self, digest: str) -> bool:
        return self.complete

    def recording_profile(self, digest: str) -> bool:
        return self.recording

    @contextmanager
    def narrow_readahead(self) -> Iterator[None]:
        """Records which layer directories were mounted while readahead was narrow."""
        target = self.mountpoint.parent / "layers" / NAME
        before = mount_at(target)
        yield
        if mount_at(target) != before:
            self.narrow_mounts.append(target)

    def cache_file(self, digest: str) -> Path:
        return self.cache

    def layer_name(self, digest: str) -> str:
        return digest[7:23]


LAYER = RemoteLayer("k", "", "sha256:" + "cd" * 32, IMAGE_REF, DIGEST)


@pytest.fixture
def streams(tmp_path: Path) -> Iterator[FakeStreams]:
    members = [
        M("etc", kind=tarfile.DIRTYPE, mode=0o755),
        M("etc/hostname", data=b"clip\n"),
        M("usr/bin/tool", data=os.urandom(300_000), mode=0o4755),
    ]
    blob = write_layer(tmp_path / "layer.tgz", members)
    index = index_layer(blob, tmp_path / "layer.idx")
    root = tmp_path / "root"
    fake = FakeStreams(root, index, gzip.decompress(blob.read_bytes()))
    try:
        yield fake
    finally:
        unmount(root / "layers" / NAME)


@contextmanager
def _held(path: Path) -> Iterator[int]:
    """The device number of the file system at `path`, kept alive by an open descriptor, so a
    new mount there (a new superblock) gets a different one."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield os.fstat(fd).st_dev
    finally:
        os.close(fd)


def test_one_mount_per_layer_counted_by_users(streams: FakeStreams, tmp_path: Path) -> None:
    layers = ErofsLayers(streams, tmp_path / "root", "erofs")
    target = tmp_path / "root" / "layers" / NAME
    image = tmp_path / "root" / "erofs" / f"{NAME}.fuse.img"

    async def scenario() -> None:
        assert await layers.prepare(LAYER) == str(target)
        assert await layers.prepare(LAYER) == str(target)
        assert mount_at(target) == ("erofs", str(image))
        assert (target / "etc/hostname").read_bytes() == b"clip\n"
        assert os.stat(target / "usr/bin/tool").st_mode & 0o7777 == 0o4755
        assert layers.mounted() == {DIGEST: target}
        assert streams.narrow_mounts == []  # no profile recorded: the normal readahead
        await layers.release(LAYER, str(target))
        assert mount_at(target) is not None and streams.users == 1
        await layers.release(LAYER, str(target))

    asyncio.run(scenario())
    assert mount_at(target) is None and streams.users == 0
    assert not image.exists() and not target.exists()


def test_complete_layer_mounts_over_the_cache_and_survives_a_restart(
    streams: FakeStreams, tmp_path: Path
) -> None:
    streams.complete = True
    root = tmp_path / "root"
    target = root / "layers" / NAME
    asyncio.run(ErofsLayers(streams, root, "erofs").prepare(LAYER))
    assert mount_at(target) == ("erofs", str(root / "erofs" / f"{NAME}.disk.img"))
    # a new daemon restores the recorded snapshot: the mount over the cache file is kept
    with _held(target) as before:
        restarted = ErofsLayers(streams, root, "erofs")
        assert asyncio.run(restarted.restore(LAYER, str(target))) == str(target)
        assert os.stat(target).st_dev == before
    assert (target / "etc/hostname").read_bytes() == b"clip\n"


def test_mount_over_a_resumed_stream_session_is_kept(
    streams: FakeStreams, tmp_path: Path
) -> None:
    """The previous daemon's FUSE session was taken over: its stream files still work."""
    root = tmp_path / "root"
    target = root / "layers" / NAME
    asyncio.run(ErofsLayers(streams, root, "erofs").prepare(LAYER))
    streams.resumed = True
    with _held(target) as before:
        restarted = ErofsLayers(streams, root, "erofs")
        asyncio.run(restarted.restore(LAYER, str(target)))
        assert os.stat(target).st_dev == before


def test_mount_over_a_stream_of_the_previous_daemon_is_replaced(
    streams: FakeStreams, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    target = root / "layers" / NAME
    asyncio.run(ErofsLayers(streams, root, "erofs").prepare(LAYER))
    with _held(target) as before:
        restarted = ErofsLayers(streams, root, "erofs")
        asyncio.run(restarted.restore(LAYER, str(target)))
        assert os.stat(target).st_dev != before
    assert mount_at(target) == ("erofs", str(root / "erofs" / f"{NAME}.fuse.img"))
    assert (target / "etc/hostname").read_bytes() == b"clip\n"


def test_a_failed_mount_names_the_layer_and_leaves_nothing(
    streams: FakeStreams, tmp_path: Path
) -> None:
    (streams.mountpoint / "blobs" / NAME).unlink()  # the stream file is gone
    root = tmp_path / "root"
    with pytest.raises(ClipError) as err:
        asyncio.run(ErofsLayers(streams, root, "erofs").prepare(LAYER))
    assert DIGEST in str(err.value) and IMAGE_REF in str(err.value)
    assert streams.users == 0
    assert mount_at(root / "layers" / NAME) is None
    assert list((root / "erofs").glob("*.img")) == []


def test_sweep_unmounts_layers_no_snapshot_uses(streams: FakeStreams, tmp_path: Path) -> None:
    """A daemon died between mounting a layer and committing its snapshot: the next one's
    restore finds no snapshot for that mount and sweeps it."""
    root = tmp_path / "root"
    target = root / "layers" / NAME
    asyncio.run(ErofsLayers(streams, root, "erofs").prepare(LAYER))
    assert asyncio.run(ErofsLayers(streams, root, "erofs").sweep()) == [f"layers/{NAME}"]
    assert mount_at(target) is None and not target.exists()
    assert list((root / "erofs").glob("*.img")) == []


def test_fuse_mode_hands_out_the_fuse_tree(streams: FakeStreams, tmp_path: Path) -> None:
    root = tmp_path / "root"
    layers = ErofsLayers(streams, root, "fuse")
    asyncio.run(layers.start())
    assert asyncio.run(layers.prepare(LAYER)) == str(streams.mountpoint / NAME)
    assert not (root / "layers").exists() and streams.users == 1
    asyncio.run(layers.release(LAYER, str(streams.mountpoint / NAME)))
    assert streams.users == 0


def test_auto_mode_picks_erofs_on_this_kernel(streams: FakeStreams, tmp_path: Path) -> None:
    """This machine's kernel (6.18) mounts file-backed EROFS and shows compact inodes' own
    mtimes: auto must choose EROFS, and its images use compact mtimes."""
    root = tmp_path / "root"
    layers = ErofsLayers(streams, root, "auto")
    asyncio.run(layers.start())
    assert layers.mode == "erofs" and layers.compact_mtime
    assert list((root / "erofs").iterdir()) == []  # the probe cleaned up
    target = root / "layers" / NAME
    asyncio.run(layers.prepare(LAYER))
    assert mount_at(target) == ("erofs", str(root / "erofs" / f"{NAME}.fuse.mtime.img"))
    assert (root / "erofs" / f"{NAME}.fuse.mtime.img").read_bytes() == image_bytes(
        streams.index, compact_mtime=True)


def test_a_mount_written_for_the_other_mtime_variant_is_replaced(
    streams: FakeStreams, tmp_path: Path
) -> None:
    """A complete layer's mount over the cache survives restarts, but not one whose image was
    written with another compact-mtime setting than the new daemon's probe chose: that image
    would show wrong mtimes (or waste space) on this kernel."""
    streams.complete = True
    root = tmp_path / "root"
    target = root / "layers" / NAME
    asyncio.run(ErofsLayers(streams, root, "erofs").prepare(LAYER))
    old = root / "erofs" / f"{NAME}.disk.img"
    assert mount_at(target) == ("erofs", str(old))
    with _held(target) as before:
        restarted = ErofsLayers(streams, root, "erofs")
        restarted.compact_mtime = True  # what start() sets where the probe says so
        asyncio.run(restarted.restore(LAYER, str(target)))
        assert os.stat(target).st_dev != before
    new = root / "erofs" / f"{NAME}.disk.mtime.img"
    assert mount_at(target) == ("erofs", str(new))
    assert not old.exists() and (target / "etc/hostname").read_bytes() == b"clip\n"
    with _held(target) as before:  # the same setting again: kept
        again = ErofsLayers(streams, root, "erofs")
        again.compact_mtime = True
        asyncio.run(again.restore(LAYER, str(target)))
        assert os.stat(target).st_dev == before


def _options(target: Path) -> set[str]:
    """The mount options /proc/self/mounts shows for ``target``."""
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(target):
            return set(fields[3].split(","))
    raise AssertionError(f"{target} is not mounted")


def test_complete_layers_read_the_disk_cache_with_direct_io(
    streams: FakeStreams, tmp_path: Path
) -> None:
    """Where the probe allows it (this kernel and ext4 do), a mount over the complete cache
    file reads it with direct I/O: each byte cached once, in the layer's own files, and no
    readahead across file boundaries of the stream. Over the FUSE stream reads stay buffered
    (clip's read path sees them with the readahead the start profile is recorded with)."""
    root = tmp_path / "root"
    layers = ErofsLayers(streams, root, "erofs", tmp_path / "root" / "cache")
    asyncio.run(layers.start())
    assert layers.direct_io
    target = root / "layers" / NAME
    asyncio.run(layers.prepare(LAYER))
    assert "directio" not in _options(target)  # over the FUSE stream
    asyncio.run(layers.release(LAYER, str(target)))
    streams.complete = True
    asyncio.run(layers.prepare(LAYER))
    assert mount_at(target) == ("erofs", str(root / "erofs" / f"{NAME}.disk.mtime.img"))
    assert "directio" in _options(target)
    tool = (target / "usr/bin/tool").read_bytes()
    assert len(tool) == 300_000 and (target / "etc/hostname").read_bytes() == b"clip\n"
    with open(streams.cache, "rb") as raw, tarfile.open(fileobj=raw) as tar:
        member = tar.extractfile("usr/bin/tool")
        assert member is not None and member.read() == tool
    asyncio.run(layers.release(LAYER, str(target)))
    assert mount_at(target) is None


def test_a_complete_layer_recording_its_start_profile_mounts_over_the_stream(
    streams: FakeStreams, tmp_path: Path
) -> None:
    """Reads of the cache file never reach clip: while the start profile is recorded the
    layer's reads must go through the stream file, complete or not."""
    streams.complete = streams.recording = True
    root = tmp_path / "root"
    asyncio.run(ErofsLayers(streams, root, "erofs").prepare(LAYER))
    assert mount_at(root / "layers" / NAME) == ("erofs", str(root / "erofs" / f"{NAME}.fuse.img"))
    # mounted with a narrow readahead: the profile is what the container reads, no more
    assert streams.narrow_mounts == [root / "layers" / NAME]
