"""The pure parts of the peer benchmark (issue 14): the physical limit, the ratio table and the
report with a stargz column. No Go, no containerd: runs are made up, the arithmetic is checked."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench import peers, report
from bench.images import ImageSpec, PushedImage, compressed_bytes_of, read_set_paths
from bench.setups import Run, turns
from integration.harness.images import BuiltImage

LINK = "200mbit-20ms"
PARAMS = {LINK: {"rate_bps": 200e6, "rtt_s": 0.020}}


def run(setup: str, pull_s: float, exec_s: float, *, read: int | None = 25_000_000) -> Run:
    return Run(
        link=LINK,
        image="python",
        setup=setup,
        repeat=0,
        pull_s=pull_s,
        first_exec_s=exec_s,
        registry_blob_bytes=30_000_000,
        registry_bytes=30_001_000,
        registry_requests=12,
        registry_unique_bytes=29_000_000,
        contentcache_bytes=None,
        daemon_cpu_s=1.5,
        daemon_peak_rss=80_000_000,
        read_compressed_bytes=read,
        containerd_cpu_s=0.25,
    )


RUNS = [
    run("overlayfs", 3.0, 1.0),
    run("overlayfs-warm", 0.0, 0.5),
    run("overlayfs-hot", 0.0, 0.4),
    run("stargz", 1.0, 1.5),
    run("stargz-warm", 0.0, 0.6),
    run("clip-lazy", 0.5, 1.0),
]


def test_physical_limit_is_warm_run_plus_transfer_plus_round_trips() -> None:
    # 25 MB at 200 Mbit/s is 1 s; 3 round trips of 20 ms.
    assert report.physical_limit_s(0.5, 25e6, 200e6, 0.02) == pytest.approx(1.56)
    assert report.physical_limit_s(0.5, 25e6, 200e6, 0.02, round_trips=1) == pytest.approx(1.52)
    assert report.physical_limit_s(0.5, 0, 1e9, 0) == pytest.approx(0.5)


def test_limits_take_overlayfs_warm_and_the_read_set() -> None:
    summary = report.summarize(RUNS)
    limits = report.limits(summary, PARAMS)
    assert list(limits) == [f"{LINK}/python"]
    row = limits[f"{LINK}/python"]
    assert row["warm_run_s"] == pytest.approx(0.5)
    assert row["hot_run_s"] == pytest.approx(0.4)
    assert row["read_bytes"] == 25_000_000
    assert row["round_trips"] == report.LIMIT_ROUND_TRIPS == 3
    assert row["limit_s"] == pytest.approx(1.56)


def test_limit_without_a_read_set_counts_zero_bytes_and_says_so() -> None:
    summary = report.summarize([run("overlayfs-warm", 0.0, 0.5, read=None)])
    row = report.limits(summary, PARAMS)[f"{LINK}/python"]
    assert row["read_bytes"] is None
    assert row["hot_run_s"] is None
    assert row["limit_s"] == pytest.approx(0.56)


def test_no_limit_without_a_probe_or_a_warm_overlayfs_run() -> None:
    assert report.limits(report.summarize(RUNS), {}) == {}
    assert report.limits(report.summarize(RUNS[3:]), PARAMS) == {}


def test_reruns_add_first_exec_samples_and_nothing_else() -> None:
    # A run-only setup's re-runs (no pull, less daemon CPU) pool into its first-exec median;
    # pull, pull+run and the other figures stay those of each repeat's first run.
    first = replace(run("clip-warm", 0.5, 1.0), daemon_cpu_s=0.3)
    reruns = [replace(run("clip-warm", 0.0, t), rerun=n, daemon_cpu_s=0.1)
              for n, t in ((1, 0.7), (2, 0.8))]
    row = report.summarize([first, *reruns])[f"{LINK}/python/clip-warm"]
    assert row["n"] == 3
    assert row["first_exec_s"] == {"min": pytest.approx(0.7), "median": pytest.approx(0.8)}
    assert row["pull_s"] == {"min": pytest.approx(0.5), "median": pytest.approx(0.5)}
    assert row["end_to_end_s"]["median"] == pytest.approx(1.5)
    assert row["daemon_cpu_s"] == pytest.approx(0.3)


def test_run_only_setups_take_turns_in_alternating_order() -> None:
    # Every unit once per round, every other round reversed: a drift linear in time costs
    # each the same over two rounds, and no unit always follows the same other.
    assert turns(["o", "f", "c"], 3) == [
        (0, "o"), (0, "f"), (0, "c"),
        (1, "c"), (1, "f"), (1, "o"),
        (2, "o"), (2, "f"), (2, "c"),
    ]  # fmt: skip
    assert turns(["o"], 2) == [(0, "o"), (1, "o")]
    assert turns([], 3) == []


def test_ratios_to_overlayfs_stargz_and_the_limit() -> None:
    summary = report.summarize(RUNS)
    ratios = report.ratios(summary, report.limits(summary, PARAMS))
    clip = ratios[f"{LINK}/python/clip-lazy"]
    assert clip["overlayfs"] == pytest.approx(1.5 / 4.0)
    assert clip["stargz"] == pytest.approx(1.5 / 2.5)
    assert clip["limit"] == pytest.approx(1.5 / 1.56)
    assert ratios[f"{LINK}/python/stargz"]["stargz"] == pytest.approx(1.0)
    assert ratios[f"{LINK}/python/overlayfs"]["overlayfs"] == pytest.approx(1.0)


def test_ratios_without_stargz_are_absent_not_zero() -> None:
    summary = report.summarize([r for r in RUNS if not r.setup.startswith("stargz")])
    ratios = report.ratios(summary, {})
    assert ratios[f"{LINK}/python/clip-lazy"]["stargz"] is None
    assert ratios[f"{LINK}/python/clip-lazy"]["limit"] is None


def payload(runs: list[Run], peers_status: dict[str, str]) -> dict[str, Any]:
    summary = report.summarize(runs)
    limits = report.limits(summary, PARAMS)
    return {
        "mode": "quick",
        "finished": "2026-12-04 08:00 UTC",
        "duration_s": 90.0,
        "machine": {"cores": 2},
        "runs": [r.as_dict() for r in runs],
        "images": {
            "python": {
                "layers": 2,
                "compressed": 65_000_000,
                "esgz_compressed": 70_000_000,
                "uncompressed": 169_000_000,
                "description": "minbase + python3",
            }
        },
        "links": [LINK],
        "summary": summary,
        "limits": limits,
        "link_params": PARAMS,
        "targets": report.targets(summary, [LINK], False),
        "contentcache_available": False,
        "failures": [],
        "throughput": [],
        "peers": peers_status,
    }


def row_of(text: str, title: str) -> list[str]:
    line = next(line for line in text.splitlines() if f"| {title} |" in line)
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_markdown_has_stargz_rows_ratio_columns_and_the_limit_table() -> None:
    text = report.markdown(payload(RUNS, {"stargz": "measured"}))
    header = row_of(text, "setup")
    assert header[5:8] == ["vs overlayfs", "vs stargz", "vs limit"]
    assert "daemon peak RSS MB" in header
    stargz = row_of(text, report.SETUP_TITLES["stargz"])
    assert stargz[4] == "2.50 (2.50)"
    assert stargz[5:8] == ["0.62x", "1.00x", "1.60x"]
    assert stargz[10] == "43%"  # 30 MB of the 70 MB eStargz twin, not of the 65 MB original
    clip = row_of(text, report.SETUP_TITLES["clip-lazy"])
    assert clip[5:8] == ["0.38x", "0.60x", "0.96x"]
    assert clip[10] == "46%"
    limit = row_of(text, f"{LINK} | python")
    assert limit == [LINK, "python", "0.50", "0.40", "25.0", "200", "20.0", "1.56"]
    assert "not measured" not in text


def test_markdown_says_in_one_line_when_stargz_was_not_measured() -> None:
    runs = [r for r in RUNS if not r.setup.startswith("stargz")]
    reason = "not measured: building bench/stargz failed: cannot find package"
    text = report.markdown(payload(runs, {"stargz": reason}))
    assert [line for line in text.splitlines() if "not measured" in line] == [
        f"**stargz: {reason}**"
    ]
    assert row_of(text, report.SETUP_TITLES["clip-lazy"])[6] == "-"


def test_read_set_globs_size_the_files_of_shell_workloads(tmp_path: Path) -> None:
    lower, upper = tmp_path / "base", tmp_path / "files"
    (lower / "usr/bin").mkdir(parents=True)
    (lower / "usr/bin/cat").write_bytes(b"x" * 1000)
    for d in ("d000", "d001"):
        (upper / "files" / d).mkdir(parents=True)
        for f in ("f0000", "f0001", "f0009"):
            (upper / "files" / d / f).write_bytes(b"y" * 100)
    spec = ImageSpec("t", ("base", "files"), ("/bin/true",), "t",
                     read_set=("usr/bin/cat", "files/d*/f000[0-2]"))  # fmt: skip
    image = BuiltImage("h", "r", "t", "h/r:t", "m", "c", ["a", "b"], [10, 10], [20, 20], [])
    pushed = PushedImage(spec, image, [lower, upper], [0.5, 0.25])
    paths = read_set_paths(pushed)
    assert paths == ["/files/d000/f0000", "/files/d000/f0001", "/files/d001/f0000",
                     "/files/d001/f0001", "/usr/bin/cat"]  # fmt: skip
    assert compressed_bytes_of(pushed, paths) == 1000 * 0.5 + 4 * 100 * 0.25


def test_daemon_build_without_go_is_a_reason_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no `go` on it
    built = peers.build_daemon(tmp_path)
    assert built.binary is None
    assert built.error.startswith("no Go toolchain")
    assert not (tmp_path / "stargz").exists()


def test_first_exec_target_says_how_far_the_floor_is_from_the_fuse_tree_mode() -> None:
    runs = [replace(r, image="scipy") for r in RUNS]
    runs.append(replace(runs[-1], setup="clip-lazy-fusetree", first_exec_s=0.5))
    rows = report.targets(report.summarize(runs), [LINK], False)
    row = next(r for r in rows if r["target"].startswith("lazy scipy: first exec"))
    assert row["value"] == pytest.approx(1.0 / 0.5)
    # hot 0.4 s against the FUSE-tree mode's 0.5 s: no start could be under 0.8x here
    assert row["note"] == ("vs overlayfs's warm run: 2.00x, FUSE-tree mode 1.00x; the floor "
                           "(overlayfs, page cache hot) is 0.80x the FUSE-tree mode's")
