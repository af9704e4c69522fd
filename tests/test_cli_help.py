"""Every `clip` command documents itself: --help exits 0 and shows an example of that command;
`clip --version` prints the package version.

Commands are discovered from the parser, so a new subcommand is covered without editing this.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from snapshotter import __version__
from snapshotter.cli import _SUBCOMMANDS, build_parser, main


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [path]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*path, name))
    return found


COMMANDS = _commands(build_parser())


def test_every_registered_module_is_discovered() -> None:
    assert {path[0] for path in COMMANDS if path} == set(_SUBCOMMANDS)
    assert ("status",) in COMMANDS and ("index", "build") in COMMANDS


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "clip")
def test_help_exits_zero_with_an_example(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*path, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out.lower(), out
    example_lines = [line for line in out.splitlines() if line.strip().startswith("clip ")]
    example_lines += [line for line in out.splitlines() if "Example: clip " in line]
    assert any(" ".join(("clip", *path)) in line for line in example_lines), out


def test_no_command_prints_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: clip" in capsys.readouterr().err


def test_version_in_process(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"clip {__version__}\n"


def test_version_matches_the_installed_distribution() -> None:
    """The version packaging reports (pyproject reads it from snapshotter.__version__)."""
    assert importlib.metadata.version("clip-snapshotter") == __version__


def test_console_script_version() -> None:
    """The `clip` entry point installed next to this interpreter, as a user runs it."""
    script = Path(sys.executable).parent / "clip"
    assert script.exists(), f"{script}: the clip console script is not installed"
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    assert result.stdout == f"clip {__version__}\n" and result.stderr == ""
