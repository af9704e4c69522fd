"""``clip cache ls|prune``: a node's disk cache of decompressed layer bytes.

Both work on the root directory and are safe while the daemon runs: the daemon holds a shared
flock on `<cache>/<layer>/lock` for every layer it has open (attached, being built or
fetched), and prune removes a layer only after taking that lock exclusively without waiting.
A layer is *in use* when the daemon holds it or a remote snapshot in `metadata.db` refers to
it; prune never removes those.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import time
from pathlib import Path

from snapshotter import config as config_mod
from snapshotter.cache import CacheEntry, prune, scan
from snapshotter.errors import InvalidArgument
from snapshotter.snapshots.remote import remote_layer

EPILOG = """\
examples:
  clip cache ls --root /var/lib/clip
  clip cache ls --json | jq '.[] | select(.in_use == false)'
  clip cache prune                      # remove unused layers until under [disk_cache] limit_bytes
  clip cache prune --all-unused         # remove every layer no snapshot uses
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "cache",
        help="list or prune the node's disk cache of layer bytes",
        description="List the per-layer disk cache (bytes cached, complete, in use, last used) "
        "or remove the caches of layers no snapshot uses. Safe while `clip serve` runs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cache_command", metavar="ACTION", required=True)
    ls = sub.add_parser(
        "ls", help="list cached layers", epilog="Example: clip cache ls --root /var/lib/clip"
    )
    _common(ls)
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=_ls)
    pr = sub.add_parser(
        "prune",
        help="remove caches of unused layers",
        description="Remove caches of layers no snapshot uses, least recently used first, "
        "until the cache is under its limit (or all of them with --all-unused).",
        epilog="Example: clip cache prune --all-unused --root /var/lib/clip",
    )
    _common(pr)
    pr.add_argument("--all-unused", action="store_true", help="remove every unused layer")
    pr.add_argument(
        "--limit", help="target size (bytes or e.g. 5GiB; default [disk_cache] limit_bytes)"
    )
    pr.add_argument("--json", action="store_true", help="print what was removed as JSON")
    pr.set_defaults(func=_prune)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", help="state directory (default [daemon] root)")
    parser.add_argument("--config", type=Path, help="TOML config file (see config/clip.toml)")


def _config(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.with_overrides(config_mod.load(args.config), root=args.root)


def _snapshot_layers(root: Path) -> set[str]:
    """Layer digests remote snapshots in metadata.db refer to (read-only, WAL-safe)."""
    db = root / "metadata.db"
    if not db.exists():
        return set()
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            rows = conn.execute("SELECT key, labels FROM snapshots").fetchall()
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise InvalidArgument(f"cache: cannot read {db}: {exc}") from None
    used = set()
    for key, labels in rows:
        layer = remote_layer(str(key), "", json.loads(str(labels)))
        if layer is not None:
            used.add(layer.digest)
    return used


def _entries(cfg: config_mod.Config) -> tuple[Path, list[CacheEntry], set[str]]:
    directory = cfg.cache_dir()
    used = _snapshot_layers(Path(cfg.daemon.root))
    return directory, scan(directory), used


def _row(entry: CacheEntry, used: set[str]) -> dict[str, object]:
    return {
        "digest": entry.digest,
        "bytes_cached": entry.bytes_cached,
        "size": entry.size,
        "complete": entry.complete,
        "in_use": entry.in_use or entry.digest in used,
        "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.last_used)),
    }


def _ls(args: argparse.Namespace) -> int:
    _, entries, used = _entries(_config(args))
    rows = [_row(e, used) for e in entries]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'DIGEST':<71} {'CACHED':>10} {'SIZE':>10} COMPLETE IN-USE LAST-USED")
    for r in rows:
        size = "-" if r["size"] is None else _human(int(str(r["size"])))
        print(f"{r['digest']:<71} {_human(int(str(r['bytes_cached']))):>10} {size:>10} "
              f"{'yes' if r['complete'] else 'no':<8} {'yes' if r['in_use'] else 'no':<6} "
              f"{r['last_used']}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    cfg = _config(args)
    limit: int | None = None
    if not args.all_unused:
        raw = args.limit if args.limit is not None else cfg.disk_cache.limit_bytes
        limit = config_mod.parse_size("--limit", raw)
    directory, _, used = _entries(cfg)
    removed = prune(directory, limit, keep=used)
    if args.json:
        print(json.dumps([_row(e, set()) for e in removed], indent=2))
    else:
        for e in removed:
            print(f"removed {e.digest} ({_human(e.bytes_cached)})")
        total = _human(sum(e.bytes_cached for e in removed))
        print(f"{len(removed)} layer cache(s) removed, {total}")
    return 0


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{n}B"
