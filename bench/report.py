"""Turn the benchmark's runs into bench/results/latest.{json,md,png}.

Medians and minimums are over the repeats of one (link, image, setup). Each setup's pull+run
is set against overlayfs's, stargz's and the physical limit's on the same link and image
(issue 14). Targets are issue 6's, each marked met or missed with the factor.
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
from bench.setups import RERUNS, Run, Throughput

SETUP_ORDER = (
    "overlayfs",
    "overlayfs-warm",
    "overlayfs-hot",
    "stargz",
    "stargz-warm",
    "clip-cold",
    "clip-lazy",
    "clip-lazy-nobg",
    "clip-lazy-fusetree",
    "clip-contentcache",
    "clip-warm-fusetree",
    "clip-warm",
)
SETUP_TITLES = {
    "overlayfs": "1 overlayfs: ctr image pull + run",
    "overlayfs-warm": "1b overlayfs, image unpacked (run only)",
    "overlayfs-hot": "1c overlayfs, page cache hot (run only)",
    "stargz": "6 stargz: rpull + run (lazy)",
    "stargz-warm": "6b stargz, same node again (run only)",
    "clip-cold": "2 clip, first node, no index",
    "clip-lazy": "3 clip, indexes published (lazy)",
    "clip-lazy-nobg": "3b same, background fetch off",
    "clip-lazy-fusetree": "3c same as 3, FUSE-tree mode",
    "clip-contentcache": "4 clip node B, warm ContentCache",
    "clip-warm-fusetree": "5b clip, warm disk cache, FUSE-tree mode",
    "clip-warm": "5 clip, warm local disk cache",
}
LARGE = "scipy"
MB = 1e6
# Round trips no client can avoid: the connection, the manifest, then every range of the read
# set in one parallel wave (the config travels in that wave too).
LIMIT_ROUND_TRIPS = 3


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
    """Per (link, image, setup): min and median of each timing, medians of the rest. The
    first exec pools every run of the setup; pull, pull+run and the rest come from each
    repeat's first run (a re-run of a run-only setup pulls nothing and only adds a sample)."""
    summary: dict[str, dict[str, Any]] = {}
    for (link, image, setup), every in _group(runs).items():
        group = [r for r in every if not r.rerun] or every
        row: dict[str, Any] = {"link": link, "image": image, "setup": setup, "n": len(every)}
        for key, sample in (("pull_s", group), ("first_exec_s", every), ("end_to_end_s", group)):
            values = [getattr(r, key) for r in sample]
            row[key] = {"min": min(values), "median": _med(values)}
        for key in (
            "registry_blob_bytes",
            "registry_bytes",
            "registry_requests",
            "registry_unique_bytes",
            "contentcache_bytes",
            "daemon_cpu_s",
            "containerd_cpu_s",
            "inflate_s",
            "daemon_peak_rss",
            "read_compressed_bytes",
            "load1",
            "fuse_requests",
            "fetch_wait_s",
        ):
            values = [getattr(r, key) for r in group if getattr(r, key) is not None]
            row[key] = _med(values) if values else None
        lives = [r.life for r in group if r.life]
        if lives:
            row["life"] = _worst_life(lives)
        summary[f"{link}/{image}/{setup}"] = row
    return summary


def _worst_life(lives: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per layer, the repeat whose registry served the most bytes over the node's life."""
    worst: dict[str, dict[str, Any]] = {}
    for life in lives:
        for layer in life:
            seen = worst.get(layer["digest"])
            if seen is None or layer["served"] > seen["served"]:
                worst[layer["digest"]] = layer
    return list(worst.values())


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
        for setup, what, bound in (
            ("clip-lazy-nobg", "background fetch off", 1.3),
            ("clip-lazy", "on", 1.5),
        ):
            lazy = summary.get(f"{link}/{LARGE}/{setup}")
            read = lazy and lazy["read_compressed_bytes"]
            add(
                f"lazy, {what}: registry bytes <= {bound}x compressed bytes the workload read",
                link,
                lazy["registry_blob_bytes"] / read if lazy and read else None,
                bound,
                note="read bytes estimated from the files the workload loaded (see docs)",
            )
        lives = [layer for row in summary.values() if row["link"] == link
                 and row["setup"] == "clip-lazy" for layer in row.get("life", [])]
        add(
            "lazy, background fetch on, over the node's life: registry bytes <= 1.02x the blob "
            "(worst layer of every image)",
            link,
            max(layer["served"] / layer["blob"] for layer in lives) if lives else None,
            1.02,
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
        images = sorted({row["image"] for row in summary.values()})
        for image in images:
            add(
                f"{image}, every byte on disk: run <= 1.05x overlayfs's warm run",
                link,
                _ratio(summary, link, image, "clip-warm", "first_exec_s", "overlayfs-warm"),
                1.05,
                note="FUSE-tree mode: "
                + _x(_ratio(summary, link, image, "clip-warm-fusetree", "first_exec_s",
                            "overlayfs-warm")),
            )
        add(
            "lazy scipy: first exec <= 0.7x the FUSE-tree mode's (30% faster)",
            link,
            _ratio(summary, link, LARGE, "clip-lazy", "first_exec_s", "clip-lazy-fusetree"),
            0.7,
            note="vs overlayfs's warm run: "
            + _x(_ratio(summary, link, LARGE, "clip-lazy", "first_exec_s", "overlayfs-warm"))
            + ", FUSE-tree mode "
            + _x(_ratio(summary, link, LARGE, "clip-lazy-fusetree", "first_exec_s",
                        "overlayfs-warm"))
            # the floor: no start, lazy or not, runs faster than overlayfs with the page cache hot
            + "; the floor (overlayfs, page cache hot) is "
            + _x(_ratio(summary, link, LARGE, "overlayfs-hot", "first_exec_s",
                        "clip-lazy-fusetree"))
            + " the FUSE-tree mode's",
        )
        erofs = summary.get(f"{link}/{LARGE}/clip-lazy")
        tree = summary.get(f"{link}/{LARGE}/clip-lazy-fusetree")
        add(
            "lazy scipy: FUSE requests <= 5% of the FUSE-tree mode's",
            link,
            erofs["fuse_requests"] / tree["fuse_requests"]
            if erofs and tree and erofs.get("fuse_requests") is not None
            and tree.get("fuse_requests")
            else None,
            0.05,
        )
        if link != "unshaped":
            add(
                "shaped link, smallfiles lazy: pull+run below overlayfs pull+run",
                link,
                _ratio(summary, link, "smallfiles", "clip-lazy", "end_to_end_s"),
                1.0,
            )
            per_image = [
                r for image in images
                if (r := _ratio(summary, link, image, "clip-lazy", "end_to_end_s")) is not None
            ]
            add(
                "shaped link, every image lazy: pull+run below overlayfs pull+run (worst image)",
                link,
                max(per_image, default=None),
                1.0,
            )
    rss = [
        r["daemon_peak_rss"]
        for r in summary.values()
        if r["setup"].startswith("clip") and r["daemon_peak_rss"]
    ]
    add("peak RSS of clip serve <= 150 MB", "all", max(rss) / MB if rss else None, 150, "MB")
    return out


def physical_limit_s(
    warm_run_s: float,
    read_bytes: float,
    rate_bps: float,
    rtt_s: float,
    round_trips: int = LIMIT_ROUND_TRIPS,
) -> float:
    """The fastest any lazy snapshotter could be: the workload on local disk (overlayfs, image
    unpacked) plus moving the compressed bytes it reads over the link, and the unavoidable
    round trips. Decompression and FUSE cost nothing here, so it is a bound, not a target."""
    return warm_run_s + read_bytes * 8 / rate_bps + round_trips * rtt_s


def _read_set_bytes(summary: dict[str, dict[str, Any]], link: str, image: str) -> float | None:
    """Compressed bytes of the workload's read set: overlayfs-warm's estimate, else any run's."""
    rows = [summary.get(f"{link}/{image}/{s}") for s in SETUP_ORDER]
    for row in rows:
        if row is not None and row["read_compressed_bytes"] is not None:
            return float(row["read_compressed_bytes"])
    return None


def limits(
    summary: dict[str, dict[str, Any]], link_params: dict[str, dict[str, float]]
) -> dict[str, dict[str, Any]]:
    """Per "link/image": the physical limit and its terms (needs an overlayfs-warm run and the
    link's probe; the read set counts as 0 bytes, and says so, when no run could size it)."""
    out: dict[str, dict[str, Any]] = {}
    for row in summary.values():
        link, image = row["link"], row["image"]
        params = link_params.get(link)
        if row["setup"] != "overlayfs-warm" or params is None:
            continue
        read = _read_set_bytes(summary, link, image)
        warm = float(row["first_exec_s"]["median"])
        hot = summary.get(f"{link}/{image}/overlayfs-hot")
        out[f"{link}/{image}"] = {
            "warm_run_s": warm,
            "hot_run_s": None if hot is None else float(hot["first_exec_s"]["median"]),
            "read_bytes": read,
            "rate_bps": params["rate_bps"],
            "rtt_s": params["rtt_s"],
            "round_trips": LIMIT_ROUND_TRIPS,
            "limit_s": physical_limit_s(warm, read or 0.0, params["rate_bps"], params["rtt_s"]),
        }
    return out


def _over(seconds: float, base: dict[str, Any] | None) -> float | None:
    return None if base is None else seconds / float(base["end_to_end_s"]["median"])


def ratios(
    summary: dict[str, dict[str, Any]], limit: dict[str, dict[str, Any]]
) -> dict[str, dict[str, float | None]]:
    """Per summary key: pull+run over overlayfs's, over stargz's (lazy) and over the limit."""
    out: dict[str, dict[str, float | None]] = {}
    for key, row in summary.items():
        link, image = row["link"], row["image"]
        mine = float(row["end_to_end_s"]["median"])
        bound = limit.get(f"{link}/{image}")
        out[key] = {
            "overlayfs": _over(mine, summary.get(f"{link}/{image}/overlayfs")),
            "stargz": _over(mine, summary.get(f"{link}/{image}/stargz")),
            "limit": None if bound is None else mine / float(bound["limit_s"]),
        }
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
    lines += [f"**{name}: {status}**" for name, status in payload.get("peers", {}).items()
              if status != "measured"]  # fmt: skip
    lines += ["", "## Machine", ""] + [f"- {k}: {v}" for k, v in payload["machine"].items()]
    loads = [r["load1"] for r in payload["runs"]] or [0.0]
    lines += [
        f"- 1-min load average at the end of each run: median {_med(loads):.1f}, max "
        f"{max(loads):.1f} (the machine is shared with other work; expect noise)",
        "",
    ]
    lines += [
        "## Images",
        "",
        "| image | layers | compressed MB | eStargz MB | unpacked MB | workload |",
        "|---|---|---|---|---|---|",
    ]
    for name, img in payload["images"].items():
        lines.append(
            f"| {name} | {img['layers']} | {img['compressed'] / MB:.1f} | "
            f"{_mb(img.get('esgz_compressed'))} | "
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
    lines += _limit_lines(payload)
    lines += _life_lines(summary)
    ratio = ratios(summary, payload.get("limits", {}))
    for link in payload["links"]:
        lines += _link_lines(payload, link, ratio)
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
        "daemon CPU s: CPU time of the snapshotter's process (all threads, /proc/PID/stat) during "
        "pull + run: `clip serve`, the stargz daemon, or containerd for overlayfs (it unpacks "
        "in-process); containerd CPU s: containerd's own, every setup. inflate s: the sum of "
        "clip's `clip.inflate.duration` metric over the run "
        "(read-path inflation, scraped from `[daemon] metrics_address`); the index builder's "
        "inflation while streaming a blob (setup 2) is not in that metric, only in CPU s. "
        "fetch wait s: the seconds clip's reads spent waiting for bytes not yet on the node "
        "(the `clip_read_latency_seconds` sum of reads the registry or the ContentCache served; "
        "reads waiting at the same time each count): what a lazy start waited for its bytes.",
        "",
    ]
    return "\n".join(lines)


def _life_lines(summary: dict[str, dict[str, Any]]) -> list[str]:
    """Per layer, what the registry served a lazy node (background fetch on) from its pull until
    every layer was on disk: served counts a byte as often as it was asked for."""
    rows = [row for row in summary.values() if row["setup"] == "clip-lazy" and row.get("life")]
    if not rows:
        return []
    lines = [
        "", "## Registry bytes per layer over a lazy node's life", "",
        "clip lazy (indexes published, background fetch on), from the pull until every layer "
        "was complete on disk; the repeat that served the most. Served counts a byte as often as "
        "a range asked for it, distinct once.", "",
        "| link | image | layer | blob MB | served MB | distinct MB | served / blob | requests |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for layer in row["life"]:
            note = "" if layer["complete"] else " (not complete)"
            lines.append(
                f"| {row['link']} | {row['image']} | {layer['digest'][7:19]}{note} | "
                f"{layer['blob'] / MB:.1f} | {layer['served'] / MB:.1f} | "
                f"{layer['distinct'] / MB:.1f} | {layer['served'] / layer['blob']:.3f} | "
                f"{layer['requests']} |"
            )
    return lines


def _size(img: dict[str, Any], setup: str) -> int:
    """The compressed size of the image the setup pulls (stargz pulls the eStargz twin)."""
    return int(
        img.get("esgz_compressed", img["compressed"])
        if setup.startswith("stargz")
        else img["compressed"]
    )


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _limit_lines(payload: dict[str, Any]) -> list[str]:
    """The physical limit per link and image, with its terms."""
    limit: dict[str, dict[str, Any]] = payload.get("limits", {})
    if not limit:
        return []
    lines = [
        "",
        "## Physical limit",
        "",
        "overlayfs's warm run (image unpacked, page cache dropped) plus the compressed read set "
        f"over the link: read bytes / rate + {LIMIT_ROUND_TRIPS} round trips (connection, "
        "manifest, one parallel wave of ranges). Rate and round trip are probed on the link "
        "through the same proxy every setup uses. Hot run s: overlayfs's run with the page cache "
        "as the warm run left it, the floor of any start on this machine.",
        "",
        "| link | image | warm run s | hot run s | read MB (est.) | rate Mbit/s | RTT ms | "
        "limit s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, row in limit.items():
        link, image = key.split("/", 1)
        read = "unknown (0)" if row["read_bytes"] is None else _mb(row["read_bytes"])
        hot = row.get("hot_run_s")  # absent from results made before the hot run existed
        lines.append(
            f"| {link} | {image} | {row['warm_run_s']:.2f} | {_num(hot, 2)} | {read} | "
            f"{row['rate_bps'] / 1e6:.0f} | {row['rtt_s'] * 1000:.1f} | {row['limit_s']:.2f} |"
        )
    return lines


def _link_lines(
    payload: dict[str, Any], link: str, ratio: dict[str, dict[str, float | None]]
) -> list[str]:
    """The per-setup table of one link."""
    summary: dict[str, dict[str, Any]] = payload["summary"]
    lines = [
        "",
        f"## Link: {link}",
        "",
        "Times in seconds, median (min) over the repeats; the first exec of a run-only setup "
        f"(1b, 1c, 5, 5b, 6b) over all its runs, {1 + RERUNS} per repeat on the repeat's node "
        "(1b+1c, 5b and 5 taking turns). "
        "The three ratios are median pull+run "
        "over overlayfs's, stargz's (lazy) and the physical limit's, same link and image. "
        "Registry MB = layer blob bytes served; unique MB = the same with overlapping ranges "
        "counted once; read MB (est.) = compressed bytes of the files the workload loaded.",
        "",
        "| image | setup | pull s | first exec s | pull+run s | vs overlayfs | vs stargz | "
        "vs limit | registry MB | unique MB | of image | read MB (est.) | ContentCache MB | "
        "daemon CPU s | containerd CPU s | inflate s | fetch wait s | daemon peak RSS MB | "
        "FUSE requests |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for image, img in payload["images"].items():
        for setup in SETUP_ORDER:
            key = f"{link}/{image}/{setup}"
            row = summary.get(key)
            if row is None:
                if setup == "clip-contentcache" and not payload["contentcache_available"]:
                    lines.append(
                        f"| {image} | {SETUP_TITLES[setup]} | not available yet "
                        "(no ContentCache tier in the read path) |||||||||||||||||"
                    )
                continue
            r = ratio.get(key, {})
            lines.append(
                f"| {image} | {SETUP_TITLES[setup]} | {_fmt_t(row['pull_s'])} | "
                f"{_fmt_t(row['first_exec_s'])} | {_fmt_t(row['end_to_end_s'])} | "
                f"{_x(r.get('overlayfs'))} | {_x(r.get('stargz'))} | {_x(r.get('limit'))} | "
                f"{_mb(row['registry_blob_bytes'])} | "
                f"{_mb(row['registry_unique_bytes'])} | "
                f"{100 * row['registry_blob_bytes'] / _size(img, setup):.0f}% | "
                f"{_mb(row['read_compressed_bytes'])} | "
                f"{_mb(row['contentcache_bytes'])} | "
                f"{_num(row['daemon_cpu_s'])} | "
                f"{_num(row.get('containerd_cpu_s'))} | "
                f"{_num(row.get('inflate_s'), 2)} | "
                f"{_num(row.get('fetch_wait_s'), 2)} | "
                f"{_mb(row['daemon_peak_rss'])} | "
                f"{_num(row.get('fuse_requests'), 0)} |"
            )
    return lines


# One colour family per snapshotter, so the chart reads as three groups.
FAMILY_COLORS = {"overlayfs": "Blues", "stargz": "Greens", "clip": "Oranges"}


def setup_color(setup: str, rank: int) -> tuple[float, float, float, float]:
    """The setup's colour: its snapshotter's family, darker for each later setup of it."""
    import matplotlib

    family = setup.split("-", 1)[0]
    cmap = matplotlib.colormaps[FAMILY_COLORS.get(family, "Greys")]
    red, green, blue, alpha = cmap(0.9 - 0.18 * rank)
    return (red, green, blue, alpha)


def chart(payload: dict[str, Any], path: Path) -> None:
    """Stacked bars (pull, then run) per image and setup, one panel per link; the three
    snapshotters in three colour families, the physical limit as a black tick per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = payload["summary"]
    limit = payload.get("limits", {})
    links = payload["links"]
    images = list(payload["images"])
    setups = [s for s in SETUP_ORDER if any(k.endswith("/" + s) for k in summary)]
    fig, axes = plt.subplots(1, len(links), figsize=(8 * len(links), 5.5), squeeze=False)
    width = 0.8 / max(len(setups), 1)
    ranks: dict[str, int] = {}
    for setup in setups:
        family = setup.split("-", 1)[0]
        ranks[setup] = sum(s.split("-", 1)[0] == family for s in ranks)
    for ax, link in zip(axes[0], links, strict=True):
        for j, setup in enumerate(setups):
            xs, pulls, runs = [], [], []
            for i, image in enumerate(images):
                row = summary.get(f"{link}/{image}/{setup}")
                if row is not None:
                    xs.append(i + (j - (len(setups) - 1) / 2) * width)
                    pulls.append(row["pull_s"]["median"])
                    runs.append(row["first_exec_s"]["median"])
            color = setup_color(setup, ranks[setup])
            ax.bar(xs, pulls, width, color=color, alpha=0.45)
            ax.bar(xs, runs, width, bottom=pulls, color=color, label=SETUP_TITLES[setup])
        for i, image in enumerate(images):
            bound = limit.get(f"{link}/{image}")
            if bound is not None:
                ax.hlines(bound["limit_s"], i - 0.45, i + 0.45, colors="black", linewidths=2,
                          label="physical limit" if i == 0 else None)  # fmt: skip
        ax.set_xticks(range(len(images)), images)
        ax.set_ylabel("seconds (light: pull, dark: ctr run to workload done)")
        ax.set_title(f"time to first exec, link: {link}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def image_info(
    pushed: list[PushedImage], esgz: dict[str, PushedImage]
) -> dict[str, dict[str, Any]]:
    """Sizes and layers of each image and, when converted, of its eStargz twin."""
    return {
        p.spec.name: {
            "layers": len(p.image.layer_digests),
            "compressed": p.image.compressed_total,
            "uncompressed": sum(p.image.uncompressed_sizes),
            "layer_digests": p.image.layer_digests,
            "description": p.spec.description,
            **(
                {"esgz_compressed": esgz[p.spec.name].image.compressed_total}
                if p.spec.name in esgz
                else {}
            ),
        }
        for p in pushed
    }


def throughput_rows(rows: list[Throughput]) -> list[dict[str, Any]]:
    return [asdict(r) for r in rows]
