"""containerd's filter syntax as List uses it."""

from __future__ import annotations

import pytest

from snapshotter.errors import InvalidArgument
from snapshotter.snapshots.filters import Filter, parse, snapshot_adaptor

INFO = snapshot_adaptor(
    "default/3/extract sha256:aa",
    "sha256:parent",
    "committed",
    {"containerd.io/snapshot.ref": "sha256:abc", "l": "2", "e": ""},
)


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ([], True),
        (['labels."containerd.io/snapshot.ref"==sha256:abc,parent=="sha256:parent"'], True),
        (['labels."containerd.io/snapshot.ref"==sha256:abd'], False),
        (["kind==committed"], True),
        (["kind==active"], False),
        (["kind==active", "labels.l==2"], True),
        (["labels.l"], True),
        (["labels.missing"], False),
        (["labels.e"], True),
        (['parent!=""'], True),
        (["labels.l!=2"], False),
        (["labels.missing!=x"], True),
        (["name~=^default/[0-9]+/extract"], True),
        (["name~=/^default/"], True),
        (["name==|default/3/extract sha256:aa|"], True),
        ([" kind == committed , labels.l == 2 "], True),
        (['name=="with \\"quote"'], False),
        (["unknownfield==x"], False),
    ],
)
def test_matches(filters: list[str], expected: bool) -> None:
    assert Filter(filters).matches(INFO) is expected


@pytest.mark.parametrize(
    "bad",
    ["a==", "==b", 'labels."unterminated==x', "a b", "name~=(", "a=b", "a,,b", "a.==x"],
)
def test_malformed_filters_are_invalid_argument(bad: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid filter"):
        parse(bad)


def test_quoted_field_path_component() -> None:
    (sel,) = parse('labels."a.b/c"==v')
    assert sel.path == ("labels", "a.b/c") and sel.op == "==" and sel.value == "v"
