"""``clip index push REF``: publish an image's clip indexes as an artifact attached to it.

Registered under ``clip index`` by snapshotter/cli/index.py; the work is in
snapshotter/remote/artifact.py (artifact layout: docs/cluster.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from snapshotter import config as config_mod
from snapshotter.registry import RegistryClient
from snapshotter.registry.reference import parse_reference
from snapshotter.remote.artifact import PushResult, push_indexes


def register_push(sub: Any) -> None:
    push = sub.add_parser(
        "push",
        help="build an image's layer indexes and push them to its registry as an artifact",
        description="Resolve IMAGE (this host's platform), build the clip index of every layer "
        "(or take it from --root's index store, with the start profiles recorded there) and "
        "push them as an OCI artifact attached to the image manifest (referrers API subject, "
        "and the tag sha256-<manifest hex>.clip). Nodes then find the indexes instead of "
        "building them.",
        epilog="Example: clip index push --plain-http 127.0.0.1:5000/app:v1 --root /var/lib/clip",
    )
    push.add_argument("image", help="image reference (HOST/REPO:TAG or @sha256:...)")
    push.add_argument("--root", type=Path,
                      help="take indexes and start profiles from this clip root when present")
    push.add_argument("--plain-http", action="store_true", help="talk HTTP to the registry")
    push.add_argument("--config", type=Path,
                      help="clip.toml whose [registry] tables apply (plain_http, mirrors)")
    push.add_argument("--json", action="store_true", help="print the result as JSON")
    push.set_defaults(func=_push)


def _push(args: argparse.Namespace) -> int:
    result = asyncio.run(_run(args))
    if args.json:
        print(json.dumps(result.__dict__, sort_keys=True))
    else:
        print(f"pushed {result.layers} index(es) and {result.profiles} start profile(s) for "
              f"{result.manifest_digest} as :{result.tag} ({result.artifact_digest})")
    return 0


async def _run(args: argparse.Namespace) -> PushResult:
    plain_http_host = parse_reference(args.image).registry if args.plain_http else None
    config = config_mod.load(args.config)
    async with RegistryClient.from_config(config, plain_http_host=plain_http_host) as client:
        return await push_indexes(client, args.image, args.root)
