"""The trio <-> asyncio bridge: results, errors, cancellation both ways, and no loop blocking."""

from __future__ import annotations

import asyncio
import threading
import time
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
    cancelled_on_asyncio = threading.Event()

    async def double(x: int) -> int:
        await asyncio.sleep(0.01)
        assert asyncio.get_running_loop() is aio.loop
        return 2 * x

    async def fail() -> None:
        raise ValueError("boom")

    async def forever() -> None:
        try:
            await asyncio.sleep(100)
        except asyncio.CancelledError:
            cancelled_on_asyncio.set()
            raise

    async def main() -> None:
        assert await bridge.to_asyncio(double, 21) == 42
        with pytest.raises(ValueError, match="boom"):
            await bridge.to_asyncio(fail)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            start = time.monotonic()
            with trio.move_on_after(0.3):
                await bridge.to_asyncio(forever)
            assert time.monotonic() - start < 2
            nursery.cancel_scope.cancel()
        assert ticks >= 5, "the trio loop was blocked while waiting on asyncio"

    trio.run(main)
    assert cancelled_on_asyncio.wait(5)


def test_asyncio_calls_trio(aio: AsyncioThread) -> None:
    bridge = Bridge(aio.loop)
    ready = threading.Event()
    stop = threading.Event()
    cancelled_on_trio = threading.Event()

    async def trio_main() -> None:
        bridge.bind_trio()
        ready.set()
        while not stop.is_set():
            await trio.sleep(0.01)

    thread = threading.Thread(target=trio.run, args=(trio_main,))
    thread.start()
    try:
        assert ready.wait(5)

        async def add(a: int, b: int) -> int:
            await trio.sleep(0.01)
            trio.lowlevel.current_trio_token()  # raises unless we run on trio
            return a + b

        async def fail() -> None:
            raise KeyError("nope")

        async def forever() -> None:
            try:
                await trio.sleep_forever()
            finally:
                cancelled_on_trio.set()

        async def main() -> None:
            assert await bridge.to_trio(add, 2, 3) == 5
            with pytest.raises(KeyError):
                await bridge.to_trio(fail)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(bridge.to_trio(forever), 0.2)

        asyncio.run_coroutine_threadsafe(main(), aio.loop).result(10)
        assert cancelled_on_trio.wait(5)
    finally:
        stop.set()
        thread.join(5)


def test_to_trio_without_binding(aio: AsyncioThread) -> None:
    bridge = Bridge(aio.loop)

    async def noop() -> None:
        return None

    async def main() -> None:
        with pytest.raises(RuntimeError, match="no trio loop"):
            await bridge.to_trio(noop)

    asyncio.run_coroutine_threadsafe(main(), aio.loop).result(5)
