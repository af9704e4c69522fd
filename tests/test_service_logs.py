"""Structured logs: one JSON object per line with the record's fields at the top level."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from snapshotter import logs


@pytest.fixture(autouse=True)
def keep_root_logger() -> Iterator[None]:
    """logs.setup() replaces the root handlers; give pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    grpc_level = logging.getLogger("grpc").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("grpc").setLevel(grpc_level)


def test_json_lines_carry_fields() -> None:
    out = io.StringIO()
    logs.setup("debug", "json", out)
    logging.getLogger("clip.rpc").debug(
        "Prepare OK", extra={"fields": {"rpc": "Prepare", "key": "k", "duration_ms": 1.5}}
    )
    logging.getLogger("x").info("plain")
    logging.getLogger("grpc").info("hidden: grpc is kept at warning")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [entry["msg"] for entry in lines] == ["Prepare OK", "plain"]
    first = lines[0]
    assert (first["level"], first["logger"], first["rpc"], first["key"]) == (
        "debug",
        "clip.rpc",
        "Prepare",
        "k",
    )
    assert first["duration_ms"] == 1.5 and first["time"].endswith("Z")


def test_text_format_is_one_line() -> None:
    out = io.StringIO()
    logs.setup("info", "text", out)
    logging.getLogger("clip").info("serving", extra={"fields": {"root": "/r"}})
    (line,) = out.getvalue().splitlines()
    assert line.endswith("info    clip: serving root='/r'")
