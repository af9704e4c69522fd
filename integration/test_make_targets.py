"""The README's setup, from a clean checkout: what `make demo` and `make test` stand on.

The repository's committed state is cloned into a temporary directory, and there:

- `make venv` (the step both README commands start with) creates `.venv` with clip installed,
  and running it again is a no-op;
- `pip install .` into a fresh virtualenv gives a working `clip` command (packaged, not run
  from the checkout);
- the demo (`make demo`'s program) runs twice in a row; both runs exit 0 and print the figures.

Nothing is shared with the working tree: a stale file there cannot make this pass.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.harness.containerd import unmount_under

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
_NUMBER = re.compile(r"\d+\.\d+")


def _clean_env() -> dict[str, str]:
    """The caller's environment without this test run's virtualenv or make's job server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"):
        env.pop(name, None)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(
        p for p in env.get("PATH", os.defpath).split(os.pathsep) if p != venv_bin
    )
    return env


def _run(
    cmd: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        cmd,
        cwd=cwd,
        env=env or _clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, (
        f"{' '.join(cmd)} (in {cwd}) exited {result.returncode}\n"
        f"--- stdout:\n{result.stdout[-4000:]}\n--- stderr:\n{result.stderr[-4000:]}"
    )
    return result


def _version_of(checkout: Path) -> str:
    text = (checkout / "snapshotter" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.MULTILINE)
    assert match is not None
    return match.group(1)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    """A short private directory (unix socket paths under it must stay below 108 bytes)."""
    path = Path(f"/tmp/clip-mk-{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    try:
        yield path
    finally:
        unmount_under(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def checkout(scratch: Path) -> Path:
    """A `git clone` of the committed state, with `make venv` run in it once."""
    dest = scratch / "clip"
    _run(["git", "clone", "--quiet", str(REPO), str(dest)], scratch, 300)
    _run(["make", "venv"], dest, 1800)
    return dest


def test_make_venv_creates_the_virtualenv_with_clip(checkout: Path) -> None:
    clip = checkout / ".venv" / "bin" / "clip"
    assert (checkout / ".venv" / ".installed").exists()
    version = _run([str(clip), "--version"], checkout, 60)
    assert version.stdout == f"clip {_version_of(checkout)}\n"
    where = _run(
        [
            str(checkout / ".venv/bin/python"),
            "-c",
            "import snapshotter; print(snapshotter.__file__)",
        ],
        Path("/"),
        60,
    )
    assert where.stdout.strip() == str(checkout / "snapshotter" / "__init__.py")  # editable
    again = _run(["make", "venv"], checkout, 300)
    assert "pip install" not in again.stdout + again.stderr  # already installed: nothing to do


def test_pip_install_gives_a_working_clip(checkout: Path, scratch: Path) -> None:
    venv = scratch / "pip-venv"
    _run(["python3", "-m", "venv", str(venv)], scratch, 300)
    _run([str(venv / "bin/pip"), "install", "--quiet", str(checkout)], scratch, 1800)
    clip = venv / "bin" / "clip"
    version = _run([str(clip), "--version"], scratch, 60)
    assert version.stdout == f"clip {_version_of(checkout)}\n"
    where = _run(
        [str(venv / "bin/python"), "-c", "import snapshotter; print(snapshotter.__file__)"],
        scratch,
        60,
    )
    assert where.stdout.startswith(str(venv)), where.stdout  # installed, not the checkout
    for command in ("serve", "pull", "index", "status"):
        _run([str(clip), command, "--help"], scratch, 60)
    # The generated gRPC modules are packaged: status builds its request, then finds no daemon.
    down = subprocess.run(
        [str(clip), "status", "--address", str(scratch / "none.sock")],
        capture_output=True,
        text=True,
        timeout=60,
        env=_clean_env(),
    )
    assert down.returncode == 1 and down.stderr.startswith("clip: "), down.stderr
    assert "Traceback" not in down.stderr


@pytest.mark.timeout(3000)
def test_demo_runs_twice_and_prints_its_figures(checkout: Path, scratch: Path) -> None:
    workdir = scratch / "demo"
    python = str(checkout / ".venv" / "bin" / "python")
    try:
        for attempt in (1, 2):
            result = _run(
                [python, "-m", "integration.demo", "--workdir", str(workdir)], checkout, 1400
            )
            rows = _figure_rows(result.stdout)
            assert len(rows) >= 3, (attempt, result.stdout)
            assert any("overlayfs" in row for row in rows), rows
            assert sum("clip" in row for row in rows) >= 2, rows
            assert "everything stopped" in result.stdout
            print(f"demo run {attempt}:", *rows, sep="\n")  # the figures, shown with -s
            assert not _mounted_under(workdir), attempt
    finally:
        subprocess.run(
            [python, "-m", "integration.demo", "--clean", "--workdir", str(workdir)],
            cwd=checkout,
            env=_clean_env(),
            capture_output=True,
            timeout=300,
        )
    assert not workdir.exists()


def _mounted_under(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == str(path) or p.startswith(f"{path}/")]


def _figure_rows(out: str) -> list[str]:
    """The table the demo prints: the lines after its header that carry the timings."""
    lines = out.splitlines()
    header = [i for i, line in enumerate(lines) if "first exec" in line and "registry" in line]
    assert header, out
    return [line for line in lines[header[-1] + 1 :] if len(_NUMBER.findall(line)) >= 4]
