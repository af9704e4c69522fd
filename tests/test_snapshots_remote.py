"""The remote-layer handshake containerd 1.6 performs, with a small directory provider."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from snapshotter.errors import AlreadyExists, FailedPrecondition, NotFound, Unavailable
from snapshotter.snapshots.remote import RemoteLayer, remote_layer
from snapshotter.snapshots.snapshotter import Snapshotter
from snapshotter.snapshots.store import Kind


class DirProvider:
    """Serves each layer as a plain directory holding one file named after its digest."""

    def __init__(self, base: Path, fail: bool = False) -> None:
        self.base = base
        self.fail = fail
        self.prepared: list[str] = []
        self.restored: list[str] = []
        self.released: list[str] = []

    async def prepare(self, layer: RemoteLayer) -> str:
        if self.fail:
            raise Unavailable(f"layer {layer.digest}: registry unreachable")
        await asyncio.sleep(0)
        path = self.base / str(len(self.prepared))
        path.mkdir(parents=True)
        (path / layer.digest.replace(":", "_")).write_text(layer.image_ref)
        self.prepared.append(layer.digest)
        return str(path)

    async def restore(self, layer: RemoteLayer, lowerdir: str) -> str:
        self.restored.append(layer.digest)
        return lowerdir

    async def release(self, layer: RemoteLayer, lowerdir: str) -> None:
        self.released.append(lowerdir)

    async def sweep(self) -> list[str]:
        return []


def cri_labels(chain_id: str, digest: str) -> dict[str, str]:
    return {
        "containerd.io/snapshot.ref": chain_id,
        "containerd.io/snapshot/cri.image-ref": "127.0.0.1:5000/app:1",
        "containerd.io/snapshot/cri.layer-digest": digest,
        "containerd.io/snapshot/cri.manifest-digest": "sha256:m",
        "containerd.io/snapshot/cri.image-layers": f"{digest},sha256:next",
        "containerd.io/gc.root": "x",
    }


def stargz_labels(chain_id: str, digest: str) -> dict[str, str]:
    return {
        "containerd.io/snapshot.ref": chain_id,
        "containerd.io/snapshot/remote/stargz.reference": "127.0.0.1:5000/app:1",
        "containerd.io/snapshot/remote/stargz.digest": digest,
        "containerd.io/snapshot/remote/stargz.layers": digest,
    }


def test_label_families() -> None:
    cri = remote_layer("k", "p", cri_labels("sha256:c", "sha256:d"))
    assert cri is not None and cri.digest == "sha256:d" and cri.chain_id == "sha256:c"
    assert cri.layers == ("sha256:d", "sha256:next")
    sgz = remote_layer("k", "", stargz_labels("sha256:c", "sha256:e"))
    assert sgz is not None and sgz.image_ref == "127.0.0.1:5000/app:1"
    assert remote_layer("k", "", {"containerd.io/snapshot.ref": "sha256:c"}) is None
    no_ref = cri_labels("", "sha256:d")
    assert remote_layer("k", "", no_ref) is None


def _handshake(sn: Snapshotter, key: str, parent: str, labels: dict[str, str]) -> None:
    with pytest.raises(AlreadyExists, match=labels["containerd.io/snapshot.ref"]):
        asyncio.run(sn.prepare("default", key, parent, labels))


def test_handshake_commits_under_chain_id_with_labels_and_parent(tmp_path: Path) -> None:
    provider = DirProvider(tmp_path / "mnt")
    sn = Snapshotter(tmp_path / "root", provider)
    l1 = cri_labels("sha256:chain1", "sha256:d1")
    l2 = stargz_labels("sha256:chain2", "sha256:d2")
    _handshake(sn, "default/1/extract-1 sha256:chain1", "", l1)
    _handshake(sn, "default/2/extract-2 sha256:chain2", "sha256:chain1", l2)
    # what containerd's metadata layer does next
    flt = 'labels."containerd.io/snapshot.ref"==sha256:chain2,parent=="sha256:chain1"'
    (found,) = sn.walk("default", [flt])
    assert found.key == "sha256:chain2" and found.kind is Kind.COMMITTED
    assert found.labels == l2 and found.parent == "sha256:chain1"
    with pytest.raises(NotFound, match="does not exist"):
        sn.stat("default", "default/2/extract-2 sha256:chain2")  # the Prepare key is not kept
    # a container on top: lowerdirs are the provider's directories, nearest first
    (m,) = asyncio.run(sn.prepare("default", "ctr", "sha256:chain2", {}))
    lower = next(o for o in m.options if o.startswith("lowerdir="))
    assert lower == f"lowerdir={tmp_path / 'mnt' / '1'}:{tmp_path / 'mnt' / '0'}"
    # View on a single remote layer is a read-only bind of its directory
    (v,) = asyncio.run(sn.view("default", "v", "sha256:chain1", {}))
    assert (v.type, v.source, v.options) == ("bind", str(tmp_path / "mnt" / "0"), ("ro", "rbind"))
    # the same layer again (another pull): no second fetch, same answer
    _handshake(sn, "default/3/extract-3 sha256:chain1", "", l1)
    assert provider.prepared == ["sha256:d1", "sha256:d2"]
    sn.close()


def test_without_provider_remote_labels_prepare_normally(tmp_path: Path) -> None:
    sn = Snapshotter(tmp_path / "root")
    labels = cri_labels("sha256:chain1", "sha256:d1")
    (m,) = asyncio.run(sn.prepare("default", "k", "", labels))
    assert m.type == "bind" and sn.stat("default", "k").labels == labels
    sn.close()


def test_provider_failure_fails_prepare_without_fallback(tmp_path: Path) -> None:
    sn = Snapshotter(tmp_path / "root", DirProvider(tmp_path / "mnt", fail=True))
    with pytest.raises(Unavailable, match="registry unreachable"):
        asyncio.run(sn.prepare("default", "k", "", cri_labels("sha256:c", "sha256:d")))
    assert sn.walk(None, []) == []
    sn.close()


def test_existing_target_with_other_parent_is_refused(tmp_path: Path) -> None:
    sn = Snapshotter(tmp_path / "root", DirProvider(tmp_path / "mnt"))
    _handshake(sn, "k1", "", cri_labels("sha256:c", "sha256:d"))
    asyncio.run(sn.prepare("default", "p-a", "", {}))
    asyncio.run(sn.commit("default", "p", "p-a", {}))
    with pytest.raises(FailedPrecondition, match="another parent"):
        asyncio.run(sn.prepare("default", "k2", "p", cri_labels("sha256:c", "sha256:d")))
    sn.close()


def test_concurrent_prepares_of_one_layer_fetch_once(tmp_path: Path) -> None:
    provider = DirProvider(tmp_path / "mnt")
    sn = Snapshotter(tmp_path / "root", provider)
    labels = cri_labels("sha256:c", "sha256:d")

    async def both() -> list[BaseException | None]:
        results = await asyncio.gather(
            sn.prepare("default", "k1", "", labels),
            sn.prepare("default", "k2", "", labels),
            return_exceptions=True,
        )
        return [r if isinstance(r, BaseException) else None for r in results]

    assert all(isinstance(r, AlreadyExists) for r in asyncio.run(both()))
    assert provider.prepared == ["sha256:d"]
    sn.close()


def test_restart_restores_and_remove_releases(tmp_path: Path) -> None:
    sn = Snapshotter(tmp_path / "root", DirProvider(tmp_path / "mnt"))
    _handshake(sn, "k1", "", cri_labels("sha256:c", "sha256:d"))
    sn.close()
    provider = DirProvider(tmp_path / "mnt2")
    again = Snapshotter(tmp_path / "root", provider)
    asyncio.run(again.restore_remote())
    assert provider.restored == ["sha256:d"]
    (m,) = asyncio.run(again.view("default", "v", "sha256:c", {}))
    assert m.source == str(tmp_path / "mnt" / "0")
    asyncio.run(again.remove("default", "v"))
    asyncio.run(again.remove("default", "sha256:c"))
    assert provider.released == [str(tmp_path / "mnt" / "0")]
    again.close()
