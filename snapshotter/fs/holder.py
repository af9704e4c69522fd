"""The FUSE session holder: keeps the blob mount's /dev/fuse descriptor alive across restarts.

A FUSE connection dies when the last open file of its /dev/fuse descriptor closes. The holder
is a small process, started once and detached from the daemon's session and process group, that
keeps one duplicate of that descriptor plus the INIT parameters and hands a duplicate to every
daemon that asks. A daemon killed by SIGKILL therefore closes only its own copy: the kernel
keeps the mount, queues new requests, and keeps the requests the dead daemon had read but not
answered; the next daemon takes the descriptor and asks the kernel to resend those
(FUSE_NOTIFY_RESEND).

The holder exits when told to (a real shutdown), when the connection is gone (the mount was
unmounted or aborted: the descriptor polls POLLERR), or on SIGTERM.

Protocol: one request per connection on a SOCK_SEQPACKET unix socket (mode 0600), JSON, the
descriptor as SCM_RIGHTS: `{"op": "put", "state": {...}}` + fd, `{"op": "get"}` -> state + fd,
`{"op": "exit"}`. Command line: `python -m snapshotter.fs.holder --socket PATH --pidfile PATH`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snapshotter.errors import Unavailable

log = logging.getLogger(__name__)

_MAX_MESSAGE = 1 << 16
_CLIENT_TIMEOUT = 5.0


# --- client side (the daemon) --------------------------------------------------------------------


def _call(
    path: Path, request: dict[str, Any], fd: int | None = None
) -> tuple[dict[str, Any], int | None]:
    """One request/reply exchange with the holder; returns (reply, received fd or None)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(_CLIENT_TIMEOUT)
        try:
            sock.connect(os.fspath(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise Unavailable(f"fuse holder: nothing listens on {path}") from exc
        message = json.dumps(request).encode()
        try:
            if fd is None:
                sock.send(message)
            else:
                socket.send_fds(sock, [message], [fd])
            data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_MESSAGE, 1)
        except OSError as exc:  # it exited meanwhile (the mount went away), or hangs
            raise Unavailable(f"fuse holder at {path} did not answer: {exc}") from exc
    if not data:
        raise Unavailable(f"fuse holder at {path} closed the connection")
    reply: dict[str, Any] = json.loads(data)
    if not reply.get("ok"):
        for received in fds:
            os.close(received)
        raise Unavailable(f"fuse holder at {path}: {reply.get('error', 'request refused')}")
    return reply, (fds[0] if fds else None)


def put(path: Path, fd: int, state: dict[str, Any]) -> None:
    """Give the holder (a duplicate of) `fd` and the session state, replacing what it held."""
    _call(path, {"op": "put", "state": state}, fd)


def get(path: Path) -> tuple[int, dict[str, Any]] | None:
    """A duplicate of the held descriptor and its state, or None if the holder holds nothing."""
    try:
        reply, fd = _call(path, {"op": "get"})
    except Unavailable:
        return None
    if fd is None:
        return None
    state: dict[str, Any] = reply["state"]
    return fd, state


def release(path: Path) -> None:
    """Tell the holder to close its descriptor and exit (a real shutdown); returns once it has
    exited, so a holder started next never races the old one's exit. No-op if none runs."""
    try:
        reply, _fd = _call(path, {"op": "exit"})
    except Unavailable:
        return
    try:
        pidfd = os.pidfd_open(int(reply["pid"]))
    except ProcessLookupError:
        return
    try:
        select.select([pidfd], [], [], _CLIENT_TIMEOUT)
    finally:
        os.close(pidfd)


def running(path: Path) -> bool:
    try:
        _call(path, {"op": "ping"})
    except Unavailable:
        return False
    return True


def spawn(path: Path, pidfile: Path) -> None:
    """Start a holder at `path` unless one already answers there; returns once it listens."""
    if running(path):
        return
    cmd = [sys.executable, "-m", "snapshotter.fs.holder", "--socket", os.fspath(path),
           "--pidfile", os.fspath(pidfile)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=30)
    if done.returncode != 0 and not running(path):
        raise Unavailable(f"fuse holder: cannot start at {path}: {done.stderr.strip()}")


# --- the holder process -----------------------------------------------------------------------


@dataclass
class _Held:
    fd: int
    state: dict[str, Any]


class Holder:
    """The holder's state and request loop (runs in the detached process)."""

    def __init__(self, listener: socket.socket, path: Path, pidfile: Path) -> None:
        self.listener = listener
        self.path = path
        self.pidfile = pidfile
        self.held: _Held | None = None
        self.done = False

    def serve(self) -> None:
        """Answer requests until told to exit or the held connection is gone."""
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        watched: int | None = None
        try:
            while not self.done:
                for fd, events in poller.poll():
                    if fd == self.listener.fileno():
                        self._accept()
                    elif events & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                        log.info("fuse holder: the connection is gone; exiting")
                        self.done = True
                current = self.held.fd if self.held is not None else None
                if current != watched:
                    if watched is not None:
                        poller.unregister(watched)
                    if current is not None:
                        # POLLERR is reported whatever the mask: with 0, requests queueing up
                        # while no daemon runs do not wake the holder.
                        poller.register(current, 0)
                    watched = current
        finally:
            self.close()

    def _accept(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.settimeout(_CLIENT_TIMEOUT)
            try:
                data, fds, _flags, _addr = socket.recv_fds(conn, _MAX_MESSAGE, 1)
                reply, fd = self._handle(json.loads(data) if data else {}, fds)
                message = json.dumps(reply).encode()
                if fd is None:
                    conn.send(message)
                else:
                    socket.send_fds(conn, [message], [fd])
            except (OSError, ValueError) as exc:
                log.warning("fuse holder: bad request: %s", exc)

    def _handle(self, request: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], int | None]:
        op = request.get("op")
        if op == "put" and len(fds) == 1:
            self._drop()
            self.held = _Held(fds[0], dict(request.get("state") or {}))
            return {"ok": True}, None
        for fd in fds:
            os.close(fd)
        if op == "get":
            if self.held is None:
                return {"ok": True, "state": None}, None
            return {"ok": True, "state": self.held.state}, self.held.fd
        if op == "exit":
            self.done = True
            return {"ok": True, "pid": os.getpid()}, None
        if op == "ping":
            return {"ok": True, "holding": self.held is not None}, None
        return {"ok": False, "error": f"unknown request {op!r}"}, None

    def _drop(self) -> None:
        if self.held is not None:
            os.close(self.held.fd)
            self.held = None

    def close(self) -> None:
        self._drop()
        self.listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with contextlib.suppress(FileNotFoundError):
            if self.pidfile.read_text(encoding="ascii").strip() == str(os.getpid()):
                self.pidfile.unlink()


def _listen(path: Path) -> socket.socket:
    """Bind the holder socket, replacing a stale socket file nobody listens on."""
    if running(path):
        raise Unavailable(f"fuse holder: another holder already listens on {path}")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    old = os.umask(0o177)
    try:
        sock.bind(os.fspath(path))
    finally:
        os.umask(old)
    sock.listen(8)
    return sock


def _daemonize() -> None:
    """Leave the caller's session and process group, so that a SIGKILL of the daemon's group
    does not reach the holder: setsid in the forked child, then fork again (the grandchild can
    never reacquire a terminal) and drop the standard streams."""
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(null, std)
    os.close(null)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m snapshotter.fs.holder",
        description="Hold clip's blob FUSE descriptor across daemon restarts.",
    )
    parser.add_argument("--socket", required=True, type=Path, help="unix socket to listen on")
    parser.add_argument("--pidfile", required=True, type=Path, help="file to write the pid to")
    parser.add_argument(
        "--foreground", action="store_true",
        help="do not detach (for a supervisor that keeps the holder in its own unit)",
    )
    args = parser.parse_args(argv)
    try:
        listener = _listen(args.socket)
    except (Unavailable, OSError) as exc:
        print(f"clip fuse holder: {exc}", file=sys.stderr)
        return 1
    ready: int | None = None
    if not args.foreground:
        read_end, ready = os.pipe()
        if os.fork() > 0:
            os.close(ready)
            listener.close()
            return 0 if os.read(read_end, 2) == b"ok" else 1
        os.close(read_end)
        _daemonize()
    holder = Holder(listener, args.socket, args.pidfile)
    args.pidfile.parent.mkdir(parents=True, exist_ok=True)
    args.pidfile.write_text(f"{os.getpid()}\n", encoding="ascii")
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if ready is not None:
        os.write(ready, b"ok")
        os.close(ready)
    holder.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
