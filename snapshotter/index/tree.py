"""Turning the tar's member sequence into the index's directory tree.

Tar semantics kept here: a later member with the same path wins (a directory over a directory
only updates the metadata; anything else replaces the old node and its subtree), missing
parent directories are synthesised, hardlinks resolve to the node their target names at that
moment. Entries are then numbered breadth-first with siblings sorted by name bytes, so every
directory's children are one contiguous, sorted run of ordinals: listing is a range and lookup
is a binary search, with no separate children table.
"""

from __future__ import annotations

from snapshotter.index import _native
from snapshotter.index.model import EntryType, LayerFormatError
from snapshotter.index.tarscan import Member, normalise
from snapshotter.index.writer import Entries

_DIR, _HARDLINK = EntryType.DIR, EntryType.HARDLINK  # globals: cheaper than enum attributes


class Node:
    """A mutable tree node; ``member`` is None only for synthesised directories and the root.

    Only directories get a ``children`` dict of their own (files share an empty one that is
    never written), and ``links`` exists only on nodes that hardlinks point at: a layer has
    tens of thousands of nodes, so per-node allocations matter.
    """

    __slots__ = (
        "children",
        "link",
        "links",
        "member",
        "name",
        "ordinal",
        "parent",
        "type",
    )

    def __init__(self, name: bytes, member: Member | None, etype: EntryType,
                 parent: Node | None) -> None:
        self.name = name
        self.member = member
        self.type = etype
        self.parent = parent
        self.children: dict[bytes, Node] = {} if etype is _DIR else _LEAF
        self.link: Node | None = None  # HARDLINK: the node it shares an inode with
        self.links: list[Node] | None = None  # hardlinks pointing here
        self.ordinal = -1  # set by Tree.encode()


_LEAF: dict[bytes, Node] = {}  # the children of every non-directory: always empty


def _name(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


class Tree:
    def __init__(self) -> None:
        self.root = Node(b"", None, EntryType.DIR, None)
        self.count = 1
        # members usually arrive directory by directory: remember the last parent found
        self._last_dir: tuple[str, Node] | None = None

    def add(self, member: Member) -> None:
        if member.path == "":
            if member.type is not EntryType.DIR:
                raise LayerFormatError(f"layer entry {member.raw_path!r}: root is not a directory")
            self.root.member = member
            return
        dir_path, _, leaf = member.path.rpartition("/")
        if self._last_dir is not None and self._last_dir[0] == dir_path:
            parent = self._last_dir[1]
        else:
            parent = self._parent_dir(dir_path.split("/") if dir_path else [], member)
            self._last_dir = (dir_path, parent)
        name = _name(leaf)
        link = self._link_node(member) if member.type is _HARDLINK else None
        old = parent.children.get(name)
        if old is not None:
            if old.type is _DIR and member.type is _DIR:
                old.member = member
                return
            self._remove(old)
        node = Node(name, member, member.type, parent)
        if link is not None:
            node.link = link
            if link.links is None:
                link.links = []
            link.links.append(node)
        parent.children[name] = node
        self.count += 1

    def _parent_dir(self, parts: list[str], member: Member) -> Node:
        node = self.root
        for comp in parts:
            key = _name(comp)
            child = node.children.get(key)
            if child is None:
                child = Node(key, None, EntryType.DIR, node)
                node.children[key] = child
                self.count += 1
            elif child.type is not EntryType.DIR:
                raise LayerFormatError(
                    f"layer entry {member.raw_path!r}: parent {comp!r} is not a directory"
                )
            node = child
        return node

    def _link_node(self, member: Member) -> Node:
        target = normalise(member.linkname, f"hardlink {member.raw_path!r} ->")
        member.linkname = target
        node: Node | None = self.root
        for comp in target.split("/") if target else []:
            node = node.children.get(_name(comp)) if node is not None else None
        if node is None or node is self.root:
            raise LayerFormatError(
                f"layer entry {member.raw_path!r}: hardlink target {target!r} "
                "is not in the layer"
            )
        if node.type is EntryType.DIR:
            raise LayerFormatError(
                f"layer entry {member.raw_path!r}: hardlink to directory {target!r}"
            )
        return node.link if node.link is not None else node

    def _remove(self, node: Node) -> None:
        """Detach ``node`` (and its subtree); hardlinks to it keep the old inode alive."""
        assert node.parent is not None
        self._last_dir = None
        del node.parent.children[node.name]
        self.count -= 1
        if node.link is not None:
            assert node.link.links is not None
            node.link.links.remove(node)
        elif node.links:
            heir = node.links[0]
            heir.link = None
            heir.type = node.type
            assert heir.member is not None and node.member is not None
            # The heir takes over the old inode's member (its type, data and device, and the
            # digests the side worker may still be adding to that very object), under its
            # own name and metadata.
            old, own = node.member, heir.member
            old.path, old.raw_path, old.xattrs = own.path, own.raw_path, own.xattrs
            old.mode, old.uid, old.gid, old.mtime_ns = own.mode, own.uid, own.gid, own.mtime_ns
            if old.type is not EntryType.SYMLINK:
                old.linkname = ""
            heir.member = old
            heir.links = node.links[1:]
            for other in heir.links:
                other.link = heir
        for child in list(node.children.values()):
            self._remove(child)

    def encode(self) -> Entries:
        """The index's entry records, xattrs, digests and strings (``_native.encode_tree``):
        nodes numbered breadth-first from the root, siblings by name bytes, so that every
        directory's children are one contiguous, sorted run of ordinals. Runs once every
        member has been added and digested, on one core after the stream has ended, so it is
        native code (it was 0.1 s of Python on a 40k-entry layer). It leaves the tree's
        reference cycles (parent <-> children, hardlink <-> target) broken, so reference
        counting frees the tree at once instead of a full garbage collection later; the tree
        is empty afterwards."""
        encoded = _native.encode_tree(self.root, _LEAF, LayerFormatError)
        self.root = Node(b"", None, EntryType.DIR, None)
        self._last_dir = None
        return Entries(*encoded)
