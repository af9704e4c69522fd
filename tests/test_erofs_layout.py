"""The EROFS image writer without mounting: determinism, superblock and device table, inode
forms and times (with and without compact mtimes), directory entry order and blocks, file data
addressed through the device table's mapped range, xattr name indexes, inline and block
symlinks, and the refusals (one line naming digest, entry and reason; nothing
left behind). The kernel reads the same images in test_erofs_mount.py."""

from __future__ import annotations

import json
import os
import stat
import tarfile
from pathlib import Path

import pytest
from erofs_helpers import SIZE_OFFSET, UOFF_OFFSET, Layer, index_of, make_layer, patched_index
from fs_layers import CAPABILITY, M, rich_members

from snapshotter.cli import main
from snapshotter.erofs import ErofsError, ImageInfo, image_bytes, write_image
from snapshotter.erofs import format as ef
from snapshotter.erofs.inspect import Image
from snapshotter.errors import InvalidArgument
from snapshotter.index import EntryType, LayerIndex


@pytest.fixture
def rich(tmp_path: Path) -> Layer:
    return make_layer(tmp_path, "rich", rich_members(big=3 << 20))


def test_same_index_same_bytes(rich: Layer, tmp_path: Path) -> None:
    first = image_bytes(rich.index)
    assert image_bytes(rich.index) == first == rich.image.read_bytes()
    (tmp_path / "again").mkdir()
    again = make_layer(tmp_path / "again", "rich", rich_members(big=3 << 20))
    assert again.image.read_bytes() == first  # a rebuilt index gives the same image
    info = write_image(rich.index, tmp_path / "copy.img")
    assert info == ImageInfo(tmp_path / "copy.img", len(first), info.inodes, len(first) // 512,
                             -(-rich.index.uncompressed_size // 512))
    assert sorted(os.listdir(tmp_path / "again")) == ["rich.idx", "rich.img", "rich.tar",
                                                      "rich.tgz"]


def test_superblock_and_device_table(rich: Layer) -> None:
    img = Image.open(rich.image)
    assert img.blkszbits == 9 and img.meta_blkaddr == 0
    assert img.checksum_ok()
    assert img.feature_compat == ef.COMPAT_SB_CHKSUM
    assert img.feature_incompat == ef.INCOMPAT_DEVICE_TABLE
    assert img.extra_devices == 1
    device_blocks = -(-rich.tar.stat().st_size // 512)
    assert img.devices() == [(rich.index.blob_digest.removeprefix("sha256:"), device_blocks,
                              0xFFFFFFFF - device_blocks)]  # mapped at the top, below NULL_ADDR
    assert img.blocks * 512 == rich.image.stat().st_size
    assert img.root_nid == (1024 + 128 + 128) // 32  # right after the superblock and slot
    tree = img.walk()
    assert img.inos == len({i.nid for i in tree.values()})
    # one bit flipped in the superblock is caught by the checksum
    data = bytearray(rich.image.read_bytes())
    data[1024 + 36] ^= 1
    assert not Image(bytes(data)).checksum_ok()


FORMS = [
    M("same-a", data=b"a", mtime=1_700_000_000),
    M("same-b", data=b"b", mtime=1_700_000_000),
    M("same-c", data=b"", mtime=1_700_000_000),
    M("later", data=b"l", mtime=1_700_000_009),
    M("other-time", data=b"x", mtime=1_600_000_000.25),
    M("big-uid", data=b"x", mtime=1_700_000_000, uid=100_000, gid=4_000_000_000),
    M("old", data=b"x", mtime=-86_400),
]


def test_inode_forms_and_times_without_compact_mtimes(tmp_path: Path) -> None:
    img = Image.open(make_layer(tmp_path, "forms", FORMS).image)
    tree = img.walk()
    assert (img.epoch, img.fixed_nsec) == (1_700_000_000, 0)  # the most common mtime
    for name in (b"same-a", b"same-b", b"same-c"):
        assert not tree[name].extended and tree[name].rel_mtime == 0
        assert tree[name].mtime_ns == 1_700_000_000 * 10**9
    for name in (b"later", b"other-time", b"old"):  # their own time: extended
        assert tree[name].extended
    assert tree[b"later"].mtime_ns == 1_700_000_009 * 10**9
    assert tree[b"other-time"].mtime_ns == 1_600_000_000_250_000_000
    assert tree[b"old"].mtime_ns == -86_400 * 10**9
    assert tree[b"big-uid"].extended and (tree[b"big-uid"].uid, tree[b"big-uid"].gid) == (
        100_000, 4_000_000_000)
    assert tree[b"same-c"].layout == ef.LAYOUT_FLAT_PLAIN and tree[b"same-c"].size == 0
    assert img.summary().compact_own_mtimes == 0  # right on every kernel


def test_inode_forms_and_times_with_compact_mtimes(tmp_path: Path) -> None:
    img = Image.open(make_layer(tmp_path, "forms", FORMS, compact_mtime=True).image)
    tree = img.walk()
    # the most common nanoseconds (0), the epoch at the earliest second with them
    assert (img.epoch, img.fixed_nsec) == (-86_400, 0)
    for name, sec in ((b"same-a", 1_700_000_000), (b"same-c", 1_700_000_000),
                      (b"later", 1_700_000_009), (b"old", -86_400)):
        assert not tree[name].extended, name
        assert tree[name].rel_mtime == sec + 86_400 and tree[name].mtime_ns == sec * 10**9
    other = tree[b"other-time"]  # nanoseconds of its own: extended
    assert other.extended and other.mtime_ns == 1_600_000_000_250_000_000
    assert tree[b"big-uid"].extended
    assert img.summary().compact_own_mtimes >= 5


def test_compact_mtimes_use_the_densest_2_32_second_window(tmp_path: Path) -> None:
    """Seconds spread wider than a compact inode's 32-bit i_mtime: the epoch starts the window
    holding most of them; the rest are extended. Nanoseconds shared by most entries win."""
    members = [M("ancient", data=b"a", mtime=-(1 << 33))]
    members += [M(f"f{i}", data=b"f", mtime=1_700_000_000 + i + 0.5) for i in range(5)]
    members += [M("whole", data=b"w", mtime=1_700_000_000)]
    img = Image.open(make_layer(tmp_path, "wide", members, compact_mtime=True).image)
    tree = img.walk()
    assert (img.epoch, img.fixed_nsec) == (1_700_000_000, 500_000_000)
    assert [tree[f"f{i}".encode()].rel_mtime for i in range(5)] == [0, 1, 2, 3, 4]
    assert all(tree[f"f{i}".encode()].mtime_ns == (1_700_000_000 + i) * 10**9 + 500_000_000
               for i in range(5))
    assert tree[b"ancient"].extended and tree[b"ancient"].mtime_ns == -(1 << 33) * 10**9
    assert tree[b"whole"].extended and tree[b"whole"].mtime_ns == 1_700_000_000 * 10**9


def test_dirents_sorted_and_blocks_self_contained(tmp_path: Path) -> None:
    names = [f"{c}{i:03d}" + "n" * (i % 40) for i in range(300) for c in "a!-~"[i % 4]]
    members = [M("d", tarfile.DIRTYPE)] + [M(f"d/{n}") for n in names]
    members += [M("d/.wh.zz-gone"), M("d/.wh.a000"), M("d/.wh..wh..opq"), M("d/+plus")]
    layer = make_layer(tmp_path, "dirs", members)
    img = Image.open(layer.image)
    d = img.walk()[b"d"]
    listed = img.listdir(d)
    got = [name for name, _nid, _t in listed]
    expected = sorted([n.encode() for n in names] + [b".", b"..", b"zz-gone", b"+plus"])
    assert got == expected  # .wh.a000 is hidden by the real a000; the opaque marker by name
    assert dict((n, t) for n, _i, t in listed)[b"zz-gone"] == ef.FT_CHR
    assert d.size > 512 and d.layout in (ef.LAYOUT_FLAT_INLINE, ef.LAYOUT_FLAT_PLAIN)
    data = img.flat_data(d)
    for start in range(0, len(data), 512):  # every block starts with its own dirents
        first_nameoff = int.from_bytes(data[start + 8 : start + 10], "little")
        assert first_nameoff % 12 == 0 and 12 <= first_nameoff < 512
    assert img.xattrs(d) == {b"trusted.overlay.opaque": b"y"}
    whiteout = img.inode(dict((n, i) for n, i, _t in listed)[b"zz-gone"])
    assert whiteout.mode == stat.S_IFCHR and whiteout.iu == 0 and whiteout.nlink == 1


def test_file_data_is_addressed_through_the_device_mapping(rich: Layer) -> None:
    img = Image.open(rich.image)
    ((_tag, _blocks, mapped),) = img.devices()
    stream = rich.tar.read_bytes()
    files = 0
    for path, ino in img.walk().items():
        if not stat.S_ISREG(ino.mode) or not ino.size:
            continue
        files += 1
        assert ino.layout == ef.LAYOUT_FLAT_PLAIN
        ordinal = rich.index.lookup(path.decode())
        assert ordinal is not None
        e = rich.index.entry(ordinal)
        if e.type is EntryType.HARDLINK:
            e = rich.index.entry(e.link_target)
        assert ino.iu == mapped + e.uoff // 512
        assert img.data_extent(ino) == (1, e.uoff)
        assert len(stream[e.uoff : e.uoff + e.size]) == ino.size == e.size
    assert files >= 8
    assert img.summary().device_bytes == sum(
        i.size for i in {i.nid: i for i in img.walk().values()}.values()
        if stat.S_ISREG(i.mode))


def test_xattrs_use_name_indexes(rich: Layer) -> None:
    img = Image.open(rich.image)
    tree = img.walk()
    tool = tree[b"bin/tool"]
    assert img.xattrs(tool) == {b"security.capability": CAPABILITY}
    raw = img.data[tool.end_of_head - tool.xattr_size + 12 :]
    name_len, index, value_size = ef.XATTR_ENTRY.unpack_from(raw, 0)
    assert (index, raw[4 : 4 + name_len], value_size) == (6, b"capability", len(CAPABILITY))
    assert img.xattrs(tree[b"srv/attrs"]) == {b"user.one": b"1", b"user.bin": b"\x00\xff\x80"}
    assert img.xattrs(tree[b"srv"]) == {b"user.dir": b"d"}


def test_symlinks_inline_and_in_blocks(tmp_path: Path) -> None:
    long_target = "/".join(["x" * 100] * 7)  # 706 bytes: one block plus an inline tail
    block_target = "y" * 512
    layer = make_layer(tmp_path, "links", [
        M("short", tarfile.SYMTYPE, linkname="target"),
        M("long", tarfile.SYMTYPE, linkname=long_target),
        M("exact", tarfile.SYMTYPE, linkname=block_target),
    ])
    img = Image.open(layer.image)
    tree = img.walk()
    assert tree[b"short"].layout == ef.LAYOUT_FLAT_INLINE
    assert img.flat_data(tree[b"short"]) == b"target"
    assert tree[b"long"].layout == ef.LAYOUT_FLAT_INLINE and tree[b"long"].iu > 0
    assert img.flat_data(tree[b"long"]) == long_target.encode()
    assert tree[b"exact"].layout == ef.LAYOUT_FLAT_PLAIN
    assert img.flat_data(tree[b"exact"]) == block_target.encode()
    assert all(stat.S_IMODE(tree[n].mode) == 0o777 for n in (b"short", b"long", b"exact"))


def _refused(layer_index: LayerIndex, tmp_path: Path, entry: str, reason: str) -> None:
    target = tmp_path / "out" / "layer.img"
    target.parent.mkdir()
    with pytest.raises(ErofsError) as err:
        write_image(layer_index, target)
    message = str(err.value)
    assert isinstance(err.value, InvalidArgument)
    assert "\n" not in message
    assert layer_index.blob_digest in message
    assert f"entry {entry!r}" in message and reason in message, message
    assert os.listdir(target.parent) == []  # no image, no temporary


def test_unaligned_file_data_is_refused(tmp_path: Path) -> None:
    layer = make_layer(tmp_path, "u", [M("d", tarfile.DIRTYPE), M("d/f", data=b"data")])
    ordinal = layer.index.lookup("d/f")
    assert ordinal is not None
    bad = patched_index(layer.index, entry=(ordinal, UOFF_OFFSET,
                                            layer.index.entry(ordinal).uoff + 100))
    _refused(bad, tmp_path, "d/f", "is not 512-byte aligned")


def test_name_longer_than_255_bytes_is_refused(tmp_path: Path) -> None:
    index = index_of(tmp_path, "n", [M("x" * 255), M("dir/" + "é" * 128)])
    assert len(("é" * 128).encode()) == 256
    _refused(index, tmp_path, "dir/" + "é" * 128, "name is 256 bytes")


def test_stream_beyond_2_32_blocks_is_refused(tmp_path: Path) -> None:
    layer = make_layer(tmp_path, "s", [M("f", data=b"x")])
    bad = patched_index(layer.index, uncompressed_size=(1 << 41) + 1)
    _refused(bad, tmp_path, "/", "beyond 2^32 blocks")


def test_xattr_outside_the_namespaces_is_refused(tmp_path: Path) -> None:
    index = index_of(tmp_path, "x", [M("f", data=b"x", xattrs={"lustre.odd": b"1"})])
    _refused(index, tmp_path, "f", "xattr b'lustre.odd' is in no namespace")


def test_device_number_too_large_is_refused(tmp_path: Path) -> None:
    index = index_of(tmp_path, "dev", [M("dev", tarfile.CHRTYPE, devmajor=5000, devminor=1)])
    _refused(index, tmp_path, "dev", "device 5000:1 does not fit")


def test_a_failed_write_keeps_the_old_image(rich: Layer, tmp_path: Path) -> None:
    index = index_of(tmp_path, "bad", [M("f", data=b"x", xattrs={"odd.name": b"1"})])
    before = rich.image.read_bytes()
    with pytest.raises(ErofsError):
        write_image(index, rich.image)
    assert rich.image.read_bytes() == before
    assert not [n for n in os.listdir(rich.image.parent) if n.endswith(".tmp")]


def test_a_file_beyond_4_gib_gets_an_extended_inode(tmp_path: Path) -> None:
    layer = make_layer(tmp_path, "huge", [M("a", data=b"x"), M("b", data=b"y")])
    ordinal = layer.index.lookup("b")
    assert ordinal is not None
    size = (5 << 30) + 7
    bad = patched_index(layer.index, entry=(ordinal, SIZE_OFFSET, size),
                        uncompressed_size=layer.index.uncompressed_size + size)
    img = Image(image_bytes(bad, compact_mtime=True))
    ino = img.walk()[b"b"]
    assert ino.extended and ino.size == size
    assert img.data_extent(ino) == (1, layer.index.entry(ordinal).uoff)


def test_file_data_beyond_the_stream_is_refused(tmp_path: Path) -> None:
    layer = make_layer(tmp_path, "short", [M("a", data=b"x" * 600)])
    bad = patched_index(layer.index, uncompressed_size=layer.index.entry(1).uoff + 599)
    _refused(bad, tmp_path, "a", "lies beyond the tar stream")


def test_image_and_stream_beyond_32_bit_block_addresses_are_refused(
    rich: Layer, tmp_path: Path
) -> None:
    """Device 1 is mapped at 2^32 - 1 - its blocks; the image must end at or below that."""
    blocks = len(image_bytes(rich.index)) // 512
    fits = patched_index(rich.index, uncompressed_size=(0xFFFFFFFF - blocks) * 512)
    img = Image(image_bytes(fits))
    assert img.blocks == blocks and img.devices()[0][2] == blocks  # the device starts right after
    too_big = patched_index(rich.index, uncompressed_size=(0xFFFFFFFF - blocks + 1) * 512)
    _refused(too_big, tmp_path, "/", "do not fit EROFS's 32-bit block addresses")


def test_cli_builds_and_inspects(rich: Layer, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.img"
    idx = tmp_path / "rich.idx"
    assert main(["index", "erofs", str(idx), "-o", str(out), "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert out.read_bytes() == rich.image.read_bytes() and built["size"] == out.stat().st_size
    assert main(["index", "erofs", "--inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["checksum_ok"] and summary["blocks"] == built["blocks"]
    assert summary["devices"] == [[rich.index.blob_digest[7:], built["device_blocks"],
                                   0xFFFFFFFF - built["device_blocks"]]]
    assert summary["types"]["char"] == 2 and summary["types"]["fifo"] == 1
    assert summary["compact_own_mtimes"] == 0 and not built["compact_mtimes"]
    compact = tmp_path / "compact.img"
    assert main(["index", "erofs", str(idx), "-o", str(compact), "--compact-mtimes"]) == 0
    assert compact.read_bytes() == image_bytes(rich.index, compact_mtime=True)
    capsys.readouterr()
    assert main(["index", "erofs", "--inspect", str(rich.tar)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an EROFS image" in err
    assert main(["index", "erofs", str(idx)]) == 1
    assert "-o IMG" in capsys.readouterr().err


def test_an_opaque_root_and_hidden_meta_entries(tmp_path: Path) -> None:
    layer = make_layer(tmp_path, "root", [
        M(".wh..wh..opq"), M(".wh..wh.plnk", tarfile.DIRTYPE), M(".wh..wh.plnk/x", data=b"x"),
        M("kept", data=b"k"), M("kept-link", tarfile.LNKTYPE, linkname=".wh..wh.plnk/x"),
    ])
    img = Image.open(layer.image)
    root = img.inode(img.root_nid)
    assert img.xattrs(root) == {b"trusted.overlay.opaque": b"y"}
    assert [n for n, _i, _t in img.listdir(root)] == [b".", b"..", b"kept", b"kept-link"]
    link = img.walk()[b"kept-link"]
    assert link.nlink == 2 and img.data_extent(link)[1] == layer.index.entry(
        layer.index.lookup(".wh..wh.plnk/x") or 0).uoff  # the hidden target's inode is kept
