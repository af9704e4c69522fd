"""Snapshotter semantics on a real root: records, directories, mounts, errors, restart."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from snapshotter.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from snapshotter.snapshots.layout import Mount
from snapshotter.snapshots.snapshotter import Snapshotter
from snapshotter.snapshots.store import Kind


@pytest.fixture
def sn(tmp_path: Path) -> Snapshotter:
    s = Snapshotter(tmp_path / "root")
    yield s  # type: ignore[misc]
    s.close()


def prepare(sn: Snapshotter, key: str, parent: str = "", ns: str | None = "default") -> list[Mount]:
    return asyncio.run(sn.prepare(ns, key, parent, {}))


def view(sn: Snapshotter, key: str, parent: str = "", ns: str | None = "default") -> list[Mount]:
    return asyncio.run(sn.view(ns, key, parent, {}))


def chain(sn: Snapshotter, n: int) -> str:
    parent = ""
    for i in range(n):
        prepare(sn, f"a{i}", parent)
        asyncio.run(sn.commit("default", f"c{i}", f"a{i}", {}))
        parent = f"c{i}"
    return parent


def test_first_snapshot_is_a_bind_mount_of_its_own_dir(sn: Snapshotter) -> None:
    (m,) = prepare(sn, "k")
    rid = sn.stat("default", "k").id
    assert m == Mount("bind", str(sn.layout.fs(rid)), ("rw", "rbind"))
    assert sn.layout.work(rid).is_dir()
    assert oct(sn.layout.fs(rid).stat().st_mode & 0o777) == oct(0o755)


def test_active_child_is_overlay_with_ancestors_nearest_first(sn: Snapshotter) -> None:
    top = chain(sn, 3)
    (m,) = prepare(sn, "ctr", top)
    ids = [sn.stat("default", f"c{i}").id for i in (2, 1, 0)]
    rid = sn.stat("default", "ctr").id
    assert m.type == "overlay" and m.source == "overlay"
    opts = [o for o in m.options if o != "index=off"]
    assert opts == [
        f"workdir={sn.layout.work(rid)}",
        f"upperdir={sn.layout.fs(rid)}",
        "lowerdir=" + ":".join(str(sn.layout.fs(i)) for i in ids),
    ]


def test_views(sn: Snapshotter) -> None:
    (m0,) = view(sn, "v0")
    assert m0.type == "bind" and m0.options == ("ro", "rbind")
    chain(sn, 2)
    (m1,) = view(sn, "v1", "c0")
    assert m1 == Mount("bind", str(sn.layout.fs(sn.stat("default", "c0").id)), ("ro", "rbind"))
    (m2,) = view(sn, "v2", "c1")
    assert m2.type == "overlay"
    assert not any(o.startswith(("upperdir", "workdir")) for o in m2.options)
    assert sn.stat("default", "v2").kind is Kind.VIEW
    assert not sn.layout.work(sn.stat("default", "v2").id).exists()


def test_128_layer_option_fits_a_page_under_a_typical_root(tmp_path: Path) -> None:
    """Numeric ids keep a 128-deep lowerdir under 4096 bytes for a root like /var/lib/clip."""
    sn = Snapshotter(tmp_path / "r")
    try:
        top = chain(sn, 128)
        (m,) = view(sn, "v", top)
        lower = next(o for o in m.options if o.startswith("lowerdir="))
        shortened = lower.replace(str(tmp_path / "r"), "/var/lib/clip")
        assert lower.count(":") == 127 and len(shortened) < 4096
    finally:
        sn.close()


def test_errors_match_containerd(sn: Snapshotter) -> None:
    prepare(sn, "a")
    with pytest.raises(AlreadyExists):
        prepare(sn, "a")
    with pytest.raises(NotFound, match="'missing'"):
        prepare(sn, "b", "missing")
    with pytest.raises(InvalidArgument, match="not a committed"):
        prepare(sn, "b", "a")  # parent of the wrong kind
    with pytest.raises(FailedPrecondition, match="not active or view"):
        asyncio.run(sn.commit("default", "c", "a", {}))
        sn.mounts("default", "c")
    with pytest.raises(FailedPrecondition, match="is not active"):
        asyncio.run(sn.commit("default", "c2", "c", {}))
    prepare(sn, "d", "c")
    with pytest.raises(FailedPrecondition, match="with child"):
        asyncio.run(sn.remove("default", "c"))
    with pytest.raises(AlreadyExists):
        prepare(sn, "e")
        asyncio.run(sn.commit("default", "c", "e", {}))
    with pytest.raises(NotFound):
        sn.stat("default", "nope")
    with pytest.raises(InvalidArgument, match="empty"):
        prepare(sn, "")


def test_labels_over_containerd_limit_are_rejected_before_writing(sn: Snapshotter) -> None:
    with pytest.raises(InvalidArgument, match=r"maximum size.*key: containerd"):
        asyncio.run(sn.prepare("default", "k", "", {"containerd.io/x": "v" * 4096}))
    assert sn.store.all(None) == []
    assert os.listdir(sn.layout.snapshots) == []
    asyncio.run(sn.prepare("default", "k", "", {"k": "v" * (4096 - 1)}))  # exactly at the limit


def test_absurd_keys_never_become_paths(sn: Snapshotter, tmp_path: Path) -> None:
    before = set(os.listdir(tmp_path))
    for key in ("../../etc", "/etc/passwd", "a/../../b", ".."):
        prepare(sn, key)
        asyncio.run(sn.commit("default", key + "-c", key, {}))
    assert set(os.listdir(tmp_path)) == before
    assert all(n.isdigit() for n in os.listdir(sn.layout.snapshots))
    with pytest.raises(InvalidArgument, match="control"):
        prepare(sn, "bad\nkey")


def test_namespaces_are_separate_and_none_sees_all(sn: Snapshotter) -> None:
    prepare(sn, "k", ns="one")
    prepare(sn, "k", ns="two")
    with pytest.raises(NotFound):
        sn.stat("three", "k")
    assert [r.ns for r in sn.walk("one", [])] == ["one"]
    assert len(sn.walk(None, [])) == 2
    with pytest.raises(FailedPrecondition, match="several namespaces"):
        sn.stat(None, "k")
    prepare(sn, "only", ns="one")
    assert sn.stat(None, "only").ns == "one"  # containerd's GC calls without a namespace
    asyncio.run(sn.remove(None, "only"))


def test_update_labels_and_field_mask(sn: Snapshotter) -> None:
    asyncio.run(sn.prepare("default", "k", "", {"a": "1", "b": "2"}))
    rec = sn.update("default", "k", {"a": "x", "c": "3"}, ["labels.a", "labels.b"])
    assert rec.labels == {"a": "x"}
    assert sn.update("default", "k", {"z": "1"}, []).labels == {"z": "1"}
    with pytest.raises(InvalidArgument, match="'parent'"):
        sn.update("default", "k", {}, ["parent"])
    with pytest.raises(InvalidArgument, match="maximum size"):
        sn.update("default", "k", {"big": "v" * 5000}, ["labels.big"])
    assert sn.stat("default", "k").labels == {"z": "1"}


def test_usage_counts_own_dir(sn: Snapshotter) -> None:
    prepare(sn, "a")
    fs = sn.layout.fs(sn.stat("default", "a").id)
    (fs / "f").write_bytes(b"x" * 10000)
    (fs / "d").mkdir()
    os.link(fs / "f", fs / "hard")
    size, inodes = asyncio.run(sn.usage("default", "a"))
    assert inodes == 3 and size >= 10000
    asyncio.run(sn.commit("default", "c", "a", {}))
    assert asyncio.run(sn.usage("default", "c")) == (size, inodes)


def test_remove_deletes_directory_and_restart_serves_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "root"
    sn = Snapshotter(root)
    top = chain(sn, 2)
    prepare(sn, "ctr", top)
    prepare(sn, "gone")
    gone = sn.stat("default", "gone").id
    asyncio.run(sn.remove("default", "gone"))
    assert not sn.layout.dir(gone).exists()
    before = sn.mounts("default", "ctr")
    infos = [(r.key, r.parent, r.kind, r.labels, r.created_ns) for r in sn.walk(None, [])]
    sn.close()
    again = Snapshotter(root)
    try:
        assert again.mounts("default", "ctr") == before
        assert [
            (r.key, r.parent, r.kind, r.labels, r.created_ns) for r in again.walk(None, [])
        ] == infos
        prepare(again, "new")
        assert again.stat("default", "new").id > gone  # ids are never reused
    finally:
        again.close()


def test_failed_install_leaves_no_record_and_no_directory(sn: Snapshotter) -> None:
    def boom(staging: Path, rid: int) -> None:
        raise OSError("disk full")

    sn.layout.install = boom  # type: ignore[method-assign]
    with pytest.raises(OSError):
        prepare(sn, "k")
    assert sn.store.all(None) == []
    assert os.listdir(sn.layout.snapshots) == []


def test_cleanup_reclaims_orphans_only(sn: Snapshotter) -> None:
    prepare(sn, "keep")
    keep = sn.stat("default", "keep").id
    for name in ("999", "new-abc", "rm-7"):
        (sn.layout.snapshots / name / "fs").mkdir(parents=True)
    assert sorted(asyncio.run(sn.cleanup())) == ["999", "new-abc", "rm-7"]
    assert os.listdir(sn.layout.snapshots) == [str(keep)]


def test_concurrent_commits_to_one_name(sn: Snapshotter) -> None:
    """Usage is measured off the loop; the name is checked again before the commit lands."""
    prepare(sn, "a")
    prepare(sn, "b")

    async def both() -> list[object]:
        return await asyncio.gather(
            sn.commit("default", "X", "a", {}),
            sn.commit("default", "X", "b", {}),
            return_exceptions=True,
        )

    results = asyncio.run(both())
    assert sum(isinstance(r, AlreadyExists) for r in results) == 1
    assert sn.stat("default", "X").kind is Kind.COMMITTED
