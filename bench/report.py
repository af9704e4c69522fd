"""Turn the benchmark's runs into bench/results/latest.{json,md,png}.

Medians and minimums are over the repeats of one (link, image, setup). Ratios are to overlayfs
on the same link and image. Targets are issue 6's, each marked met or missed with the factor.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.images import PushedImage
from bench.setups import Run, Throughput

SETUP_ORDER = (
    "overlayfs",
    "overlayfs-warm",
    "clip-cold",
    "clip-lazy",
    "clip-lazy-nobg",
    "clip-contentcache",
    "clip-warm",
)
SETUP_TITLES = {
    "overlayfs": "1 overlayfs: ctr image pull + run",
    "overlayfs-warm": "1b overlayfs, image unpacked (run only)",
    "clip-cold": "2 clip, first node, no index",
    "clip-lazy": "3 clip, indexes published (lazy)",
    "clip-lazy-nobg": "3b same, background fetch off",
    "clip-contentcache": "4 clip node B, warm ContentCache",
    "clip-warm": "5 clip, warm local disk cache",
}
LARGE = "scipy"
MB = 1e6


def _sh(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return ""


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1]
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(int(mem) / (1 << 20), 1),
        "kernel": platform.release(),
        "os": _sh(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "containerd": _sh(["containerd", "--version"]),
        "python": platform.python_version(),
        "clip_commit": _sh(["git", "rev-parse", "--short", "HEAD"]),
        "clip_uncommitted": _sh(["sh", "-c", "git status --short snapshotter | wc -l"])
        + " changed files under snapshotter/ (shared tree, other work in progress)",
        "disk": _sh(["sh", "-c", "df -h --output=source,fstype,size / | tail -1"]),
    }


def _group(runs: Iterable[Run]) -> dict[tuple[str, str, str], list[Run]]:
    out: dict[tuple[str, str, str], list[Run]] = {}
    for run in runs:
        out.setdefault((run.link, run.image, run.setup), []).append(run)
    return out


def _med(values: list[float]) -> float:
    return statistics.median(values)


def summarize(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """Per (link, image, setup): min and median of each timing, medians of the rest."""
    summary: dict[str, dict[str, Any]] = {}
    for (link, image, setup), group in _group(runs).items():
        row: dict[str, Any] = {"link": link, "image": image, "setup": setup, "n": len(group)}
        for key in ("pull_s", "first_exec_s", "end_to_end_s"):
            values = [getattr(r, key) for r in group]
            row[key] = {"min": min(values), "median": _med(values)}
        for key in (
            "registry_blob_bytes",
            "registry_bytes",
            "registry_requests",
            "registry_unique_bytes",
            "contentcache_bytes",
            "clip_cpu_s",
            "inflate_s",
            "clip_peak_rss",
            "read_compressed_bytes",
            "load1",
        ):
            values = [getattr(r, key) for r in group if getattr(r, key) is not None]
            row[key] = _med(values) if values else None
        summary[f"{link}/{image}/{setup}"] = row
    return summary


def _ratio(
    summary: dict[str, dict[str, Any]],
    link: str,
    image: str,
    setup: str,
    key: str,
    base_setup: str = "overlayfs",
    base_key: str | None = None,
) -> float | None:
    row = summary.get(f"{link}/{image}/{setup}")
    base = summary.get(f"{link}/{image}/{base_setup}")
    if row is None or base is None:
        return None
    return float(row[key]["median"] / base[base_key or key]["median"])


def targets(
    summary: dict[str, dict[str, Any]], links: list[str], cc_available: bool
) -> list[dict[str, Any]]:
    """Issue 6's targets, evaluated per link on the large image (RSS: over every clip run)."""
    out: list[dict[str, Any]] = []

    def add(
        name: str,
        link: str,
        value: float | None,
        limit: float,
        unit: str = "x",
        note: str = "",
        absent: str = "no data (see failures)",
    ) -> None:
        if value is None:
            row = {"target": name, "link": link, "value": None, "limit": limit, "note": note}
            out.append({**row, "status": absent})
            return
        met = value <= limit
        by = f"by {100 * (value / limit - 1):.1f} %" if limit else f"{value:.3g} {unit} over"
        out.append(
            {
                "target": name,
                "link": link,
                "value": value,
                "limit": limit,
                "unit": unit,
                "status": "met" if met else f"missed {by}",
                "note": note,
            }
        )

    for link in links:
        add(
            "lazy (indexes published): pull+run <= 0.25x overlayfs pull+run",
            link,
            _ratio(summary, link, LARGE, "clip-lazy", "end_to_end_s"),
            0.25,
        )
        for setup, what in (("clip-lazy-nobg", "background fetch off"), ("clip-lazy", "on")):
            lazy = summary.get(f"{link}/{LARGE}/{setup}")
            read = lazy and lazy["read_compressed_bytes"]
            add(
                f"lazy, {what}: registry bytes <= 1.5x compressed bytes the workload read",
                link,
                lazy["registry_blob_bytes"] / read if lazy and read else None,
                1.5,
                note="read bytes estimated from the files the workload loaded (see docs)",
            )
        if cc_available:
            cc = summary.get(f"{link}/{LARGE}/clip-contentcache")
            add(
                "node B warm ContentCache: zero registry blob bytes",
                link,
                cc["registry_blob_bytes"] / MB if cc else None,
                0,
                unit="MB",
            )
            add(
                "node B warm ContentCache: pull+run <= 0.2x overlayfs",
                link,
                _ratio(summary, link, LARGE, "clip-contentcache", "end_to_end_s"),
                0.2,
            )
        else:
            add(
                "node B warm ContentCache (zero registry bytes, <= 0.2x overlayfs)",
                link,
                None,
                0.2,
                note="the read path has no ContentCache tier yet",
                absent="not available yet",
            )
        add(
            "first node, no index: pull+run <= 0.6x overlayfs pull+run",
            link,
            _ratio(summary, link, LARGE, "clip-cold", "end_to_end_s"),
            0.6,
        )
        add(
            "warm disk cache: run <= 1.2x the same run on overlayfs (image unpacked)",
            link,
            _ratio(summary, link, LARGE, "clip-warm", "first_exec_s", "overlayfs-warm"),
            1.2,
        )
    rss = [r["clip_peak_rss"] for r in summary.values() if r["clip_peak_rss"]]
    add("peak RSS of clip serve <= 300 MB", "all", max(rss) / MB if rss else None, 300, "MB")
    return out


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")


def _fmt_t(cell: dict[str, float]) -> str:
    return f"{cell['median']:.2f} ({cell['min']:.2f})"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / MB:.1f}"


def markdown(payload: dict[str, Any]) -> str:
    summary: dict[str, dict[str, Any]] = payload["summary"]
    lines = [f"# clip benchmark: {payload['mode']} run", ""]
    lines += [
        f"Generated by `make bench` ({payload['mode']}) on {payload['finished']} in "
        f"{payload['duration_s'] / 60:.1f} min. See docs/benchmarks.md for the method.",
        "",
    ]
    lines += ["## Machine", ""] + [f"- {k}: {v}" for k, v in payload["machine"].items()]
    loads = [r["load1"] for r in payload["runs"]]
    lines += [
        f"- 1-min load average at the end of each run: median {_med(loads):.1f}, max "
        f"{max(loads):.1f} (the machine is shared with other work; expect noise)",
        "",
    ]
    lines += [
        "## Images",
        "",
        "| image | layers | compressed MB | unpacked MB | workload |",
        "|---|---|---|---|---|",
    ]
    for name, img in payload["images"].items():
        lines.append(
            f"| {name} | {img['layers']} | {img['compressed'] / MB:.1f} | "
            f"{img['uncompressed'] / MB:.1f} | {img['description']} |"
        )
    lines += [
        "",
        "## Targets (large image `scipy`)",
        "",
        "| target | link | value | status |",
        "|---|---|---|---|",
    ]
    for t in payload["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.3f} {t.get('unit', '')}"
        note = f" ({t['note']})" if t.get("note") else ""
        lines.append(f"| {t['target']}{note} | {t['link']} | {value} | **{t['status']}** |")
    for link in payload["links"]:
        lines += [
            "",
            f"## Link: {link}",
            "",
            "Times in seconds, median (min) over the repeats; ratio = median pull+run / "
            "overlayfs median pull+run. Registry MB = layer blob bytes served; unique MB = the "
            "same with overlapping ranges counted once; read MB (est.) = compressed bytes of the "
            "files the workload loaded.",
            "",
            "| image | setup | pull s | first exec s | pull+run s | ratio | registry MB | "
            "unique MB | of image | read MB (est.) | ContentCache MB | clip CPU s | inflate s | "
            "clip peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for image, img in payload["images"].items():
            for setup in SETUP_ORDER:
                row = summary.get(f"{link}/{image}/{setup}")
                if row is None:
                    if setup == "clip-contentcache" and not payload["contentcache_available"]:
                        lines.append(
                            f"| {image} | {SETUP_TITLES[setup]} | not available yet "
                            "(no ContentCache tier in the read path) ||||||||||||"
                        )
                    continue
                ratio = _ratio(summary, link, image, setup, "end_to_end_s")
                lines.append(
                    f"| {image} | {SETUP_TITLES[setup]} | {_fmt_t(row['pull_s'])} | "
                    f"{_fmt_t(row['first_exec_s'])} | {_fmt_t(row['end_to_end_s'])} | "
                    f"{'-' if ratio is None else f'{ratio:.2f}x'} | "
                    f"{_mb(row['registry_blob_bytes'])} | "
                    f"{_mb(row['registry_unique_bytes'])} | "
                    f"{100 * row['registry_blob_bytes'] / img['compressed']:.0f}% | "
                    f"{_mb(row['read_compressed_bytes'])} | "
                    f"{_mb(row['contentcache_bytes'])} | "
                    f"{_num(row['clip_cpu_s'])} | "
                    f"{_num(row.get('inflate_s'), 2)} | "
                    f"{_mb(row['clip_peak_rss'])} |"
                )
    if payload.get("failures"):
        lines += ["", "## Failed runs (not in the tables)", ""]
        lines += [
            f"- {f['link']} / {f['image']} / {f['setup']} #{f['repeat']}: {f['error']}"
            for f in payload["failures"]
        ]
    if payload["throughput"]:
        lines += [
            "",
            "## FUSE read throughput (unshaped link, inside a container, page cache dropped)",
            "",
            "| setup | sequential first read of a "
            f"{payload['big_mib']} MiB file, MiB/s | open+read of {payload['n_small']} small "
            "files, files/s | registry MB |",
            "|---|---|---|---|",
        ]
        for t in payload["throughput"]:
            lines.append(
                f"| {t['setup']} | {t['big_mib_s']:.1f} | {t['small_files_s']:.0f} | "
                f"{t['registry_bytes'] / MB:.1f} |"
            )
    lines += [
        "",
        "clip CPU s: CPU time of the `clip serve` process (all threads, /proc/PID/stat) during "
        "pull + run. inflate s: the sum of clip's `clip.inflate.duration` metric over the run "
        "(read-path inflation, scraped from `[daemon] metrics_address`); the index builder's "
        "inflation while streaming a blob (setup 2) is not in that metric, only in CPU s.",
        "",
    ]
    return "\n".join(lines)


def chart(payload: dict[str, Any], path: Path) -> None:
    """Stacked bars (pull, then run) per image and setup, one panel per link."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = payload["summary"]
    links = payload["links"]
    images = list(payload["images"])
    setups = [s for s in SETUP_ORDER if any(k.endswith("/" + s) for k in summary)]
    fig, axes = plt.subplots(1, len(links), figsize=(7 * len(links), 5), squeeze=False)
    width = 0.8 / len(setups)
    colors = plt.get_cmap("tab10")
    for ax, link in zip(axes[0], links, strict=True):
        for j, setup in enumerate(setups):
            xs, pulls, runs = [], [], []
            for i, image in enumerate(images):
                row = summary.get(f"{link}/{image}/{setup}")
                if row is not None:
                    xs.append(i + (j - (len(setups) - 1) / 2) * width)
                    pulls.append(row["pull_s"]["median"])
                    runs.append(row["first_exec_s"]["median"])
            ax.bar(xs, pulls, width, color=colors(j), alpha=0.45)
            ax.bar(xs, runs, width, bottom=pulls, color=colors(j), label=SETUP_TITLES[setup])
        ax.set_xticks(range(len(images)), images)
        ax.set_ylabel("seconds (light: pull, dark: ctr run to workload done)")
        ax.set_title(f"time to first exec, link: {link}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def image_info(pushed: list[PushedImage]) -> dict[str, dict[str, Any]]:
    return {
        p.spec.name: {
            "layers": len(p.image.layer_digests),
            "compressed": p.image.compressed_total,
            "uncompressed": sum(p.image.uncompressed_sizes),
            "layer_digests": p.image.layer_digests,
            "description": p.spec.description,
        }
        for p in pushed
    }


def throughput_rows(rows: list[Throughput]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
