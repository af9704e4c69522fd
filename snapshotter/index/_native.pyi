from collections.abc import Callable, Sequence
from typing import Any

from typing_extensions import Buffer

BOUND_FIELDS: int

def inflate_blocks(
    stream: int, inflate: int, bounds: Buffer, pieces: list[bytes], start: int,
    stop: int = -1, /,
) -> tuple[int, int, int, int]: ...
def new_piece(size: int, /) -> bytes: ...
def scan_members(
    buffer: Buffer,
    start: int,
    base: int,
    member_class: Callable[..., Any],
    types: tuple[Any, ...],
    normalise: Callable[[str], str],
    no_xattrs: Any,
    /,
) -> tuple[list[Any], int]: ...
def digest_files(
    files: Sequence[tuple[Any, Buffer]], chunk_size: int, sha256: int, /
) -> None: ...
def encode_tree(
    root: Any, leaf: dict[bytes, Any], error: type[Exception], /
) -> tuple[int, bytes, bytes, int, bytes, int, bytes]: ...
