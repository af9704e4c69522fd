"""One layer's compressed bytes as fetches see them: held, in flight, and the gaps to request.

Why this exists: the read path single-flights *uncompressed* blocks, but a flight needs
the *compressed* bytes from a restart place (an index checkpoint or a recorded resume point)
before its blocks to the end of the deflate block after them. Two flights for neighbouring
blocks therefore need overlapping compressed ranges: concurrent ones start at the same
checkpoint, and a later one restarts at a place before the end of what the earlier one fetched.
Requested as they are, those overlaps cross the network twice (measured on the bench: 139.7 MB
served for 117.1 MB of distinct compressed bytes).

`LayerRanges.fetching(coff, cend, request)` assembles [coff, cend) from, in this order:

- *held* pieces: compressed bytes an earlier flight fetched but did not use up (the read path
  holds the part after the place the next flight restarts from, and the part a neighbour just
  before it still needs), in a small per-layer LRU bounded in bytes (`limit`), dropped when the
  layer is closed;
- *in flight* requests another flight made: this flight waits for them (if such a request
  fails, this flight requests those bytes itself, once). A request stays visible until the
  flight that made it has inflated its bytes and held what neighbours need, so there is no
  moment between "answered" and "held" in which a neighbour would ask again;
- *gaps*, requested from the source. They are registered as in flight before anything is
  awaited, so a flight planned meanwhile waits for them instead of asking again.

While bytes are in flight or held, no two source requests of a layer overlap. What is neither
(held bytes evicted by the bound, bytes dropped after use) can be requested again; the read
path holds what a following flight will need, so a sequential pass requests each compressed
byte once. A flight that waits for another's bytes still inflates from its own restart place:
that costs CPU, not network.

Trio thread only (no locks): every method runs in the read path's trio loop.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import trio

from snapshotter.index import Checkpoint, ResumePoint

#: A place inflation can restart.
Start = Checkpoint | ResumePoint
#: Held compressed bytes per layer: flights' heads and tails (each well under 1 MiB) that
#: still-missing blocks need. The bench's scattered start (a profile of 25-30 blocks and 60
#: random reads while the pass runs) peaks at 5-6 MB; at 4 MiB it evicted pieces the pass
#: needed later (1.09-1.12x the blob on one layer instead of 1.000x).
HOLD_LIMIT = 8 << 20

#: Requests `length` compressed bytes at `coff` from the layer's source.
Request = Callable[[int, int], Awaitable[bytes]]


class RangeFailed(Exception):
    """A request this fetch relied on failed (its message says why)."""


@dataclass(eq=False, slots=True)
class _InFlight:
    start: int
    end: int
    done: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: str = ""
    exc: Exception | None = None


#: A slice [start, end) of held bytes `data` that begin at `base`.
_Held = tuple[int, int, bytes, int]


@dataclass(slots=True)
class RangeStats:
    """What a layer's fetches asked for: `requested` crossed the network, `reused` did not."""

    requests: int = 0
    requested: int = 0
    reused: int = 0


class LayerRanges:
    """Held and in-flight compressed ranges of one layer (see the module doc)."""

    def __init__(self, limit: int = HOLD_LIMIT) -> None:
        self.limit = limit
        self.stats = RangeStats()
        self._held: OrderedDict[int, bytes] = OrderedDict()  # start -> bytes, LRU first
        self._held_bytes = 0
        #: Restart places at the start of held pieces (start -> place): kept with the bytes,
        #: so the layer's bounded resume points may forget them meanwhile.
        self._restarts: dict[int, Start] = {}
        #: Per held piece, what it is still needed for (any true: keep); absent: always.
        self._needed: dict[int, list[Callable[[], bool]]] = {}
        self._inflight: list[_InFlight] = []

    @property
    def held_bytes(self) -> int:
        return self._held_bytes

    def hold(
        self, start: int, data: bytes, restart: Start | None = None,
        needed: Callable[[], bool] | None = None,
    ) -> None:
        """Keep `data` (compressed bytes at `start`) for a later fetch, within `limit`.

        `restart`: the place inflation restarts at `start`, when it is one. `needed()`: whether
        the piece can still serve a fetch (the blocks it is for are still missing): pieces no
        longer needed are dropped at every hold; over the limit, the least recently used go."""
        if not data or len(data) > self.limit:
            return
        old = self._held.get(start)
        if old is not None and len(old) >= len(data):  # same blob bytes: the longer holds both
            self._held.move_to_end(start)
        else:
            if old is not None:
                self._held_bytes -= len(self._held.pop(start))
            self._held[start] = data
            self._held_bytes += len(data)
        if restart is not None:
            self._restarts[start] = restart
        if old is None or start in self._needed:  # a piece held without `needed` stays so
            if needed is None:
                self._needed.pop(start, None)
            else:
                self._needed.setdefault(start, []).append(needed)
        for s in [s for s, checks in self._needed.items() if not any(c() for c in checks)]:
            self._drop(s)
        while self._held_bytes > self.limit:
            self._drop(next(iter(self._held)))

    def restart_before(self, uoff: int) -> Start | None:
        """The held restart place nearest at or before stream offset `uoff`, if any."""
        places = [p for p in self._restarts.values() if p.uoff <= uoff]
        return max(places, key=lambda p: p.uoff, default=None)

    def discard(self, start: int, end: int) -> None:
        """Forget held and answered bytes overlapping [start, end) (they did not verify or
        inflate), so the next try requests them again."""
        for s in [s for s, d in self._held.items() if s < end and s + len(d) > start]:
            self._drop(s)
        self._inflight = [f for f in self._inflight
                          if f.data is None or f.end <= start or f.start >= end]

    def _drop(self, start: int) -> None:
        self._held_bytes -= len(self._held.pop(start))
        self._restarts.pop(start, None)
        self._needed.pop(start, None)

    def clear(self) -> None:
        self._held.clear()
        self._restarts.clear()
        self._needed.clear()
        self._held_bytes = 0

    @contextlib.asynccontextmanager
    async def fetching(self, coff: int, cend: int, request: Request) -> AsyncIterator[bytes]:
        """Compressed bytes [coff, cend): held ones, others' in-flight ones, the gaps requested
        (concurrently) from `request`. Raises what a gap request raised, or RangeFailed.

        The gaps this fetch requested stay visible to other fetches (as in flight, answered)
        until the block exits, i.e. while the caller inflates them and decides what to `hold`:
        a fetch planned meanwhile takes them instead of requesting them again."""
        mine: list[_InFlight] = []
        try:
            yield b"".join(await self._collect(coff, cend, request, mine, retry=True))
        finally:
            for gap in mine:
                if gap in self._inflight:
                    self._inflight.remove(gap)

    async def _collect(
        self, coff: int, cend: int, request: Request, mine: list[_InFlight], retry: bool
    ) -> list[bytes]:
        pieces, gaps = self._pieces(coff, cend)
        mine.extend(gaps)
        if gaps:
            async with trio.open_nursery() as nursery:
                for gap in gaps:
                    nursery.start_soon(self._request, gap, request)
            failed = next((g.exc for g in gaps if g.exc is not None), None)
            if failed is not None:
                raise failed
        out: list[bytes] = []
        for piece in pieces:
            if isinstance(piece, tuple):
                start, end, data, base = piece
                out.append(data[start - base : end - base])
                self.stats.reused += end - start
                continue
            await piece.done.wait()
            lo, hi = max(coff, piece.start), min(cend, piece.end)
            if piece.data is not None:
                out.append(piece.data[lo - piece.start : hi - piece.start])
                if piece not in gaps:
                    self.stats.reused += hi - lo
            elif retry:  # another fetch's request failed: ask for those bytes ourselves, once
                out.extend(await self._collect(lo, hi, request, mine, retry=False))
            else:
                raise RangeFailed(piece.error)
        return out

    async def _request(self, gap: _InFlight, request: Request) -> None:
        """Run one gap request; whoever waits for it is woken however it ends. Its error is kept
        in `gap.exc` (not raised here, so sibling gaps finish and the caller sees the error
        itself rather than an exception group); a failed gap is forgotten at once."""
        gap.error = f"request of compressed bytes {gap.start}..{gap.end} was cancelled"
        try:
            self.stats.requests += 1
            self.stats.requested += gap.end - gap.start
            gap.data = await request(gap.start, gap.end - gap.start)
        except Exception as exc:
            gap.error = f"request of compressed bytes {gap.start}..{gap.end} failed: {exc}"
            gap.exc = exc
        finally:
            if gap.data is None:
                self._inflight.remove(gap)
            gap.done.set()

    def _pieces(self, coff: int, cend: int) -> tuple[list[_Held | _InFlight], list[_InFlight]]:
        """Cover [coff, cend) with held slices, in-flight requests and new gap requests
        (registered as in flight at once, so concurrent fetches see them). Returns the pieces
        in order and the new gaps."""
        pieces: list[_Held | _InFlight] = []
        gaps: list[_InFlight] = []
        pos = coff
        while pos < cend:
            held = self._held_at(pos)
            if held is not None:
                base, data = held
                end = min(cend, base + len(data))
                pieces.append((pos, end, data, base))
                self._held.move_to_end(base)
                pos = end
                continue
            flying = next((f for f in self._inflight if f.start <= pos < f.end), None)
            if flying is not None:
                pieces.append(flying)
                pos = min(cend, flying.end)
                continue
            gap = _InFlight(pos, self._next_start(pos, cend))
            self._inflight.append(gap)
            gaps.append(gap)
            pieces.append(gap)
            pos = gap.end
        return pieces, gaps

    def _held_at(self, pos: int) -> tuple[int, bytes] | None:
        """The held piece covering `pos` that reaches furthest, if any."""
        best: tuple[int, bytes] | None = None
        for base, data in self._held.items():
            if base <= pos < base + len(data) and (
                best is None or base + len(data) > best[0] + len(best[1])
            ):
                best = (base, data)
        return best

    def _next_start(self, pos: int, cend: int) -> int:
        """Where the gap starting at `pos` ends: the next held or in-flight piece, or `cend`."""
        starts = [s for s in self._held if pos < s < cend]
        starts += [f.start for f in self._inflight if pos < f.start < cend]
        return min(starts, default=cend)
