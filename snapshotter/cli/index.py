"""``clip index build|ls|cat|erofs``: build a layer's index, list it, read a file through it,
turn it into an EROFS image."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from snapshotter import erofs
from snapshotter.cli.index_push import register_push
from snapshotter.erofs.inspect import Image
from snapshotter.errors import InvalidArgument, NotFound
from snapshotter.index import (
    Entry,
    EntryType,
    IndexBuildOptions,
    IndexReader,
    LayerIndex,
    build_index,
)

_TYPE_NAMES = {
    EntryType.FILE: "file",
    EntryType.DIR: "dir",
    EntryType.SYMLINK: "symlink",
    EntryType.HARDLINK: "hardlink",
    EntryType.CHAR: "char",
    EntryType.BLOCK: "block",
    EntryType.FIFO: "fifo",
}
_TYPE_BITS = {
    EntryType.FILE: stat.S_IFREG,
    EntryType.DIR: stat.S_IFDIR,
    EntryType.SYMLINK: stat.S_IFLNK,
    EntryType.HARDLINK: stat.S_IFREG,
    EntryType.CHAR: stat.S_IFCHR,
    EntryType.BLOCK: stat.S_IFBLK,
    EntryType.FIFO: stat.S_IFIFO,
}
_CAT_CHUNK = 1 << 20


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "index",
        help="build, list and read clip layer indexes",
        description="Build a clip index from a layer blob, list it, or read a file through it.",
        epilog="Example: clip index build layer.tar.gz -o layer.idx && clip index ls layer.idx",
    )
    sub = parser.add_subparsers(dest="index_command", metavar="ACTION", required=True)

    build = sub.add_parser(
        "build",
        help="build the index of a layer blob (gzip, zstd or plain tar)",
        description="Read the blob once and write its index; the output appears atomically.",
        epilog="Example: clip index build sha256-abc.tar.gz -o abc.idx --json",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    build.add_argument("blob", help="layer blob (a file, or - for stdin)")
    build.add_argument("-o", "--output", required=True, help="index file to write")
    build.add_argument("--json", action="store_true", help="print the result as one JSON object")
    defaults = IndexBuildOptions()
    build.add_argument("--checkpoint-spacing", type=int, default=defaults.checkpoint_spacing,
                       help="compressed bytes between gzip checkpoints")
    build.add_argument("--large-file-size", type=int, default=defaults.large_file_size,
                       help="files this large get a checkpoint at their start")
    build.add_argument("--chunk-size", type=int, default=defaults.chunk_size,
                       help="bytes per verification digest (multiple of 512)")
    build.set_defaults(func=_build)

    ls = sub.add_parser(
        "ls",
        help="list every entry of an index",
        description="One line per entry: type, mode, uid, gid, size, path, link target.",
        epilog="Example: clip index ls abc.idx --json | head",
    )
    ls.add_argument("index", help="index file")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    ls.set_defaults(func=_ls)

    cat = sub.add_parser(
        "cat",
        help="write a file's bytes to stdout, reading the blob from the nearest checkpoint",
        description="Random access through the index: only the needed compressed bytes are read.",
        epilog="Example: clip index cat abc.idx sha256-abc.tar.gz usr/bin/env --stats > env",
    )
    cat.add_argument("index", help="index file")
    cat.add_argument("blob", help="layer blob the index was built from")
    cat.add_argument("path", help="path of the file inside the layer")
    cat.add_argument("--stats", action="store_true",
                     help="print compressed_bytes_read and inflated_bytes as JSON to stderr")
    cat.set_defaults(func=_cat)
    register_push(sub)
    _register_erofs(sub)


def _register_erofs(sub: Any) -> None:
    erofs = sub.add_parser(
        "erofs",
        help="write the EROFS image of an index, or summarise an image",
        description="Write the layer's EROFS metadata image (deterministic: same index, same "
                    "bytes; written atomically). Mount it file-backed with the layer's "
                    "uncompressed tar as its extra device: mount -t erofs -o "
                    "ro,device=LAYER.tar IMG DIR. With --inspect, summarise an image instead.",
        epilog="Example: clip index erofs abc.idx -o abc.img (then: --inspect abc.img)",
    )
    erofs.add_argument("index", nargs="?", help="index file (not with --inspect)")
    erofs.add_argument("-o", "--output", help="image file to write")
    erofs.add_argument("--compact-mtimes", action="store_true",
                       help="give compact inodes their own mtimes (a smaller image; only kernels "
                            "6.15+ show those mtimes, older ones show the image's one base time "
                            "for every compact inode; default: off, right on every kernel)")
    erofs.add_argument("--inspect", metavar="IMG", help="summarise this image instead")
    erofs.add_argument("--json", action="store_true", help="print the result as one JSON object")
    erofs.set_defaults(func=_erofs)


def _erofs(args: argparse.Namespace) -> int:
    if args.inspect is not None:
        if args.index is not None or args.output is not None or args.compact_mtimes:
            raise InvalidArgument("--inspect takes an image only (no INDEX, -o or "
                                  "--compact-mtimes)")
        try:
            summary = Image.open(Path(args.inspect)).summary()
        except OSError as exc:
            raise NotFound(f"image {args.inspect!r}: {exc.strerror}") from None
        report = dataclasses.asdict(summary)
        if args.json:
            print(json.dumps(report))
        else:
            for key, value in report.items():
                print(f"{key}: {value}")
        return 0
    if args.index is None or args.output is None:
        raise InvalidArgument("give an INDEX and -o IMG (or --inspect IMG)")
    out = Path(args.output)
    if out.is_dir():
        raise InvalidArgument(f"output {args.output!r} is a directory")
    if not out.parent.is_dir():
        raise NotFound(f"output directory {str(out.parent)!r} does not exist")
    info = erofs.write_image(LayerIndex.open(args.index), out,
                             compact_mtime=args.compact_mtimes)
    if args.json:
        print(json.dumps({"path": str(info.path), "size": info.size, "inodes": info.inodes,
                          "blocks": info.blocks, "device_blocks": info.device_blocks,
                          "compact_mtimes": args.compact_mtimes}))
    else:
        print(f"{info.path}: {info.size} bytes, {info.inodes} inodes, {info.blocks} blocks, "
              f"device 1 = {info.device_blocks} blocks of the tar stream")
    return 0


def _build(args: argparse.Namespace) -> int:
    options = IndexBuildOptions(
        checkpoint_spacing=args.checkpoint_spacing,
        large_file_size=args.large_file_size,
        chunk_size=args.chunk_size,
    )
    out = Path(args.output)
    if out.is_dir():
        raise InvalidArgument(f"output {args.output!r} is a directory")
    if not out.parent.is_dir():
        raise NotFound(f"output directory {str(out.parent)!r} does not exist")
    if args.blob == "-":
        result = build_index(sys.stdin.buffer, out, options)
    else:
        try:
            blob = open(args.blob, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise NotFound(f"layer blob {args.blob!r}: {exc.strerror}") from None
        with blob:
            result = build_index(blob, out, options)
    if args.json:
        print(json.dumps({
            "entries": result.entries,
            "uncompressed_size": result.uncompressed_size,
            "compressed_size": result.compressed_size,
            "compression": result.compression,
            "index_size": result.index_size,
            "checkpoints": result.checkpoints,
            "seconds": round(result.seconds, 3),
            "blob_digest": result.blob_digest,
            "index_digest": result.index_digest,
        }))
    else:
        print(f"{args.output}: {result.entries} entries, {result.checkpoints} checkpoints, "
              f"{result.index_size} bytes, {result.index_digest}")
    return 0


def _entries(index: LayerIndex) -> Iterator[Entry]:
    for ordinal in range(len(index)):
        yield index.entry(ordinal)


def _ls(args: argparse.Namespace) -> int:
    index = LayerIndex.open(args.index)
    out = sys.stdout
    for e in _entries(index):
        if args.json:
            out.write(json.dumps({
                "path": e.path,
                "type": _TYPE_NAMES[e.type],
                "mode": f"{e.mode:04o}",
                "uid": e.uid,
                "gid": e.gid,
                "size": e.size,
                "mtime_ns": e.mtime_ns,
                "linkname": e.linkname,
                "nlink": e.nlink,
                "devmajor": e.devmajor,
                "devminor": e.devminor,
                "xattrs": sorted(e.xattrs),
            }) + "\n")
        else:
            perms = stat.filemode(_TYPE_BITS[e.type] | e.mode)
            link = f" -> {e.linkname}" if e.linkname else ""
            if e.type is EntryType.HARDLINK:
                link = f" link to {e.linkname}"
            out.write(f"{perms} {e.mode:04o} {e.uid}/{e.gid} {e.size:>10} "
                      f"{e.path or '.'}{link}\n")
    return 0


def _cat(args: argparse.Namespace) -> int:
    index = LayerIndex.open(args.index)
    if not os.path.exists(args.blob):
        raise NotFound(f"layer blob {args.blob!r} does not exist")
    if os.path.getsize(args.blob) != index.compressed_size:
        raise InvalidArgument(
            f"layer blob {args.blob!r} is {os.path.getsize(args.blob)} bytes but the index "
            f"was built from a {index.compressed_size}-byte blob"
        )
    ordinal = index.lookup(args.path)
    if ordinal is None:
        raise NotFound(f"{args.path!r} is not in the layer")
    entry = index.entry(ordinal)
    if entry.type is EntryType.HARDLINK:
        entry = index.entry(entry.link_target)
    if entry.type is not EntryType.FILE:
        raise InvalidArgument(f"{args.path!r} is a {_TYPE_NAMES[entry.type]}, not a file")
    out = sys.stdout.buffer
    with IndexReader(index, args.blob) as reader:
        for offset in range(0, entry.size, _CAT_CHUNK):
            out.write(reader.read(entry.ordinal, offset, _CAT_CHUNK))
        out.flush()
        if args.stats:
            print(json.dumps({
                "compressed_bytes_read": reader.compressed_bytes_read,
                "inflated_bytes": reader.inflated_bytes,
            }), file=sys.stderr)
    return 0
