"""The ``clip`` command: one subcommand module per concern, dispatched from here.

Each subcommand module exposes ``register(subparsers)`` which adds its parser and sets
``func`` (a callable taking the parsed namespace and returning an exit code). Errors derived
from :class:`snapshotter.errors.ClipError` become a one-line message on stderr and exit 1;
nothing a user can cause prints a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from snapshotter import __version__
from snapshotter.errors import ClipError

# Subcommand modules, in the order they appear in ``clip --help``.
_SUBCOMMANDS = ("index", "serve", "pull", "status", "cache")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``command`` (a known subcommand name) only that module is imported.

    Subcommand modules pull in heavy dependencies (FUSE and trio for ``serve``, aiohttp for
    ``pull``); importing only the one asked for keeps every command's start-up short.
    """
    parser = argparse.ArgumentParser(
        prog="clip",
        description="clip: a lazy-loading containerd snapshotter for unmodified OCI images.",
        epilog="Example: clip serve --root /var/lib/clip --address /run/clip/clip.sock",
    )
    parser.add_argument("--version", action="version", version=f"clip {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in (command,) if command in _SUBCOMMANDS else _SUBCOMMANDS:
        module = __import__(f"snapshotter.cli.{name}", fromlist=["register"])
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv[0] if argv else None)
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args))
    except ClipError as exc:
        print(f"clip: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
