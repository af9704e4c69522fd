"""Raw access to an index's entry records, for code that walks every entry once.

``LayerIndex.entry()`` builds an ``Entry`` per call (about 1.7 us); the EROFS writer needs every
record of the layer and would spend most of its time there. ``Records`` hands out the raw
record tuples (the layout is ``snapshotter.index.format.ENTRY``): a pass is one
``iter_unpack`` and a single record one ``unpack_from``, so no pass keeps them all (a list of
every record of a 50,000-entry layer is ~22 MB of tuples). Names are sliced straight from the
string table and kept, as the writer looks them up at random (bisect among siblings). It
reads the index's body through the reader's private fields, so it lives next to its one other
user of the same facts, the FUSE tree's hardlink-owner rule (``link_owners``).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from operator import itemgetter
from typing import Final

from snapshotter.index import EntryType, LayerIndex
from snapshotter.index import format as fmt

# Positions in an ENTRY record tuple (see snapshotter/index/format.py).
PATH_OFF, PATH_LEN, NAME_LEN, PARENT, TYPE, MODE, UID, GID, SIZE, MTIME = range(10)
UOFF, LINK_OFF, LINK_LEN, LINK_TARGET, NLINK, MAJOR, MINOR, X_FIRST, X_COUNT = range(10, 19)
FIRST_CHILD, CHILD_COUNT = 19, 20

HARDLINK: Final = int(EntryType.HARDLINK)

Record = tuple[int, ...]

_UNPACK = fmt.ENTRY.unpack_from
#: The leading fields of every ENTRY (path_off, path_len, name_len), then the rest skipped.
_NAME_FIELDS = struct.Struct("<III" + f"{fmt.ENTRY.size - 12}x")
_TYPE_FIELD = struct.Struct(f"<16xB{fmt.ENTRY.size - 17}x")
#: ENTRY's mtime_ns alone, for ``Records.column``.
MTIME_FIELD: Final = struct.Struct(f"<36xq{fmt.ENTRY.size - 44}x")
_FIRST = itemgetter(0)


class Records:
    """The entry records of one index, unpacked per pass or per record, and its names."""

    def __init__(self, index: LayerIndex) -> None:
        self.index = index
        data = index._data
        self._entries = memoryview(data)[: len(index) * fmt.ENTRY.size]
        base = index._str_base
        self.names: list[bytes] = [
            data[base + off + length - name : base + off + length]
            for off, length, name in _NAME_FIELDS.iter_unpack(self._entries)
        ]
        #: Every entry's type code, one byte each (``bytes.translate`` maps them at C speed).
        self.types = bytes(map(_FIRST, _TYPE_FIELD.iter_unpack(self._entries)))

    def __iter__(self) -> Iterator[Record]:
        """Every record in ordinal order, each tuple made as the pass reaches it."""
        return fmt.ENTRY.iter_unpack(self._entries)

    def record(self, ordinal: int) -> Record:
        return _UNPACK(self._entries, ordinal * fmt.ENTRY.size)

    def column(self, field: struct.Struct) -> Iterator[int]:
        """One field of every record in ordinal order; ``field`` is a struct of ENTRY's size
        with every other byte skipped (a pass of 1-tuples is several times cheaper than one
        of whole records)."""
        return map(_FIRST, field.iter_unpack(self._entries))

    def hardlinks(self) -> list[int]:
        """The ordinals of the hardlink entries, in order."""
        out, types, start = [], self.types, 0
        while (start := types.find(HARDLINK, start)) >= 0:
            out.append(start)
            start += 1
        return out

    @property
    def strings_len(self) -> int:
        return len(self.index._data) - int(self.index._str_base)

    def string(self, off: int, length: int) -> bytes:
        start = self.index._str_base + off
        return self.index._data[start : start + length]

    def link_owners(self) -> dict[int, tuple[int, int]]:
        """``link_owners`` over these records."""
        return _owners((o, self.record(o)) for o in self.hardlinks())


def _owners(links: Iterable[tuple[int, Record]]) -> dict[int, tuple[int, int]]:
    """The rule ``link_owners`` describes over (ordinal, record) of every hardlink entry."""
    best: dict[int, tuple[tuple[int, int], int, int]] = {}
    for ordinal, r in links:
        if r[LINK_TARGET] >= 0:
            key = (r[UOFF], ordinal)
            old = best.get(r[LINK_TARGET])
            if old is None or key > old[0]:
                best[r[LINK_TARGET]] = (key, r[UID], r[GID])
    return {target: (uid, gid) for target, (_key, uid, gid) in best.items()}


def link_owners(index: LayerIndex) -> dict[int, tuple[int, int]]:
    """Hardlink target ordinal -> the (uid, gid) its shared inode ends with.

    containerd's applier creates a hardlink entry with link(2) and then lchowns the path, i.e.
    the shared inode, to the link entry's uid/gid: the last entry of the group in tar order
    wins. A hardlink always comes after its target in the tar, so with one link the link's owner
    is the answer. The index does not record the tar order of hardlink entries (their ``uoff``
    is 0 today), so among several links of one target the one with the highest ``(uoff,
    ordinal)`` is taken: exact if a later index format records the link's tar position in
    ``uoff``, otherwise the last one in path order (see docs/erofs.md)."""
    return Records(index).link_owners()
