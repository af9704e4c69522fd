"""Child processes started by tests, the demo and the benchmarks: stopped by PID, never by name."""

from __future__ import annotations

import subprocess
from pathlib import Path


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> int | None:
    """SIGTERM the child, wait up to ``timeout``, SIGKILL it if it is still there; reap it.

    Returns its exit code (None when there was no process).
    """
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def log_tail(path: Path, limit: int = 4000) -> str:
    """The end of a process's log file, for error messages ("" when there is none yet)."""
    try:
        return path.read_text(errors="replace")[-limit:]
    except FileNotFoundError:
        return ""
