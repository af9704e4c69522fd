"""The explicit bridge between the trio thread (pyfuse3) and the asyncio loop (gRPC, aiohttp).

pyfuse3 only runs on trio; grpcio's asyncio server and aiohttp only run on asyncio. Each loop keeps
its own thread and neither ever blocks waiting for the other: a call across the bridge schedules
the work on the other loop and parks the calling *task* (not the thread) until a thread-safe
callback delivers the outcome. Cancellation travels across too, so a FUSE read that times out on
the trio side also cancels the registry request it was waiting for on the asyncio side.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")
log = logging.getLogger(__name__)


class Bridge:
    """Runs coroutines of one loop from tasks of the other.

    Built with the asyncio loop; the trio side registers itself with `bind_trio` from inside its
    `trio.run` (LayerFS does that when the FUSE loop starts).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._trio_token: trio.lowlevel.TrioToken | None = None

    def bind_trio(self) -> None:
        """Record the running trio loop; must be called from inside it."""
        self._trio_token = trio.lowlevel.current_trio_token()

    def unbind_trio(self) -> None:
        self._trio_token = None

    async def to_asyncio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """From trio: run `fn(*args)` as an asyncio task and await its result without blocking.

        Cancelling the trio task cancels the asyncio task.
        """
        if self.loop.is_closed():
            raise RuntimeError("asyncio loop of the bridge is closed")
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()

        async def run() -> T:
            return await fn(*args)

        future = asyncio.run_coroutine_threadsafe(run(), self.loop)

        def wake(_: concurrent.futures.Future[T]) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(done.set)

        future.add_done_callback(wake)
        try:
            await done.wait()
        except BaseException:
            future.cancel()
            raise
        return future.result()

    def call_in_trio(self, fn: Callable[..., object], *args: Any) -> None:
        """From any thread: run the synchronous `fn(*args)` soon in the trio thread (e.g. to
        start a task there). Its exceptions are logged, never allowed to end the trio loop."""
        token = self._trio_token
        if token is None:
            raise RuntimeError("no trio loop is bound to the bridge")

        def call() -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("bridge: %s failed in the trio thread", getattr(fn, "__name__", fn))

        token.run_sync_soon(call)

    async def to_trio(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """From asyncio: run `fn(*args)` as a trio system task and await its result.

        Cancelling the asyncio task cancels the trio task.
        """
        token = self._trio_token
        if token is None:
            raise RuntimeError("no trio loop is bound to the bridge")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        scope_box: list[trio.CancelScope] = []

        def deliver(result: outcome.Outcome[T]) -> None:
            if future.cancelled():
                return
            if isinstance(result, outcome.Error):
                future.set_exception(result.error)
            else:
                future.set_result(result.unwrap())

        async def runner() -> None:
            with trio.CancelScope() as scope:
                scope_box.append(scope)
                result = await outcome.acapture(fn, *args)
            cancelled = isinstance(result, outcome.Error) and isinstance(
                result.error, trio.Cancelled
            )
            try:
                if cancelled:
                    loop.call_soon_threadsafe(future.cancel)
                else:
                    loop.call_soon_threadsafe(deliver, result)
            except RuntimeError:  # the asyncio loop closed meanwhile: nobody is waiting
                pass

        def start() -> None:
            trio.lowlevel.spawn_system_task(runner)

        token.run_sync_soon(start)
        try:
            return await future
        except asyncio.CancelledError:
            if scope_box:
                token.run_sync_soon(scope_box[0].cancel)
            raise


class AsyncioThread:
    """An asyncio loop in a daemon thread, for callers whose main thread is not asyncio (tests,
    `clip index cat`-style tools). The daemon runs asyncio in its main thread instead."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="clip-asyncio", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def close(self) -> None:
        """Stop the loop and join its thread."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()
