"""`clip serve` telemetry settings: an unavailable OTLP exporter is one clear line, no state."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from snapshotter import config
from snapshotter.telemetry import otlp_available


def test_otlp_without_the_exporter_package_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "clip.toml"
    cfg.write_text('[telemetry]\notlp_endpoint = "http://127.0.0.1:4318"\n')
    root = tmp_path / "root"
    result = subprocess.run(
        [sys.executable, "-m", "snapshotter", "serve", "--config", str(cfg), "--root", str(root),
         "--address", str(tmp_path / "s.sock")],
        capture_output=True, text=True, timeout=60,
    )
    if otlp_available():  # pragma: no cover - the exporter is not a clip dependency
        return
    assert result.returncode == 1
    assert result.stderr.strip().startswith("clip: telemetry: OTLP endpoint")
    assert "Traceback" not in result.stderr and not root.exists()


def test_telemetry_section(tmp_path: Path) -> None:
    path = tmp_path / "clip.toml"
    path.write_text("[telemetry]\ntrace_log = true\nslow_read_seconds = 0.1\n")
    cfg = config.load(path)
    assert cfg.telemetry.trace_log and cfg.telemetry.slow_read_seconds == 0.1
