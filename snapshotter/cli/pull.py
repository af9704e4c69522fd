"""``clip pull REF``: lazily pull an image into containerd (see snapshotter.pull)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from snapshotter import config as config_mod
from snapshotter.containerd import ContainerdClient
from snapshotter.pull import Puller, PullOptions, PullResult
from snapshotter.registry import RegistryClient, host_platform, parse_reference

EPILOG = """\
example:
  clip pull --address /run/containerd/containerd.sock --plain-http 127.0.0.1:5000/app:latest
  ctr run --rm --snapshotter clip 127.0.0.1:5000/app:latest demo /bin/true
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "pull",
        help="lazily pull an image into containerd",
        description="Pull an image into containerd without downloading its layers: the "
        "manifest and config go into containerd's content store and every layer is prepared "
        "through clip, which serves it lazily. Then `ctr run --snapshotter clip REF` runs it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ref", help="image reference, e.g. registry.example:5000/app:1.0")
    parser.add_argument(
        "--address",
        default="/run/containerd/containerd.sock",
        help="containerd's socket (default /run/containerd/containerd.sock)",
    )
    parser.add_argument("--namespace", "-n", default="default", help="containerd namespace")
    parser.add_argument("--snapshotter", default="clip", help="proxy snapshotter name")
    parser.add_argument(
        "--platform", default="", help=f"os/arch[/variant] (default {host_platform()}, this host's)"
    )
    parser.add_argument("--plain-http", action="store_true", help="talk HTTP to the registry")
    parser.add_argument(
        "--config",
        type=Path,
        help="clip TOML config: its [registry] table applies (containerd's registry "
        'configuration, [registry."HOST"] overrides, timeouts)',
    )
    parser.add_argument(
        "--docker-config", type=Path, help="docker config.json with registry credentials"
    )
    parser.set_defaults(func=run)


def _registry(args: argparse.Namespace) -> RegistryClient:
    """The registry client as the config file says, then --plain-http for REF's host."""
    plain_http_host = parse_reference(args.ref).registry if args.plain_http else None
    return RegistryClient.from_config(
        config_mod.load(args.config),
        plain_http_host=plain_http_host,
        docker_config=args.docker_config,
    )


class _Reporter:
    """Progress on a terminal (one line rewritten in place); silent otherwise."""

    def __init__(self, interactive: bool) -> None:
        self.interactive = interactive
        self.started = time.monotonic()

    def __call__(self, result: PullResult) -> None:
        if not self.interactive:
            return
        ready = [layer for layer in result.layers if layer.state in ("lazy", "present")]
        current = next((x for x in result.layers if x.state == "resolving"), None)
        what = f", now {current.digest[:19]}" if current else ""
        sys.stderr.write(
            f"\r\x1b[K{result.name}: {len(ready)}/{len(result.layers)} layers, "
            f"{_mb(sum(x.size for x in ready))} of {_mb(result.compressed_size)} ready, "
            f"{time.monotonic() - self.started:.1f}s{what}"
        )
        sys.stderr.flush()

    def finish(self, result: PullResult) -> None:
        if self.interactive:
            sys.stderr.write("\r\x1b[K")
        lazy = sum(1 for layer in result.layers if layer.state == "lazy")
        print(
            f"pulled {result.name} ({result.manifest_digest[:19]}): {len(result.layers)} layers, "
            f"{_mb(result.compressed_size)} compressed, {lazy} prepared lazily by clip, "
            f"{len(result.layers) - lazy} already present, in {result.seconds:.2f}s"
        )


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


async def _pull(args: argparse.Namespace, reporter: _Reporter) -> PullResult:
    options = PullOptions(
        ref=args.ref,
        address=args.address,
        namespace=args.namespace,
        snapshotter=args.snapshotter,
        platform=args.platform,
    )
    async with (
        _registry(args) as registry,
        ContainerdClient(args.address, args.namespace) as containerd,
    ):
        return await Puller(options, registry, containerd, reporter).run()


def run(args: argparse.Namespace) -> int:
    reporter = _Reporter(sys.stderr.isatty())
    result = asyncio.run(_pull(args, reporter))
    reporter.finish(result)
    return 0
