"""The trio <-> asyncio bridge: results, errors, cancellation both ways, and no loop blocking."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import trio

from snapshotter.bridge import AsyncioThread, Bridge


@pytest.fixture
def aio() -> Iterator[AsyncioThread]:
    thread = AsyncioThread()
    try:
        yield thread
    finally:
        thread.close()


def test_trio_calls_asyncio(aio: AsyncioThread) -> None:
    bridge = Bridge(aio.loop)
    started = threading.Event()
    cancelled_on_asyncio = threading.Event()

    async def double(x: int) -> int:
        await asyncio.sleep(0)
        assert asyncio.get_running_loop() is aio.loop
        return 2 * x

    async def fail() -> None:
        raise ValueError("boom")

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled_on_asyncio.set()
            raise

    async def main() -> None:
        assert await bridge.to_asyncio(double, 21) == 42
        with pytest.raises(ValueError, match="boom"):
            await bridge.to_asyncio(fail)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bridge.to_asyncio, forever)
            # this task runs on while another waits on asyncio: the loop is not blocked
            await trio.to_thread.run_sync(started.wait)
            nursery.cancel_scope.cancel()
        await trio.to_thread.run_sync(cancelled_on_asyncio.wait)

    trio.run(main)
    assert cancelled_on_asyncio.is_set()


def test_asyncio_calls_trio(aio: AsyncioThread) -> None:
    bridge = Bridge(aio.loop)
    ready = threading.Event()
    started = threading.Event()
    cancelled_on_trio = threading.Event()
    stop: list[tuple[trio.Event, trio.lowlevel.TrioToken]] = []

    async def trio_main() -> None:
        bridge.bind_trio()
        stop.append((trio.Event(), trio.lowlevel.current_trio_token()))
        ready.set()
        await stop[0][0].wait()

    thread = threading.Thread(target=trio.run, args=(trio_main,))
    thread.start()
    try:
        assert ready.wait(5)

        async def add(a: int, b: int) -> int:
            await trio.sleep(0)
            trio.lowlevel.current_trio_token()  # raises unless we run on trio
            return a + b

        async def fail() -> None:
            raise KeyError("nope")

        async def forever() -> None:
            started.set()
            try:
                await trio.sleep_forever()
            finally:
                cancelled_on_trio.set()

        async def main() -> None:
            assert await bridge.to_trio(add, 2, 3) == 5
            with pytest.raises(KeyError):
                await bridge.to_trio(fail)
            waiting = asyncio.create_task(bridge.to_trio(forever))
            await asyncio.to_thread(started.wait)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting

        asyncio.run_coroutine_threadsafe(main(), aio.loop).result(10)
        assert cancelled_on_trio.wait(5)
    finally:
        for event, token in stop:
            trio.from_thread.run_sync(event.set, trio_token=token)
        thread.join(5)


def test_to_trio_without_binding(aio: AsyncioThread) -> None:
    bridge = Bridge(aio.loop)

    async def noop() -> None:
        return None

    async def main() -> None:
        with pytest.raises(RuntimeError, match="no trio loop"):
            await bridge.to_trio(noop)

    asyncio.run_coroutine_threadsafe(main(), aio.loop).result(5)
