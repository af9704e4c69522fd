"""The benchmark's images, built here from the Debian and PyPI archives and cached under bench/work.

Layers (each a deterministic gzip tar made by the integration harness, so digests are stable):

- ``base``: a Debian bookworm rootfs from ``debootstrap --variant=minbase``;
- ``python``: what ``--include=python3`` adds to that rootfs (a real diff, whiteouts included);
- ``sci``: numpy, scipy and pandas wheels from PyPI installed with ``pip --target`` into
  /usr/local/lib/python3.11/dist-packages (a few hundred MB, the "large library" layer);
- ``files``: 50,000 small text files in 100 directories;
- ``big``: one 128 MiB file, half random and half zeros per MiB (about 2:1 compressible), only
  used by the FUSE throughput phase.

Rootfs trees and layer blobs are kept under bench/work (gitignored) so reruns start in seconds.
"""

from __future__ import annotations

import filecmp
import os
import random
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from integration.harness.images import BuiltImage, build_image, make_layer_tar, push_image

MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
SITE = "usr/local/lib/python3.11/dist-packages"
SCI_PACKAGES = ("numpy", "scipy", "pandas")
SMALL_DIRS, SMALL_PER_DIR = 100, 500
BIG_MIB = 128
MiB = 1 << 20
# Things debootstrap leaves behind that no image ships.
JUNK = ("var/cache/apt/archives", "var/lib/apt/lists", "var/log")


def say(text: str) -> None:
    print(text, flush=True)


@dataclass(frozen=True)
class ImageSpec:
    """An image of the benchmark: its layers and the command that is its workload."""

    name: str
    layers: tuple[str, ...]
    argv: tuple[str, ...]
    description: str
    reports_files: bool = False  # the workload prints the files it loaded (see PY_FILES)
    # Otherwise: glob patterns (relative to /) of the files the workload reads, for the
    # read-set estimate and the physical limit (programs, libraries and data it opens).
    read_set: tuple[str, ...] = ()


# Appended to Python workloads: the files the process loaded (modules and mapped libraries),
# so the report can compare registry bytes with the compressed bytes of what was read.
PY_FILES = (
    "import sys, json\n"
    "files = {getattr(m, '__file__', None) for m in list(sys.modules.values())}\n"
    "files |= {l.split()[-1] for l in open('/proc/self/maps') if '/' in l}\n"
    "files.add(sys.executable)\n"
    "print('FILES ' + json.dumps(sorted(f for f in files if f and f.startswith('/'))))\n"
)
PY_STDLIB = "import json, email.parser, http.client, decimal, argparse, asyncio, logging\n"
PY_SCI = (
    "import numpy, scipy.linalg, scipy.optimize, pandas\n"
    "a = numpy.random.default_rng(1).random((200, 200))\n"
    "df = pandas.DataFrame(a[:, :4], columns=list('wxyz'))\n"
    "print(round(float(scipy.linalg.det(a @ a.T + numpy.eye(200)) > 0)), len(df.describe()))\n"
)
SMALL_READ = "cat /files/d*/f000[0-2] | wc -c"  # 300 files spread over the whole layer
LIBS = "usr/lib/x86_64-linux-gnu/"
SHELL_READS = ("usr/bin/dash", "usr/bin/wc", "usr/lib64/ld-linux-x86-64.so.2", LIBS + "libc.so.6")

IMAGES = (
    ImageSpec(
        "debian",
        ("base",),
        ("/bin/sh", "-c", "dpkg-query -W | wc -l && ls -R /usr/share/doc | wc -l"),
        "Debian bookworm minbase; `dpkg-query -W` and a listing of /usr/share/doc",
        read_set=(
            *SHELL_READS,
            "usr/bin/dpkg-query",
            "usr/bin/ls",
            "var/lib/dpkg/status",
            LIBS + "libmd.so.0",
            LIBS + "libselinux.so.1",
            LIBS + "libpcre2-8.so.0",
        ),
    ),
    ImageSpec(
        "python",
        ("base", "python"),
        ("/usr/bin/python3", "-c", PY_STDLIB + PY_FILES),
        "minbase + python3; imports json, email, http.client, decimal, asyncio, logging",
        reports_files=True,
    ),
    ImageSpec(
        "scipy",
        ("base", "python", "sci"),
        ("/usr/bin/python3", "-c", PY_SCI + PY_FILES),
        "minbase + python3 + numpy/scipy/pandas; imports them, a 200x200 det and a describe()",
        reports_files=True,
    ),
    ImageSpec(
        "smallfiles",
        ("base", "files"),
        ("/bin/sh", "-c", SMALL_READ),
        f"minbase + {SMALL_DIRS * SMALL_PER_DIR} small files; reads 300 of them spread widely",
        read_set=(*SHELL_READS, "usr/bin/cat", "files/d*/f000[0-2]"),
    ),
)
# Only for the FUSE throughput phase (not a time-to-first-exec image).
FSREAD = ImageSpec(
    "fsread", ("base", "files", "big"), ("/bin/true",), "smallfiles + a 128 MiB file"
)


# ------------------------------------------------------------------------------- rootfs trees


def _debootstrap(dest: Path, include: str | None) -> Path:
    """A cached debootstrap tree; built once (a few minutes), reused by every later run.

    debootstrap removes ``<dest>/debootstrap`` when it succeeds, so a tree with a dpkg status
    and without that directory is complete.
    """
    complete = (dest / "var/lib/dpkg/status").exists() and not (dest / "debootstrap").exists()
    if not complete:
        if dest.exists():
            shutil.rmtree(dest)
        cmd = ["debootstrap", "--variant=minbase"]
        if include:
            cmd.append(f"--include={include}")
        say(f"  debootstrap {dest.name} (once; cached under {dest.parent}) ...")
        subprocess.run([*cmd, SUITE, str(dest), MIRROR], check=True, capture_output=True)
    for junk in JUNK:
        path = dest / junk
        if path.is_dir() and not path.is_symlink() and any(path.iterdir()):
            shutil.rmtree(path)
            path.mkdir()
    return dest


def _same(a: Path, b: Path) -> bool:
    """Whether ``b`` (in the upper tree) is unchanged from ``a`` (in the lower tree)."""
    sa, sb = os.lstat(a), os.lstat(b)
    if (sa.st_mode, sa.st_uid, sa.st_gid) != (sb.st_mode, sb.st_uid, sb.st_gid):
        return False
    if stat.S_ISLNK(sb.st_mode):
        return os.readlink(a) == os.readlink(b)
    if stat.S_ISREG(sb.st_mode):
        return sa.st_size == sb.st_size and filecmp.cmp(a, b, shallow=False)
    if stat.S_ISCHR(sb.st_mode) or stat.S_ISBLK(sb.st_mode):
        return sa.st_rdev == sb.st_rdev
    return True


def _walk(root: Path, rel: str = "") -> Iterator[str]:
    for name in sorted(os.listdir(root / rel)):
        path = f"{rel}/{name}" if rel else name
        yield path
        full = root / path
        if full.is_dir() and not full.is_symlink():
            yield from _walk(root, path)


def diff_tree(lower: Path, upper: Path, out: Path) -> Path:
    """The layer that turns ``lower`` into ``upper``: changed entries plus OCI whiteouts."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    changed = [
        p for p in _walk(upper) if not os.path.lexists(lower / p) or not _same(lower / p, upper / p)
    ]
    wanted: set[str] = set()
    for path in changed:
        wanted.add(path)
        parent = os.path.dirname(path)
        while parent:
            wanted.add(parent)
            parent = os.path.dirname(parent)
    listing = out.with_name(out.name + ".list")
    listing.write_text("".join(p + "\n" for p in sorted(wanted)))
    subprocess.run(
        f"tar -C {upper} --no-recursion --xattrs --xattrs-include='*' -T {listing} -cf - "
        f"| tar -C {out} --xattrs --xattrs-include='*' --numeric-owner -xpf -",
        shell=True,
        check=True,
    )
    listing.unlink()
    for path in _walk(lower):
        parent = os.path.dirname(path)
        if not os.path.lexists(upper / path) and os.path.lexists(upper / parent):
            whiteout = out / os.path.dirname(path) / (".wh." + os.path.basename(path))
            whiteout.parent.mkdir(parents=True, exist_ok=True)
            whiteout.touch()
    return out


# ------------------------------------------------------------------------------- layers


def _sci_tree(work: Path) -> Path:
    tree = work / "trees" / "sci"
    if (work / "trees" / "sci.done").exists():
        return tree
    tmp = work / "trees" / "sci-tmp"
    target = tmp / SITE
    if not any(target.glob("numpy*")):
        say("  pip install --target numpy scipy pandas (PyPI wheels, once) ...")
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-compile"]
        plat = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp"]
        plat += ["--platform", "manylinux2014_x86_64", "--target", str(target)]
        subprocess.run([*pip, *plat, *SCI_PACKAGES], check=True, capture_output=True)
    if tree.exists():
        shutil.rmtree(tree)
    tmp.rename(tree)
    (work / "trees" / "sci.done").touch()
    return tree


def _files_tree(work: Path) -> Path:
    tree = work / "trees" / "files"
    if (work / "trees" / "files.done").exists():
        return tree
    for d in range(SMALL_DIRS):
        sub = tree / "files" / f"d{d:03d}"
        sub.mkdir(parents=True, exist_ok=True)
        for f in range(SMALL_PER_DIR):
            rng = random.Random(d * SMALL_PER_DIR + f)
            (sub / f"f{f:04d}").write_text(rng.randbytes(256 + rng.randrange(1024)).hex() + "\n")
    (work / "trees" / "files.done").touch()
    return tree


def _big_tree(work: Path) -> Path:
    tree = work / "trees" / "big"
    if (work / "trees" / "big.done").exists():
        return tree
    (tree / "data").mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    with open(tree / "data" / "big.bin", "wb") as out:
        for _ in range(BIG_MIB):
            out.write(rng.randbytes(MiB // 2) + bytes(MiB // 2))
    (work / "trees" / "big.done").touch()
    return tree


def layer_trees(work: Path, names: set[str]) -> dict[str, Path]:
    """The directory tree of each wanted layer (building and caching what is missing)."""
    rootfs = work / "rootfs"
    rootfs.mkdir(parents=True, exist_ok=True)
    trees: dict[str, Path] = {}
    base = _debootstrap(rootfs / "minbase", None)
    trees["base"] = base
    if "python" in names:
        python = _debootstrap(rootfs / "python", "python3")
        out = work / "trees" / "python"
        if not (work / "trees" / "python.done").exists():
            diff_tree(base, python, out)
            (work / "trees" / "python.done").touch()
        trees["python"] = out
    if "sci" in names:
        trees["sci"] = _sci_tree(work)
    if "files" in names:
        trees["files"] = _files_tree(work)
    if "big" in names:
        trees["big"] = _big_tree(work)
    return trees


def layer_blobs(work: Path, names: set[str]) -> dict[str, Path]:
    """Gzip layer blobs by name, cached in bench/work/layers (rebuilt only when missing)."""
    trees = layer_trees(work, names)
    blobs: dict[str, Path] = {}
    for name in sorted(names):
        blob = work / "layers" / f"{name}.tar.gz"
        if not blob.exists():
            say(f"  packing layer {name} ...")
            tmp = blob.with_name(blob.name + ".part")
            make_layer_tar(trees[name], tmp, compression="gzip")
            tmp.rename(blob)
        blobs[name] = blob
    return blobs


@dataclass
class PushedImage:
    spec: ImageSpec
    image: BuiltImage
    layer_trees: list[Path]  # host trees of the layers, bottom first (to size what was read)
    layer_ratio: list[float] = field(default_factory=list)  # compressed / uncompressed

    def ref_via(self, host: str) -> str:
        return f"{host}/{self.image.repo}:{self.image.tag}"


def build_and_push(work: Path, specs: list[ImageSpec], registry_host: str) -> list[PushedImage]:
    """Build every image's OCI layout from the cached blobs and push it to the registry."""
    names = {layer for spec in specs for layer in spec.layers}
    blobs = layer_blobs(work, names)
    trees = layer_trees(work, names)
    pushed = []
    for spec in specs:
        oci = work / "oci" / spec.name
        if oci.exists():
            shutil.rmtree(oci)
        build_image([blobs[n] for n in spec.layers], oci, cmd=list(spec.argv))
        image = push_image(oci, registry_host, f"bench/{spec.name}", "v1")
        ratio = [c / u for c, u in zip(image.layer_sizes, image.uncompressed_sizes, strict=True)]
        pushed.append(PushedImage(spec, image, [trees[n] for n in spec.layers], ratio))
    return pushed


def _find(trees: list[Path], rel: str) -> tuple[int, Path] | None:
    """The topmost layer holding ``rel`` and its entry, following symlinks within the stack."""
    for _ in range(16):
        for i in range(len(trees) - 1, -1, -1):
            candidate = trees[i] / rel
            if os.path.lexists(candidate):
                break
        else:
            return None
        if not candidate.is_symlink():
            return i, candidate
        target = os.readlink(candidate)
        joined = target if target.startswith("/") else os.path.join(os.path.dirname(rel), target)
        rel = os.path.normpath(joined).lstrip("/")
    return None


def read_set_paths(pushed: PushedImage) -> list[str]:
    """The paths the spec's ``read_set`` patterns match in any of the image's layers."""
    found: set[str] = set()
    for pattern in pushed.spec.read_set:
        for tree in pushed.layer_trees:
            found |= {"/" + str(p.relative_to(tree)) for p in tree.glob(pattern)}
    return sorted(found)


def compressed_bytes_of(pushed: PushedImage, paths: list[str]) -> int:
    """Estimated compressed bytes of the files a workload read: each file's size in the topmost
    layer that has it, times that layer's compression ratio (exact spans would need the index's
    checkpoints; the layer average is close for layers of many similar files)."""
    total = 0.0
    for path in set(paths):
        found = _find(pushed.layer_trees, path.lstrip("/"))
        if found is not None and found[1].is_file():
            total += found[1].stat().st_size * pushed.layer_ratio[found[0]]
    return int(total)
