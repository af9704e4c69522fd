"""``clip status``: ask a running daemon what it is serving (clip.v1.Status over its socket).

Exit 0 when the daemon answers, 1 with one line naming the socket when it does not, so the
command doubles as a liveness check in scripts, systemd ``ExecStartPost`` or a Kubernetes
exec probe.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import MutableSequence
from pathlib import Path

import grpc
from google.protobuf.message import Message

from snapshotter.api.clip.v1 import status_pb2 as pb
from snapshotter.api.clip.v1 import status_pb2_grpc as pb_grpc
from snapshotter.config import DaemonConfig
from snapshotter.errors import Unavailable

DEFAULT_ADDRESS = DaemonConfig().address
EPILOG = f"""\
examples:
  clip status                                  # the daemon on {DEFAULT_ADDRESS}
  clip status --address /tmp/clip/clip.sock --json | jq .layers
"""


_MODES = {
    "erofs": "by the kernel (EROFS images over the layer streams)",
    "fuse": "by clip's FUSE tree",
}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "status",
        help="show whether the daemon is up and what it serves",
        description="Ask a running `clip serve` for its version, uptime, snapshots, remote "
        "layers, cache sizes, ContentCache health and FUSE mount. Exits 1 when no daemon "
        "answers on the socket.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--address", default=DEFAULT_ADDRESS, help=f"daemon socket (default {DEFAULT_ADDRESS})"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for an answer (default 5)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    status = fetch(Path(args.address), args.timeout)
    if args.json:
        print(json.dumps(to_dict(status), indent=2, sort_keys=True))
    else:
        print(render(status))
    return 0


def fetch(address: Path, timeout: float) -> pb.GetStatusResponse:
    """One Get call; any failure becomes Unavailable naming the socket."""
    if not address.exists():
        raise Unavailable(f"no clip daemon at {address}: socket does not exist")
    with grpc.insecure_channel(f"unix:{address}") as channel:
        try:
            return pb_grpc.StatusStub(channel).Get(pb.GetStatusRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code().name  # type: ignore[attr-defined]
            detail = exc.details() or code  # type: ignore[attr-defined]
            raise Unavailable(f"clip daemon at {address} did not answer: {detail}") from None


def to_dict(message: Message) -> dict[str, object]:
    """Every field, zeros included, with Python types (uint64 stays a number, unlike
    json_format, which writes 64-bit integers as strings)."""
    out: dict[str, object] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        repeated = isinstance(value, MutableSequence)
        if field.message_type is not None:
            out[field.name] = [to_dict(v) for v in value] if repeated else to_dict(value)
        else:
            out[field.name] = list(value) if repeated else value
    return out


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def render(status: pb.GetStatusResponse) -> str:
    snaps, disk, tier, fuse = status.snapshots, status.disk_cache, status.content_cache, status.fuse
    tier_line = tier.backend
    if tier.configured:
        tier_line += f" ({'healthy' if tier.healthy else 'UNHEALTHY'})"
    if tier.detail:
        tier_line += f": {tier.detail}"
    lines = [
        f"clip {status.version} serving {status.root} on {status.address} "
        f"(pid {status.pid}, up {human_duration(status.uptime_seconds)})",
        f"snapshots:     {snaps.committed} committed, {snaps.active} active, {snaps.view} view",
        f"fuse:          {'mounted at ' + fuse.mountpoint if fuse.mounted else 'not mounted'}",
        f"layers served: {_MODES.get(fuse.fs_mode, fuse.fs_mode or 'unknown')}"
        + ("; complete layers read from the disk cache with direct I/O" if fuse.direct_io else ""),
        f"disk cache:    {human_bytes(disk.used_bytes)} used of {human_bytes(disk.limit_bytes)} "
        f"({disk.dir})",
        f"content cache: {tier_line}",
        f"remote layers: {len(status.layers)}",
    ]
    if status.layers:
        lines.append(f"  {'LAYER ID':<16}  {'CACHED':>10}  {'SIZE':>10}  {'COMPLETE':<8}  IMAGE")
        for layer in status.layers:
            lines.append(
                f"  {layer.layer_id:<16}  {human_bytes(layer.cached_bytes):>10}  "
                f"{human_bytes(layer.uncompressed_size):>10}  "
                f"{'yes' if layer.complete else 'no':<8}  {layer.image_ref}"
            )
    return "\n".join(lines)
