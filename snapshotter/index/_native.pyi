from collections.abc import Callable

from typing_extensions import Buffer
from typing import Any

def inflate_blocks(stream: int, inflate: int, bounds: Buffer, /) -> tuple[int, int]: ...
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
