"""`make bench`: clip against containerd's overlayfs and stargz-snapshotter, in one run.

Builds the images (bench/images.py, cached under bench/work), starts a docker-registry in a
network namespace of its own behind a veth pair, builds the stargz daemon and pushes each
image's eStargz twin (bench/peers.py), and measures every image under every setup
(bench/setups.py) twice: over the unshaped link, then shaped to ``--mbit`` with ``--rtt-ms``
round trip; each link is probed first for the physical limit. Then the FUSE read throughput
phase, and the report (bench/report.py) in bench/results/. Everything started is stopped by
PID, unmounted by path, and the namespace, veth pair and qdiscs are removed, also on failure
or Ctrl-C.

    .venv/bin/python -m bench            # the full run whose results are committed
    .venv/bin/python -m bench --quick    # one image, one repeat: for development
    .venv/bin/python -m bench --quick --setups overlayfs,stargz,clip-lazy --no-throughput
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import report
from bench.images import BIG_MIB, FSREAD, IMAGES, PushedImage, build_and_push, say
from bench.netem import DelayRelay, ShapedLink, ShapedRegistry, probe
from bench.peers import build_daemon, convert_all
from bench.setups import SETUPS, Bench, Run, Throughput, throughput
from integration.harness.containerd import unmount_under
from integration.harness.proxy import CountingProxy
from integration.harness.redis import RedisServer

HERE = Path(__file__).resolve().parent
#: Runs per setup of a full run: the median of three is robust to one outlier run, the median
#: of two is their mean. Fewer makes the run partial.
FULL_REPEATS = 3


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="clip vs overlayfs: pull, time to first exec, registry bytes, RSS, throughput",
        epilog="Example: .venv/bin/python -m bench --quick --no-shaped",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one image (python), one repeat, small throughput phase",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"runs per setup (default {FULL_REPEATS}: the median of three is robust to one "
        "outlier run, the median of two is their mean)",
    )
    parser.add_argument(
        "--images",
        default=None,
        help="comma-separated subset of: " + ",".join(s.name for s in IMAGES),
    )
    parser.add_argument(
        "--setups",
        default=None,
        help="comma-separated subset of: " + ",".join(SETUPS) + " (clip-cold runs for any clip "
        "setup, overlayfs-warm and -hot with overlayfs, stargz-warm with stargz)",
    )
    parser.add_argument("--mbit", type=int, default=200, help="shaped link bandwidth")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="shaped link round trip")
    parser.add_argument("--no-shaped", action="store_true", help="skip the shaped link")
    parser.add_argument("--no-throughput", action="store_true", help="skip FUSE throughput")
    parser.add_argument(
        "--profile",
        default="",
        help="comma-separated setups to record with py-spy into <work>/profiles (slows them)",
    )
    parser.add_argument(
        "--report-only",
        type=Path,
        default=None,
        metavar="JSON",
        help="only rewrite the .md and .png next to an existing results JSON",
    )
    parser.add_argument("--work", type=Path, default=HERE / "work", help="image cache")
    parser.add_argument(
        "--out", type=Path, default=None, help="report dir (bench/results; --quick: bench/work)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # clip closes range responses it no longer needs (and nodes stop mid-fetch): the proxy's
    # "cannot write to closing transport" tracebacks are expected, not failures.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    if args.report_only is not None:
        return rerender(args.report_only)
    repeats = args.repeats or (1 if args.quick else FULL_REPEATS)
    wanted = args.images.split(",") if args.images else (["python"] if args.quick else None)
    specs = [s for s in IMAGES if wanted is None or s.name in wanted]
    if not specs:
        raise SystemExit(f"bench: no such image in --images {args.images!r}")
    only = frozenset(args.setups.split(",")) if args.setups else None
    if only is not None and not only <= set(SETUPS):
        raise SystemExit(
            f"bench: no such setup in --setups: {','.join(sorted(only - set(SETUPS)))}"
        )
    started = time.monotonic()
    # SIGTERM unwinds like Ctrl-C, so the ExitStack below stops and unmounts what was started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    nodes = Path(f"/tmp/clipbench-{os.getpid()}")
    cc_available = True  # the read path has had its ContentCache tier since 0.1.0
    payload: dict[str, Any] = {
        "mode": run_mode(args),
        "repeats": repeats,
        "contentcache_available": cc_available,
    }
    with ExitStack() as stack:
        link = ShapedLink()
        stack.callback(link.down)
        link.up()
        stack.callback(shutil.rmtree, nodes, True)
        stack.callback(unmount_under, nodes)
        registry = ShapedRegistry(args.work / "registry", link)
        shutil.rmtree(registry.workdir, ignore_errors=True)
        stack.callback(registry.stop)
        registry.start()
        say("building (cached) and pushing images ...")
        with_fs = not args.no_throughput
        pushed = build_and_push(args.work, [*specs, *([FSREAD] if with_fs else [])], registry.host)
        by_name = {p.spec.name: p for p in pushed}
        stargz, esgz, payload["peers"] = stargz_setup(
            args.work, [by_name[s.name] for s in specs], registry.host, only
        )
        direct = CountingProxy(registry.host)
        stack.callback(direct.stop)
        direct.start()
        relay = DelayRelay(registry.host, args.rtt_ms / 2)
        stack.callback(relay.stop)
        shaped = CountingProxy(relay.host)
        stack.callback(shaped.stop)
        shaped.start()
        cc_url = ""
        if cc_available:
            redis = RedisServer(args.work / "redis")
            stack.callback(redis.stop)
            redis.start()
            cc_url = redis.url()
        hosts = [direct.host, shaped.host]
        links = ["unshaped"] + ([] if args.no_shaped else [f"{args.mbit}mbit-{args.rtt_ms:g}ms"])
        link_params: dict[str, dict[str, float]] = {}
        runs = []
        failures: list[dict[str, Any]] = []
        tp: list[Throughput] = []
        for name in links:
            proxy = direct if name == "unshaped" else shaped
            if proxy is shaped:
                link.shape(args.mbit)
                relay.start()
            say(f"== link {name}")
            link_params[name] = probe_link(proxy.host, by_name[specs[0].name])
            bench = Bench(nodes, proxy, name, hosts, cc_url, stargz=stargz, esgz=esgz, only=only)
            bench.profile = tuple(filter(None, args.profile.split(",")))
            bench.profile_dir = args.work / "profiles"
            for repeat in range(repeats):
                for spec in specs:
                    bench.image_round(by_name[spec.name], repeat, cc_available)
            runs += bench.runs
            failures += bench.failures
            if proxy is direct and with_fs:
                say("== FUSE read throughput")
                n_small = 2000 if args.quick else 5000
                tp = throughput(bench, by_name["fsread"], BIG_MIB, n_small)
                payload["n_small"] = n_small
            link.unshape()
        payload["images"] = report.image_info([by_name[s.name] for s in specs], esgz)
    summary = report.summarize(runs)
    payload["link_params"] = link_params
    payload["limits"] = report.limits(summary, link_params)
    payload.update(
        machine=report.machine(),
        finished=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        duration_s=time.monotonic() - started,
        links=links,
        runs=[r.as_dict() for r in runs],
        failures=failures,
        summary=summary,
        throughput=report.throughput_rows(tp),
        big_mib=BIG_MIB,
        targets=report.targets(summary, links, cc_available),
    )
    full = payload["mode"] == "full"
    write(payload, args.out or (HERE / "results" if full else args.work / "results-dev"), full)
    say(f"done in {(time.monotonic() - started) / 60:.1f} min")
    return 0


def stargz_setup(
    work: Path, pushed: list[PushedImage], registry_host: str, only: frozenset[str] | None
) -> tuple[Path | None, dict[str, PushedImage], dict[str, str]]:
    """The stargz daemon and the eStargz twins, or a one-line reason for the report."""
    if only is not None and not only & {"stargz", "stargz-warm"}:
        return None, {}, {}
    built = build_daemon(work)
    reason = built.error
    esgz: dict[str, PushedImage] = {}
    if built.binary is not None:
        try:
            esgz = convert_all(work, pushed, registry_host)
        except Exception as exc:  # reported in one line; clip and overlayfs still run
            reason = "eStargz conversion failed: " + (str(exc).strip() or repr(exc))
    if reason:
        status = "not measured: " + reason.splitlines()[0][:300]
        say(f"stargz {status}")
        return None, {}, {"stargz": status}
    return built.binary, esgz, {"stargz": "measured"}


def probe_link(host: str, pushed: PushedImage) -> dict[str, float]:
    """The link's round trip and rate, through ``host``, on the image's largest layer."""
    size, digest = max(zip(pushed.image.layer_sizes, pushed.image.layer_digests, strict=True))
    measured = probe(host, f"/v2/{pushed.image.repo}/blobs/{digest}")
    say(f"   probe: rtt {measured.rtt_s * 1000:.1f} ms, rate {measured.rate_bps / 1e6:.0f} Mbit/s "
        f"({size / 1e6:.1f} MB blob)")  # fmt: skip
    return {"rtt_s": measured.rtt_s, "rate_bps": measured.rate_bps}


# Run fields renamed since older results files were written (issue 14: every snapshotter).
RENAMED = {"clip_cpu_s": "daemon_cpu_s", "clip_peak_rss": "daemon_peak_rss"}


def rerender(path: Path) -> int:
    """Recompute summary, limits and targets from the raw runs of ``path``; rewrite .md, .png."""
    payload = json.loads(path.read_text())
    fields = {f.name for f in dataclasses.fields(Run)}
    runs = [
        Run(**{RENAMED.get(k, k): v for k, v in r.items() if RENAMED.get(k, k) in fields})
        for r in payload["runs"]
    ]
    payload["summary"] = report.summarize(runs)
    payload["limits"] = report.limits(payload["summary"], payload.get("link_params", {}))
    payload["targets"] = report.targets(
        payload["summary"], payload["links"], payload["contentcache_available"]
    )
    report.write_json(path, payload)
    path.with_suffix(".md").write_text(report.markdown(payload))
    report.chart(payload, path.with_suffix(".png"))
    say(f"rewrote {path.with_suffix('.md')} and .png")
    return 0


def run_mode(args: argparse.Namespace) -> str:
    """ "full" only for the default run; anything smaller says what it left out."""
    if args.quick:
        return "quick"
    left_out = [
        flag
        for flag, on in (
            ("--images", args.images),
            ("--repeats", args.repeats is not None and args.repeats < FULL_REPEATS),
            ("--no-shaped", args.no_shaped),
            ("--no-throughput", args.no_throughput),
            ("--profile", args.profile),
            ("--setups", args.setups),
        )
        if on
    ]
    return "partial (" + " ".join(left_out) + ")" if left_out else "full"


def write(payload: dict[str, Any], out: Path, full: bool) -> None:
    """latest.* for a full run; other runs write dev.* (default bench/work/results-dev) so they
    never replace the committed results."""
    out.mkdir(parents=True, exist_ok=True)
    stem = "latest" if full else "dev"
    report.write_json(out / f"{stem}.json", payload)
    (out / f"{stem}.md").write_text(report.markdown(payload))
    report.chart(payload, out / f"{stem}.png")
    say(f"wrote {out}/{stem}.md, .json, .png")
    say((out / f"{stem}.md").read_text())


if __name__ == "__main__":
    raise SystemExit(main())
