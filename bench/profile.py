"""Summarise a py-spy raw profile (`--profile` of `python -m bench`): where `clip serve` spent
its samples, by thread and by function (self and inclusive).

    .venv/bin/python -m bench.profile bench/work/profiles/unshaped-scipy-clip-lazy-0.txt
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    """``func (path/to/mod.py:12)`` -> ``func (mod.py)``: lines differ per sample, files do not."""
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    return f"{match['func']} ({Path(match['file']).name})"


def summarise(path: Path, top: int) -> str:
    threads: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        threads[frames[0]] += count
        names = [_short(f) for f in frames[1:]] or [frames[0]]
        self_time[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    out = [f"{path.name}: {total} samples"]
    for title, counter in (("threads", threads), ("self", self_time), ("inclusive", inclusive)):
        out.append(f"-- {title}")
        out += [f"{100 * n / max(total, 1):5.1f}%  {name}" for name, n in counter.most_common(top)]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.profile",
        description="summarise py-spy raw profiles",
        epilog="Example: python -m bench.profile bench/work/profiles/*.txt --top 15",
    )
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    for path in args.files:
        print(summarise(path, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
