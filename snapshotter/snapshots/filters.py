"""containerd's filter syntax for List (Walk) requests.

containerd sends filters such as ``labels."containerd.io/snapshot.ref"==sha256:abc,parent=="k"``
(the remote-layer handshake depends on it). Grammar, as containerd's ``filters`` package
defines it: a filter string is selectors joined by ``,`` (all must match); several filter
strings in one request match if any matches. A selector is a field path (identifiers or
quoted strings separated by ``.``), optionally followed by an operator ``==``, ``!=`` or ``~=``
(regular expression) and a value (quoted with ``"``, ``/`` or ``|``, or a bare run of
characters up to ``,``). A field path alone tests presence.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from snapshotter.errors import InvalidArgument, quoted

# Looks a field path up in a record: returns (value, present).
Adaptor = Callable[[Sequence[str]], tuple[str, bool]]

_QUOTES = '"/|'
_OPERATORS = ("==", "!=", "~=")


@dataclass(frozen=True)
class Selector:
    """One ``field op value`` term; ``op`` is empty for a presence test."""

    path: tuple[str, ...]
    op: str = ""
    value: str = ""
    pattern: re.Pattern[str] | None = None

    def matches(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.path)
        if self.op == "":
            return present
        if self.op == "==":
            return present and value == self.value
        if self.op == "!=":
            return not present or value != self.value
        assert self.pattern is not None
        return present and self.pattern.search(value) is not None


class _Scanner:
    """Hand-written scanner over one filter string; errors name the position."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, why: str) -> InvalidArgument:
        return InvalidArgument(f"invalid filter {quoted(self.text)}: {why} at position {self.pos}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_space(self) -> None:
        while self.peek().isspace():
            self.pos += 1

    def quoted(self) -> str:
        quote = self.text[self.pos]
        out: list[str] = []
        self.pos += 1
        while self.pos < len(self.text):
            ch = self.text[self.pos]
            if ch == "\\" and self.pos + 1 < len(self.text):
                nxt = self.text[self.pos + 1]
                out.append(nxt if nxt in (quote, "\\") else ch + nxt)
                self.pos += 2
                continue
            self.pos += 1
            if ch == quote:
                return "".join(out)
            out.append(ch)
        raise self.fail("unterminated quoted string")

    def field(self) -> str:
        self.skip_space()
        if self.peek() and self.peek() in _QUOTES:
            return self.quoted()
        start = self.pos
        while self.peek() and (self.peek().isalnum() or self.peek() == "_"):
            self.pos += 1
        if start == self.pos:
            raise self.fail("expected a field name")
        return self.text[start : self.pos]

    def value(self) -> str:
        self.skip_space()
        if self.peek() and self.peek() in _QUOTES:
            return self.quoted()
        start = self.pos
        while self.peek() and self.peek() != "," and not self.peek().isspace():
            self.pos += 1
        if start == self.pos:
            raise self.fail("expected a value")
        return self.text[start : self.pos]

    def selector(self) -> Selector:
        path = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            path.append(self.field())
        self.skip_space()
        op = self.text[self.pos : self.pos + 2]
        if op not in _OPERATORS:
            if self.peek() and self.peek() != ",":
                raise self.fail("expected an operator (==, != or ~=)")
            return Selector(tuple(path))
        self.pos += 2
        value = self.value()
        pattern = None
        if op == "~=":
            try:
                pattern = re.compile(value)
            except re.error as exc:
                raise self.fail(f"bad regular expression ({exc})") from None
        return Selector(tuple(path), op, value, pattern)


def parse(text: str) -> list[Selector]:
    """Parse one filter string into selectors that must all match."""
    scanner = _Scanner(text)
    selectors = [scanner.selector()]
    scanner.skip_space()
    while scanner.peek() == ",":
        scanner.pos += 1
        selectors.append(scanner.selector())
        scanner.skip_space()
    if scanner.pos != len(text):
        raise scanner.fail("unexpected character")
    return selectors


class Filter:
    """A request's filters: empty matches everything, otherwise any filter string matching."""

    def __init__(self, filters: Sequence[str]) -> None:
        self.alternatives = [parse(f) for f in filters if f.strip()]

    def matches(self, adaptor: Adaptor) -> bool:
        if not self.alternatives:
            return True
        return any(all(s.matches(adaptor) for s in alt) for alt in self.alternatives)


def snapshot_adaptor(name: str, parent: str, kind: str, labels: Mapping[str, str]) -> Adaptor:
    """Field lookup for a snapshot, with the field names containerd's storage uses."""

    def lookup(path: Sequence[str]) -> tuple[str, bool]:
        head = path[0]
        if head == "name":
            return name, True
        if head == "parent":
            return parent, True
        if head == "kind":
            return kind, True
        if head == "labels" and len(path) > 1:
            key = ".".join(path[1:])
            return labels.get(key, ""), key in labels
        return "", False

    return lookup
