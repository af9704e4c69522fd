"""The Snapshots gRPC service in-process: codes, namespaces, streaming, logs, handshake."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_snapshots_remote import DirProvider, cri_labels

from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from snapshotter.config import Config, DaemonConfig
from snapshotter.service.daemon import Daemon

NS = (("containerd-namespace", "default"),)
Body = Callable[[pb_grpc.SnapshotsStub, Daemon], Awaitable[None]]


def run(tmp_path: Path, body: Body, provider: Any = None) -> None:
    """Start a Daemon on tmp_path, run ``body(stub, daemon)`` against it, stop it."""

    async def main() -> None:
        cfg = Config(daemon=DaemonConfig(root=str(tmp_path / "root"), address=str(tmp_path / "s")))
        daemon = Daemon(cfg, provider)
        await daemon.start()
        try:
            async with grpc.aio.insecure_channel(f"unix:{tmp_path / 's'}") as channel:
                await body(pb_grpc.SnapshotsStub(channel), daemon)
        finally:
            await daemon.stop()

    asyncio.run(main())


async def code_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    raise AssertionError("call succeeded")


def test_error_codes(tmp_path: Path) -> None:
    async def body(s: pb_grpc.SnapshotsStub, _: Daemon) -> None:
        C = grpc.StatusCode
        await s.Prepare(pb.PrepareSnapshotRequest(key="a"), metadata=NS)
        cases = [
            (s.Prepare(pb.PrepareSnapshotRequest(key="a"), metadata=NS), C.ALREADY_EXISTS),
            (s.Prepare(pb.PrepareSnapshotRequest(key="b", parent="x"), metadata=NS), C.NOT_FOUND),
            (s.Prepare(pb.PrepareSnapshotRequest(key="b", parent="a"), metadata=NS),
             C.INVALID_ARGUMENT),
            (s.Stat(pb.StatSnapshotRequest(key="nope"), metadata=NS), C.NOT_FOUND),
            (s.Stat(pb.StatSnapshotRequest(key="a"), metadata=(("containerd-namespace", "other"),)),
             C.NOT_FOUND),
            (s.Stat(pb.StatSnapshotRequest(key="a"), metadata=(("containerd-namespace", "../x"),)),
             C.INVALID_ARGUMENT),
            (s.Prepare(pb.PrepareSnapshotRequest(key="c", labels={"k": "v" * 4100}), metadata=NS),
             C.INVALID_ARGUMENT),
            (s.Remove(pb.RemoveSnapshotRequest(key="nope"), metadata=NS), C.NOT_FOUND),
            (s.Mounts(pb.MountsRequest(key="nope"), metadata=NS), C.NOT_FOUND),
            (s.Usage(pb.UsageRequest(key="nope"), metadata=NS), C.NOT_FOUND),
            (s.Prepare(pb.PrepareSnapshotRequest(key=""), metadata=NS), C.INVALID_ARGUMENT),
        ]  # fmt: skip
        for call, expected in cases:
            got, details = await code_of(call)
            assert got == expected, details
        await s.Commit(pb.CommitSnapshotRequest(key="a", name="A"), metadata=NS)
        got, _ = await code_of(s.Commit(pb.CommitSnapshotRequest(key="A", name="B"), metadata=NS))
        assert got == C.FAILED_PRECONDITION  # Commit of a committed snapshot
        await s.Prepare(pb.PrepareSnapshotRequest(key="b"), metadata=NS)
        got, _ = await code_of(s.Commit(pb.CommitSnapshotRequest(key="b", name="A"), metadata=NS))
        assert got == C.ALREADY_EXISTS
        await s.Prepare(pb.PrepareSnapshotRequest(key="child", parent="A"), metadata=NS)
        got, details = await code_of(s.Remove(pb.RemoveSnapshotRequest(key="A"), metadata=NS))
        assert got == C.FAILED_PRECONDITION and "child" in details
        got, _ = await code_of(s.Mounts(pb.MountsRequest(key="A"), metadata=NS))
        assert got == C.FAILED_PRECONDITION
        upd = pb.UpdateSnapshotRequest(info=pb.Info(name="A"))
        upd.update_mask.paths.append("kind")
        got, _ = await code_of(s.Update(upd, metadata=NS))
        assert got == C.INVALID_ARGUMENT
        stream = s.List(pb.ListSnapshotsRequest(filters=['labels."x==']), metadata=NS)
        got, details = await code_of(stream.read())
        assert got == C.INVALID_ARGUMENT and "invalid filter" in details

    run(tmp_path, body)


def test_huge_keys_are_cut_in_messages(tmp_path: Path) -> None:
    """A 20 KB key is NOT_FOUND, not RESOURCE_EXHAUSTED on the size of the error's details."""

    async def body(s: pb_grpc.SnapshotsStub, _: Daemon) -> None:
        key = "k" * 20_000
        for call in (s.Stat(pb.StatSnapshotRequest(key=key), metadata=NS),
                     s.Remove(pb.RemoveSnapshotRequest(key=key), metadata=NS),
                     s.Mounts(pb.MountsRequest(key=key), metadata=NS)):
            got, details = await code_of(call)
            assert got == grpc.StatusCode.NOT_FOUND, details
            assert "20000 characters" in details and len(details) < 1000

    run(tmp_path, body)


def test_bad_input_writes_nothing_outside_root(tmp_path: Path) -> None:
    async def body(s: pb_grpc.SnapshotsStub, d: Daemon) -> None:
        for key in ("../../etc", "../../../tmp/escape", "/etc"):
            await s.Prepare(pb.PrepareSnapshotRequest(key=key, parent=""), metadata=NS)
            await s.Commit(pb.CommitSnapshotRequest(key=key, name=key + "@c"), metadata=NS)
            await s.View(pb.ViewSnapshotRequest(key=key + "v", parent=key + "@c"), metadata=NS)
        assert sorted(os.listdir(tmp_path)) == ["root", "s"]
        assert all(n.isdigit() for n in os.listdir(d.root / "snapshots"))

    run(tmp_path, body)
    assert sorted(os.listdir(tmp_path)) == ["root"]  # the socket is gone too


def test_list_streams_in_batches_and_namespace_scoping(tmp_path: Path) -> None:
    async def body(s: pb_grpc.SnapshotsStub, _: Daemon) -> None:
        for i in range(250):
            await s.View(pb.ViewSnapshotRequest(key=f"v{i}", labels={"n": str(i)}), metadata=NS)
        other = (("containerd-namespace", "other"),)
        await s.View(pb.ViewSnapshotRequest(key="v0"), metadata=other)
        batches = [r async for r in s.List(pb.ListSnapshotsRequest(), metadata=NS)]
        assert [len(b.info) for b in batches] == [100, 100, 50]
        req = pb.ListSnapshotsRequest(filters=["labels.n==7", "name==v9"])
        names = [i.name for r in [r async for r in s.List(req, metadata=NS)] for i in r.info]
        assert sorted(names) == ["v7", "v9"]
        everything = [r async for r in s.List(pb.ListSnapshotsRequest())]  # no namespace: GC
        assert sum(len(b.info) for b in everything) == 251

    run(tmp_path, body)


def test_info_fields_and_update_mask_over_the_wire(tmp_path: Path) -> None:
    async def body(s: pb_grpc.SnapshotsStub, _: Daemon) -> None:
        await s.Prepare(pb.PrepareSnapshotRequest(key="a", labels={"x": "1"}), metadata=NS)
        await s.Commit(pb.CommitSnapshotRequest(key="a", name="A", labels={"y": "2"}), metadata=NS)
        resp = await s.Prepare(pb.PrepareSnapshotRequest(key="b", parent="A"), metadata=NS)
        assert resp.mounts[0].type == "overlay"
        info = (await s.Stat(pb.StatSnapshotRequest(key="b"), metadata=NS)).info
        assert (info.name, info.parent, info.kind) == ("b", "A", pb.ACTIVE)
        assert info.created_at == info.updated_at and info.created_at.seconds > 0
        a = (await s.Stat(pb.StatSnapshotRequest(key="A"), metadata=NS)).info
        assert dict(a.labels) == {"y": "2"} and a.kind == pb.COMMITTED
        upd = pb.UpdateSnapshotRequest(info=pb.Info(name="A", labels={"z": "3", "y": "9"}))
        upd.update_mask.paths.append("labels.z")
        new = (await s.Update(upd, metadata=NS)).info
        assert dict(new.labels) == {"y": "2", "z": "3"} and new.created_at == a.created_at
        usage = await s.Usage(pb.UsageRequest(key="A"), metadata=NS)
        assert usage.inodes >= 1
        await s.Cleanup(pb.CleanupRequest(), metadata=NS)

    run(tmp_path, body)


def test_one_debug_line_per_rpc(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def body(s: pb_grpc.SnapshotsStub, _: Daemon) -> None:
        await s.Prepare(pb.PrepareSnapshotRequest(key="k1"), metadata=NS)
        await code_of(s.Prepare(pb.PrepareSnapshotRequest(key="k2", parent="zz"), metadata=NS))

    with caplog.at_level(logging.DEBUG, logger="clip.rpc"):
        run(tmp_path, body)
    fields = [r.fields for r in caplog.records if r.name == "clip.rpc"]  # type: ignore[attr-defined]
    assert [(f["rpc"], f["key"], f["parent"], f["result"]) for f in fields] == [
        ("Prepare", "k1", "", "OK"),
        ("Prepare", "k2", "zz", "NOT_FOUND"),
    ]
    assert all(isinstance(f["duration_ms"], float) for f in fields)


def test_remote_handshake_over_grpc(tmp_path: Path) -> None:
    provider = DirProvider(tmp_path / "mnt")

    async def body(s: pb_grpc.SnapshotsStub, _: Daemon) -> None:
        labels = cri_labels("sha256:chain", "sha256:layer")
        req = pb.PrepareSnapshotRequest(key="default/1/extract-1 sha256:chain", labels=labels)
        got, details = await code_of(s.Prepare(req, metadata=NS))
        assert got == grpc.StatusCode.ALREADY_EXISTS and "sha256:chain" in details
        flt = 'labels."containerd.io/snapshot.ref"==sha256:chain,parent==""'
        infos = [i async for r in s.List(pb.ListSnapshotsRequest(filters=[flt]), metadata=NS)
                 for i in r.info]  # fmt: skip
        assert [(i.name, i.kind, dict(i.labels)) for i in infos] == [
            ("sha256:chain", pb.COMMITTED, labels)
        ]
        resp = await s.Prepare(
            pb.PrepareSnapshotRequest(key="ctr", parent="sha256:chain"), metadata=NS
        )
        (mount,) = resp.mounts
        assert mount.type == "overlay"
        assert f"lowerdir={tmp_path / 'mnt' / '0'}" in mount.options

    run(tmp_path, body, provider)


class Recorder:
    def __init__(self, name: str, events: list[str]) -> None:
        self.name = name
        self.events = events

    async def start(self, daemon: Daemon) -> None:
        assert daemon.snapshotter is not None
        self.events.append(f"start {self.name}")

    async def stop(self) -> None:
        self.events.append(f"stop {self.name}")


def test_background_services_start_before_and_stop_after_serving(tmp_path: Path) -> None:
    events: list[str] = []

    async def main() -> None:
        cfg = Config(daemon=DaemonConfig(root=str(tmp_path / "r"), address=str(tmp_path / "s")))
        daemon = Daemon(cfg)
        daemon.add_service(Recorder("fuse", events))
        daemon.add_service(Recorder("metrics", events))
        await daemon.start()
        events.append("serving" if (tmp_path / "s").exists() else "no socket")
        await daemon.stop()

    asyncio.run(main())
    assert events == ["start fuse", "start metrics", "serving", "stop metrics", "stop fuse"]
