"""A BlobServer in its own process, for the failover tests (tests/test_fs_blobserver_failover.py).

`python tests/fs_blobserver_child.py MOUNTPOINT SOCKET [--stall-from OFFSET] NAME:SIZE...`
serves each blob with `pattern(name, size)` bytes. Reads at or past --stall-from never complete
(the test kills this process while a reader waits on one). Reports on stdout, one line each:
`ready resumed=<True|False>` once serving, `stalled <name> <offset> <size>` when a read stalls,
`resent <count>` on the way out (requests the kernel resent to this server).
SIGTERM cancels the server the way the daemon does (no unmount).
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import sys
from pathlib import Path

import trio

from snapshotter.fs.blobserver import BlobServer, ReadFn


def pattern(name: str, size: int) -> bytes:
    """Deterministic, position-dependent bytes, so a read from the wrong offset is caught."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{name}/{counter}".encode()).digest() * 128
        counter += 1
    return bytes(out[:size])


def make_reader(data: bytes, stall_from: int | None) -> ReadFn:
    async def read(name: str, offset: int, size: int) -> bytes:
        if stall_from is not None and offset + size > stall_from:
            print(f"stalled {name} {offset} {size}", flush=True)
            await trio.sleep_forever()
        return data[offset : offset + size]

    return read


async def serve(args: argparse.Namespace) -> None:
    server = BlobServer(args.mountpoint, args.socket)
    for spec in args.blobs:
        name, size = spec.split(":")
        server.add(name, int(size), make_reader(pattern(name, int(size)), args.stall_from))
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            print(f"ready resumed={server.resumed}", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
    print(f"resent {server.resent}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument("socket", type=Path)
    parser.add_argument("--stall-from", type=int)
    parser.add_argument("blobs", nargs="+")
    trio.run(serve, parser.parse_args())
    sys.exit(0)


if __name__ == "__main__":
    main()
