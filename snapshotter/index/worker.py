"""``SideWorker``: a thread that runs a build's GIL-releasing side work in stream order.

The calling thread of a build parses tar headers, which holds the GIL; hashing file data and
compressing checkpoint windows release it. Handing those to a thread of their own lets them run
on the second core beside the parsing. Calls are recorded into a batch and handed over a batch
at a time (per piece of the stream), so the hand-over costs little per call; the queue is
bounded because each batch pins the stream pieces its arguments point into.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

_Call = tuple[Callable[[Any, Any], None], Any, Any]


class SideWorker:
    """Runs ``call(fn, a, b)`` as ``fn(a, b)`` in its own thread, in call order.

    ``flush`` hands the recorded calls over; ``close`` waits until all have run and re-raises
    what one of them raised. Every wait polls ``stop``, so a failed build never leaves the
    thread blocked.
    """

    def __init__(self, stop: threading.Event, depth: int = 2) -> None:
        self._stop = stop
        #: the calls recorded since the last flush; hot callers append to it directly
        self.pending: list[_Call] = []
        self._queue: queue.Queue[list[_Call] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="clip-index-side", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[Any, Any], None], a: Any, b: Any) -> None:
        self.pending.append((fn, a, b))

    def flush(self) -> None:
        """Hand the calls recorded so far to the thread."""
        if self.pending:
            batch = self.pending.copy()
            self.pending.clear()
            self._put(batch)

    def close(self) -> None:
        """Wait for every call; re-raises what the thread raised."""
        self.flush()
        self._put(None)
        while self._thread.is_alive() and not self._stop.is_set():
            self._thread.join(timeout=0.1)
        if self._error is not None:
            raise self._error

    def _put(self, item: list[_Call] | None) -> None:
        while not self._stop.is_set():
            if self._error is not None:
                raise self._error
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    batch = self._queue.get(timeout=0.1)
                except queue.Empty:
                    continue
                if batch is None:
                    return
                for fn, a, b in batch:
                    fn(a, b)
        except BaseException as exc:  # handed to the calling thread by flush() or close()
            self._error = exc
