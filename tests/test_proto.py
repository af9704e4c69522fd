"""The generated API modules are fresh and wire-compatible with containerd's own protos."""

from __future__ import annotations

import filecmp
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, FileDescriptor

from snapshotter.api.containerd.services.content.v1 import content_pb2
from snapshotter.api.containerd.services.images.v1 import images_pb2
from snapshotter.api.containerd.services.leases.v1 import leases_pb2
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_pb2
from snapshotter.api.containerd.types import descriptor_pb2, mount_pb2

REPO = Path(__file__).resolve().parents[1]
CONTAINERD_API = Path("/usr/share/gocode/src/github.com/containerd/containerd/api")
OURS: dict[str, FileDescriptor] = {
    "types/mount.proto": mount_pb2.DESCRIPTOR,
    "types/descriptor.proto": descriptor_pb2.DESCRIPTOR,
    "services/snapshots/v1/snapshots.proto": snapshots_pb2.DESCRIPTOR,
    "services/content/v1/content.proto": content_pb2.DESCRIPTOR,
    "services/images/v1/images.proto": images_pb2.DESCRIPTOR,
    "services/leases/v1/leases.proto": leases_pb2.DESCRIPTOR,
}
_MESSAGE_RE = re.compile(r"^message (\w+)\s*\{(.*?)^\}", re.MULTILINE | re.DOTALL)
_FIELD_RE = re.compile(r"^\s*(?:repeated\s+)?([\w.]+|map<[^>]+>)\s+(\w+)\s*=\s*(\d+)", re.MULTILINE)
_RPC_RE = re.compile(r"rpc (\w+)\((stream )?([\w.]+)\) returns \((stream )?([\w.]+)\)")


def test_generated_modules_are_fresh(tmp_path: Path) -> None:
    """Regenerating into a temp dir gives byte-identical files: run `make proto` if this fails."""
    subprocess.run(
        [sys.executable, str(REPO / "proto" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    committed = REPO / "snapshotter" / "api"
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    stored = sorted(
        p.relative_to(committed)
        for p in committed.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )
    assert fresh == stored, "generated file set differs from snapshotter/api: run `make proto`"
    stale = [str(p) for p in fresh if not filecmp.cmp(tmp_path / p, committed / p, shallow=False)]
    assert not stale, f"stale generated modules (run `make proto`): {stale}"


def _containerd_fields(text: str) -> dict[str, dict[str, int]]:
    return {
        name: {f: int(n) for _, f, n in _FIELD_RE.findall(body)}
        for name, body in _MESSAGE_RE.findall(text)
    }


def _our_fields(desc: Descriptor) -> dict[str, int]:
    return {f.name: f.number for f in desc.fields}


@pytest.mark.parametrize("rel", sorted(OURS))
def test_wire_compatible_with_containerd(rel: str) -> None:
    """Every message, field number and RPC in containerd's file exists identically in ours."""
    text = (CONTAINERD_API / rel).read_text()
    ours = OURS[rel]
    package = re.search(r"^package ([\w.]+);", text, re.MULTILINE)
    assert package is not None and ours.package == package.group(1)
    theirs = _containerd_fields(text)
    assert set(theirs) == set(ours.message_types_by_name)
    for name, fields in theirs.items():
        assert _our_fields(ours.message_types_by_name[name]) == fields, name
    for service in ours.services_by_name.values():
        rpcs = {m[0]: m for m in _RPC_RE.findall(text)}
        assert set(rpcs) == {m.name for m in service.methods}
        for method in service.methods:
            _, cstream, req, sstream, resp = rpcs[method.name]
            assert method.input_type.full_name.endswith(req.split(".")[-1])
            assert method.output_type.full_name.endswith(resp.split(".")[-1])
            assert bool(cstream) == method.client_streaming, method.name
            assert bool(sstream) == method.server_streaming, method.name


def test_enum_values_match_containerd() -> None:
    assert dict(snapshots_pb2.Kind.items()) == {
        "UNKNOWN": 0,
        "VIEW": 1,
        "ACTIVE": 2,
        "COMMITTED": 3,
    }
    assert dict(content_pb2.WriteAction.items()) == {"STAT": 0, "WRITE": 1, "COMMIT": 2}
